"""What a worker tells the scheduler so it can route well: workflow readiness, Idempotency-Key, paged feeds."""

from __future__ import annotations

import asyncio

import pytest

from support.cluster import WorkerCluster, call, start_worker
from support.timing import until
from t2i.idempotency import prompt_id_for
from t2i.readiness import problems_of
from t2i.worker.jobs import COMPLETED, Job

CKPT_LOADER = {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}}}
KSAMPLER = {"input": {"required": {"sampler_name": ["COMBO", {"options": ["euler", "dpmpp_2m"]}],
                                   "seed": ["INT", {"min": 0}]}}}


# --- the pure check -----------------------------------------------------------------------

def test_problems_name_the_missing_model_node_and_list_value():
    workflow = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "c.safetensors"}},
                "2": {"class_type": "KSampler", "inputs": {"sampler_name": "lms", "seed": 5, "model": ["1", 0]}},
                "3": {"class_type": "FancyCustomNode", "inputs": {}}}
    problems = problems_of(workflow, {"CheckpointLoaderSimple": CKPT_LOADER, "KSampler": KSAMPLER})
    assert problems == [
        "ComfyUI has no checkpoint c.safetensors (it has: a.safetensors, b.safetensors)",
        "ComfyUI has no sampler lms (it has: euler, dpmpp_2m)",
        "ComfyUI has no node 'FancyCustomNode' (node 3; a custom node not installed?)",
    ]


def test_a_workflow_comfyui_can_run_has_no_problems_and_request_inputs_are_skipped():
    workflow = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
                "2": {"class_type": "KSampler", "inputs": {"sampler_name": "not-yet-filled", "seed": 0}}}
    info = {"CheckpointLoaderSimple": CKPT_LOADER, "KSampler": KSAMPLER}
    assert problems_of(workflow, info, skip_inputs=[("2", "sampler_name")]) == []


# --- readiness on a worker ------------------------------------------------------------------

async def _workflows(url: str) -> dict:
    reply = await call("GET", f"{url}/workflows")
    assert reply.code == 200
    return reply.json


async def _checked(c: WorkerCluster) -> dict:
    await c.worker.runner.readiness.check()
    return (await _workflows(c.url))["workflows"]["txt2img"]


@pytest.mark.gen_test(timeout=30)
async def test_a_comfyui_without_the_model_makes_the_workflow_not_ready_and_generate_503(tmp_path):
    async with WorkerCluster(tmp_path, sim={"checkpoints": ("sd_xl_base_1.0.safetensors",)}) as c:
        txt2img = await _checked(c)
        assert txt2img["ready"] is False
        assert txt2img["reason"] == ("ComfyUI has no checkpoint v1-5-pruned-emaonly.safetensors "
                                     "(it has: sd_xl_base_1.0.safetensors)")
        reply = await call("POST", f"{c.url}/generate", {"prompt": "x"})
        assert reply.code == 503 and reply.headers["Retry-After"]
        assert reply.json["workflow_not_ready"] is True and reply.json["workflow"] == "txt2img"
        assert "no checkpoint" in reply.json["error"]
        assert c.sim.submitted == []  # refused before ComfyUI had to


@pytest.mark.gen_test(timeout=30)
async def test_a_template_comfyui_rejects_after_it_checked_ready_is_marked_not_ready(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        assert (await _checked(c))["ready"] is True
        c.sim.checkpoints = ("another.safetensors",)  # someone removed the model while we ran
        reply = await call("POST", f"{c.url}/generate", {"prompt": "x", "steps": 2})
        assert reply.code == 502 and "Value not in list" in reply.json["error"]
        txt2img = (await _workflows(c.url))["workflows"]["txt2img"]
        assert txt2img["ready"] is False and "Value not in list" in txt2img["reason"]
        # A check that still finds the old list does not undo what ComfyUI said (the mark lasts).
        c.sim.checkpoints = ("v1-5-pruned-emaonly.safetensors",)
        assert (await _checked(c))["ready"] is False


# --- Idempotency-Key ------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_the_same_key_and_body_give_the_same_job_and_one_run(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        body, key = {"prompt": "once", "steps": 2, "seed": 7}, {"Idempotency-Key": "order-42"}
        first = await call("POST", f"{c.url}/generate", body, headers=key)
        assert first.code == 200 and first.json["prompt_id"] == prompt_id_for("order-42")
        await c.wait(first.json["prompt_id"])
        again = await call("POST", f"{c.url}/generate", {"seed": 7, "steps": 2, "prompt": "once"}, headers=key)
        assert again.code == 200 and again.json["prompt_id"] == first.json["prompt_id"]
        assert again.json["duplicate"] is True and "duplicate" not in first.json
        assert [p for p, _, _ in c.sim.submitted].count(first.json["prompt_id"]) == 1

        other = await call("POST", f"{c.url}/generate", {"prompt": "something else"}, headers=key)
        assert other.code == 422 and other.json["prompt_id"] == first.json["prompt_id"]
        bad = await call("POST", f"{c.url}/generate", body, headers={"Idempotency-Key": "é" * 3})
        assert bad.code == 400 and bad.json["header"] == "Idempotency-Key"


@pytest.mark.gen_test(timeout=30)
async def test_a_duplicate_while_the_first_is_being_submitted_is_409(tmp_path, monkeypatch):
    async with WorkerCluster(tmp_path) as c:
        comfy = c.worker.runner.comfy
        release = asyncio.Event()
        real_submit = comfy.submit

        async def slow_submit(*args, **kwargs):
            await release.wait()
            return await real_submit(*args, **kwargs)

        monkeypatch.setattr(comfy, "submit", slow_submit)
        key = {"Idempotency-Key": "slow-one"}
        first = asyncio.ensure_future(call("POST", f"{c.url}/generate", {"prompt": "x", "steps": 2}, headers=key))
        await until(lambda: c.worker.store.get(prompt_id_for("slow-one")) is not None, what="the first submit")
        second = await call("POST", f"{c.url}/generate", {"prompt": "x", "steps": 2}, headers=key)
        assert second.code == 409 and second.headers["Retry-After"]
        release.set()
        assert (await first).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_a_key_survives_a_worker_restart(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        key = {"Idempotency-Key": "before-the-restart"}
        first = await call("POST", f"{c.url}/generate", {"prompt": "x", "steps": 2}, headers=key)
        await c.wait(first.json["prompt_id"])
        await c.worker.stop()
        c.worker = await start_worker(tmp_path, c.sim.url)  # same config, same journal
        await c.worker.runner.comfy.wait_connected(5)
        again = await call("POST", f"{c.url}/generate", {"prompt": "x", "steps": 2}, headers=key)
        assert again.code == 200 and again.json["prompt_id"] == first.json["prompt_id"]
        assert again.json["duplicate"] is True


# --- the paged feed -------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_a_full_listing_comes_in_pages_and_nothing_is_missed(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        store = c.worker.store
        for n in range(7):
            store.add(Job(f"job-{n}", store.clock(), phase=COMPLETED))
        first = (await call("GET", f"{c.url}/jobs?since=0&limit=3")).json
        assert first["full"] is True and first["more"] is True and len(first["jobs"]) == 3
        store.update("job-0", image_expired=True)  # changed while the follower pages: listed again later
        store.remove(["job-1"])
        seen, after = [j["prompt_id"] for j in first["jobs"]], first["cursor"]
        while True:
            page = (await call("GET", f"{c.url}/jobs?since=0&limit=3&after={after}")).json
            seen += [j["prompt_id"] for j in page["jobs"]]
            if not page["more"]:
                break
            after = page["cursor"]
        assert set(seen) == {f"job-{n}" for n in range(7)} and seen.count("job-0") == 2  # listed again
        # Then from the first page's seq: the removal during paging is heard of.
        rest = (await call("GET", f"{c.url}/jobs?since={first['seq']}&limit=3")).json
        assert rest["full"] is False and "job-1" in rest["removed"]
        assert (await call("GET", f"{c.url}/jobs?limit=0")).code == 400
