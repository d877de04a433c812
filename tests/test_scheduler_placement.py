"""Placement: workflow readiness, raw workflows, no black holes, and the per-(worker, workflow) breaker.

Units drive :class:`t2i.scheduler.placement.Placement` over a registry with hand-set state; the
end-to-end tests run pools of real workers in front of ComfyUI doubles on loopback.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from support.cluster import CountingRoute, SchedulerCluster, wait_status
from support.timing import FakeClock, until
from t2i.config import PACKAGE_WORKFLOWS
from t2i.httpclient import JSONResponse, fetch_json
from t2i.openapi import check_response
from t2i.scheduler.placement import NoWorkerAvailable
from test_scheduler_units import entry, make_placement, up

TXT2IMG = json.loads((PACKAGE_WORKFLOWS / "txt2img.json").read_text())
MODEL = "v1-5-pruned-emaonly.safetensors"
OTHER_MODEL = "sd_xl_base_1.0.safetensors"


def catalogue(ready=None, reason=None, raw=False, name="txt2img"):
    return {"default_workflow": name, "allow_raw_workflows": raw,
            "workflows": {name: {"params": {"prompt": {"type": "string"}}, "ready": ready, "reason": reason}}}


# --- units ------------------------------------------------------------------------------

def test_a_workflow_goes_only_to_ready_workers_and_none_ready_says_why(tmp_path):
    placement, registry, _ = make_placement(tmp_path, [entry("a", 1), entry("b", 2), entry("c", 3)])
    up(registry, "a", "b", "c")
    registry.workers["a"].catalogue = catalogue(False, f"ComfyUI has no checkpoint {MODEL}")
    registry.workers["b"].catalogue = catalogue(None)       # not checked yet: routable
    registry.workers["c"].catalogue = catalogue(True)
    assert {placement.choose("txt2img").name for _ in range(6)} == {"b", "c"}
    assert {placement.choose(None).name for _ in range(6)} == {"b", "c"}  # each worker's default
    registry.workers["b"].catalogue = catalogue(False, "ComfyUI has no node 'KSampler'")
    placement.refused(registry.workers["c"], "txt2img", "its ComfyUI rejected the workflow: boom")
    with pytest.raises(NoWorkerAvailable) as caught:
        placement.choose("txt2img")
    assert str(caught.value) == (f"No worker is ready for workflow 'txt2img': a: ComfyUI has no checkpoint {MODEL}; "
                                 "b: ComfyUI has no node 'KSampler'; c: its ComfyUI rejected the workflow: boom.")
    assert caught.value.ready is False
    with pytest.raises(NoWorkerAvailable, match="c: has no workflow 'other'"):
        placement.choose("other")


def test_a_refusal_holds_for_a_while_then_the_catalogue_decides(tmp_path):
    clock = FakeClock()
    placement, registry, _ = make_placement(tmp_path, [entry("a", 1)], clock=clock.mono)
    up(registry, "a")
    registry.workers["a"].catalogue = catalogue(True)
    placement.refused(registry.workers["a"], None, "rejected")  # the worker's default workflow
    with pytest.raises(NoWorkerAvailable, match="a: rejected"):
        placement.choose("txt2img")
    clock.advance(31)
    assert placement.choose("txt2img").name == "a"


def test_raw_workflows_go_only_to_workers_that_allow_them(tmp_path):
    placement, registry, _ = make_placement(tmp_path, [entry("a", 1), entry("b", 2), entry("c", 3)])
    up(registry, "a", "b", "c")
    registry.workers["a"].catalogue = catalogue(raw=False)
    registry.workers["b"].catalogue = catalogue(raw=True)
    # c has not reported its catalogue: it may not allow them
    assert {placement.choose(TXT2IMG).name for _ in range(5)} == {"b"}
    registry.workers["b"].catalogue = catalogue(raw=False)
    with pytest.raises(NoWorkerAvailable) as caught:
        placement.choose(TXT2IMG)
    assert str(caught.value) == ("No worker can run a raw workflow: a: does not allow raw workflows "
                                 "(allow_raw_workflows: false); b: does not allow raw workflows (allow_raw_workflows: "
                                 "false); c: has not reported its workflows yet.")


def test_the_breaker_opens_after_failures_while_others_succeed_then_half_opens_and_closes(tmp_path):
    clock = FakeClock()
    placement, registry, _ = make_placement(tmp_path, [entry("a", 1), entry("b", 2)], clock=clock.mono)
    up(registry, "a", "b")
    outcomes = registry.mirror.outcomes
    # Failing everywhere is not the worker's fault: no breaker opens.
    outcomes += [("a", "txt2img", "failed")] * 6
    placement.absorb()
    assert placement.breaker_state(registry.workers["a"], "txt2img")[0] == "closed"
    # ... until another worker completes it: then a's run of failures takes it out of rotation.
    outcomes += [("b", "txt2img", "completed")]
    placement.absorb()
    assert placement.breaker_state(registry.workers["a"], "txt2img") == ("open", 60.0)
    assert {placement.choose("txt2img").name for _ in range(4)} == {"b"}
    assert placement.choose("other").name in {"a", "b"}  # another workflow is not affected
    described = {w["name"]: w for w in placement.describe()}
    registry.workers["b"].mark_down("gone")
    with pytest.raises(NoWorkerAvailable, match=r"a: out of rotation for 'txt2img' after 5 failed jobs in a row"):
        placement.choose("txt2img")
    registry.workers["b"].refused = None
    clock.advance(59)
    assert placement.choose("txt2img").name == "b"
    clock.advance(1)
    # Half-open: one trial job goes to a; no second one while it runs.
    assert placement.breaker_state(registry.workers["a"], "txt2img")[0] == "half_open"
    picks = [placement.choose("txt2img").name for _ in range(4)]
    assert picks.count("a") == 1, picks
    assert placement.breaker_state(registry.workers["a"], "txt2img")[0] == "trial"
    # The trial fails: open again for a whole cool-down.
    outcomes += [("a", "txt2img", "failed")]
    assert placement.breaker_state(registry.workers["a"], "txt2img")[0] == "trial"
    placement.absorb()
    assert placement.breaker_state(registry.workers["a"], "txt2img") == ("open", 60.0)
    clock.advance(60)
    assert "a" in [placement.choose("txt2img").name for _ in range(2)]
    outcomes += [("a", "txt2img", "completed")]
    placement.absorb()
    assert placement.breaker_state(registry.workers["a"], "txt2img") == ("closed", None)
    assert described["a"]["routable"] is True


def test_failures_of_raw_workflows_and_cancelled_jobs_open_no_breaker(tmp_path):
    placement, registry, _ = make_placement(tmp_path, [entry("a", 1), entry("b", 2)])
    up(registry, "a", "b")
    registry.mirror.outcomes += [("b", "(raw)", "completed")] + [("a", "(raw)", "failed")] * 9
    registry.mirror.outcomes += [("b", None, "completed")] + [("a", None, "failed")] * 9
    placement.absorb()
    assert not registry.workers["a"].breakers


# --- end to end -------------------------------------------------------------------------

async def call(method: str, url: str, body: Any = None, *, timeout: float = 10.0, **kw: Any) -> JSONResponse:
    """A JSON call; every answer is checked against the OpenAPI document."""
    response = await fetch_json(url, method, body, connect_timeout=2.0, request_timeout=timeout, **kw)
    problems = check_response(method, urlsplit(url).path, response.status, response.body)
    assert not problems, problems
    return response


async def workers_of(scheduler) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in (await call("GET", scheduler.url + "/workers")).body["workers"]}


async def workflow_ready(scheduler, worker: str, workflow: str = "txt2img"):
    """The scheduler's view of a worker's readiness for a workflow (``"absent"`` before it knows)."""
    info = (await workers_of(scheduler)).get(worker) or {}
    return (info.get("workflows") or {}).get(workflow, {}).get("ready", "absent")


async def generate(scheduler, body: dict[str, Any] | None = None) -> JSONResponse:
    return await call("POST", scheduler.url + "/generate", body or {"prompt": "a red fox", "steps": 4})


@pytest.mark.gen_test(timeout=40)
async def test_a_worker_without_the_model_gets_no_job_and_both_views_say_why(tmp_path, monkeypatch):
    from t2i.worker import handlers as worker_handlers

    posts = CountingRoute(monkeypatch, worker_handlers.GenerateHandler, "post")
    async with SchedulerCluster(tmp_path, sims=[{"checkpoints": (OTHER_MODEL,)}, {}]) as c:
        assert await until(lambda: _is(workflow_ready(c.scheduler, "gpu-0"), False), what="gpu-0 not ready")
        gpu0 = (await workers_of(c.scheduler))["gpu-0"]
        assert gpu0["routable"] is True  # the worker itself is fine ...
        reason = gpu0["workflows"]["txt2img"]["reason"]
        assert MODEL in reason and OTHER_MODEL in reason  # ... it says what is missing and what there is
        assert gpu0["workflows"]["txt2img"]["breaker"] == "closed"
        catalogue = (await call("GET", c.scheduler.url + "/workflows")).body["workflows"]["txt2img"]
        assert catalogue["ready"] is True and catalogue["not_ready"] == {"gpu-0": reason}
        placed = [await generate(c.scheduler) for _ in range(8)]
        assert all(r.status == 200 and r.body["worker"] == "gpu-1" for r in placed), [r.body for r in placed]
        for reply in placed:
            assert (await wait_status(c.scheduler.url, reply.body["prompt_id"]))["status"] == "completed"
        assert posts.at(c.workers[0]) == 0
        # The other worker loses the model too: 503 naming each worker's reason.
        c.sims[1].checkpoints = (OTHER_MODEL,)
        c.workers[1].runner.readiness.request_check()
        await until(lambda: _is(workflow_ready(c.scheduler, "gpu-1"), False), what="gpu-1 not ready")
        none = await generate(c.scheduler)
        assert none.status == 503 and int(none.headers["Retry-After"]) >= 1
        assert none.body["error"].startswith("No worker is ready for workflow 'txt2img': gpu-0: ComfyUI has no "
                                             f"checkpoint {MODEL}"), none.body
        assert "; gpu-1: " in none.body["error"]
        catalogue = (await call("GET", c.scheduler.url + "/workflows")).body["workflows"]["txt2img"]
        assert catalogue["ready"] is False and catalogue["reason"] == none.body["error"]
        assert posts.at(c.workers[0]) == 0


async def _not_routable(scheduler, name: str) -> bool:
    return not (await workers_of(scheduler))[name]["routable"]


async def _is(awaitable, expected) -> bool:
    return (await awaitable) is expected


@pytest.mark.gen_test(timeout=40)
async def test_a_template_rejected_by_a_ready_worker_is_placed_again_elsewhere(tmp_path, monkeypatch):
    """The worker checked its ComfyUI at start; the model went away since: ComfyUI rejects the job (502).
    That is the worker's trouble, not the client's: the same job goes to the other worker."""
    from t2i.worker import handlers as worker_handlers

    async with SchedulerCluster(tmp_path) as c:
        await until(lambda: _is(workflow_ready(c.scheduler, "gpu-0"), True), what="gpu-0 ready")
        await until(lambda: _is(workflow_ready(c.scheduler, "gpu-1"), True), what="gpu-1 ready")
        c.sims[0].checkpoints = (OTHER_MODEL,)  # the worker does not know yet
        posts = CountingRoute(monkeypatch, worker_handlers.GenerateHandler, "post")
        placed = [await generate(c.scheduler) for _ in range(4)]
        assert all(r.status == 200 and r.body["worker"] == "gpu-1" for r in placed), [r.body for r in placed]
        assert posts.at(c.workers[0]) == 1  # refused once, then left alone
        gpu0 = (await workers_of(c.scheduler))["gpu-0"]["workflows"]["txt2img"]
        assert gpu0["ready"] is False and MODEL in gpu0["reason"]
        for reply in placed:
            assert (await wait_status(c.scheduler.url, reply.body["prompt_id"]))["status"] == "completed"


@pytest.mark.gen_test(timeout=40)
async def test_a_template_every_worker_rejects_is_answered_with_comfyuis_words(tmp_path, monkeypatch):
    from t2i.worker import handlers as worker_handlers

    async with SchedulerCluster(tmp_path) as c:
        await until(lambda: _is(workflow_ready(c.scheduler, "gpu-0"), True), what="gpu-0 ready")
        await until(lambda: _is(workflow_ready(c.scheduler, "gpu-1"), True), what="gpu-1 ready")
        for sim in c.sims:
            sim.checkpoints = (OTHER_MODEL,)
        posts = CountingRoute(monkeypatch, worker_handlers.GenerateHandler, "post")
        rejected = await generate(c.scheduler)
        assert rejected.status == 502 and MODEL in rejected.body["error"] and "node_errors" in rejected.body
        assert posts.at(c.workers[0]) == posts.at(c.workers[1]) == 1  # each tried once
        unready = await generate(c.scheduler)  # both are known not ready now
        assert unready.status == 503 and unready.body["error"].startswith("No worker is ready for workflow")
        assert len(posts) == 2


@pytest.mark.gen_test(timeout=40)
async def test_raw_workflows_in_a_mixed_pool_go_to_the_worker_that_allows_them(tmp_path, monkeypatch):
    from t2i.worker import handlers as worker_handlers

    async with SchedulerCluster(tmp_path, workers=[{}, {"allow_raw_workflows": True}]) as c:
        await until(lambda: _is(workflow_ready(c.scheduler, "gpu-1"), True), what="catalogues")
        assert (await call("GET", c.scheduler.url + "/workflows")).body["allow_raw_workflows"] is True
        posts = CountingRoute(monkeypatch, worker_handlers.GenerateHandler, "post")
        placed = []
        for _ in range(4):
            reply = await generate(c.scheduler, {"workflow": TXT2IMG})
            assert reply.status == 200 and reply.body["worker"] == "gpu-1", reply.body
            placed.append(reply.body["prompt_id"])
        assert posts.at(c.workers[0]) == 0 and posts.at(c.workers[1]) == 4
        for pid in placed:  # an idle worker hands the next job to ComfyUI at once (no backlog)
            await wait_status(c.scheduler.url, pid)
        # A raw workflow ComfyUI rejects is the client's own mistake: passed on, not tried elsewhere.
        broken = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
        rejected = await generate(c.scheduler, {"workflow": broken})
        assert rejected.status == 502 and "NoSuchNode" in rejected.body["error"]
        assert len(posts) == 5
        assert (await generate(c.scheduler, {"workflow": TXT2IMG})).body["worker"] == "gpu-1"
        # ... and the only worker that allows them gone: 503 naming why for each.
        await c.workers[1].stop()
        await until(lambda: _not_routable(c.scheduler, "gpu-1"), what="gpu-1 seen down")
        reply = await generate(c.scheduler, {"workflow": TXT2IMG})
        assert reply.status == 503, reply.body
        assert reply.body["error"].startswith("No worker can run a raw workflow: gpu-0: does not allow raw workflows")
        # A bad field is the client's mistake too: 400 at once, no worker asked.
        before = len(posts)
        assert (await generate(c.scheduler, {"prompt": "x", "steps": 0})).status == 400
        assert len(posts) == before


@pytest.mark.gen_test(timeout=60)
async def test_a_worker_failing_one_workflow_is_taken_out_of_rotation_then_tried_again(tmp_path):
    clock = FakeClock()
    async with SchedulerCluster(tmp_path, clock=clock.mono) as c:
        scheduler = c.scheduler
        await until(lambda: _is(workflow_ready(scheduler, "gpu-0"), True), what="ready")
        for _ in range(20):
            c.sims[0].fail_next("KSampler", "CUDA error: an illegal memory access was encountered")
        where: dict[str, list[str]] = {"gpu-0": [], "gpu-1": []}

        async def run_one() -> dict[str, Any]:
            reply = await generate(scheduler)
            assert reply.status == 200, reply.body
            state = await wait_status(scheduler.url, reply.body["prompt_id"])
            await until(lambda: scheduler.mirror.fresh(reply.body["prompt_id"]) is not None, what="mirrored")
            where[reply.body["worker"]].append(state["status"])
            return reply.body

        # Jobs alternate while both are idle; gpu-0 fails each of its own while gpu-1 completes.
        while len(where["gpu-0"]) < 5:
            await run_one()
        assert set(where["gpu-0"]) == {"failed"} and set(where["gpu-1"]) == {"completed"}
        info = (await workers_of(scheduler))["gpu-0"]["workflows"]["txt2img"]
        assert info["breaker"] == "open" and info["failures"] == 5 and info["retry_in"] == 60
        assert info["ready"] is True  # ready as far as its ComfyUI says; the breaker is what keeps jobs away
        for _ in range(4):
            assert (await run_one())["worker"] == "gpu-1"
        clock.advance(61)  # the cool-down passes: one trial job, which fails again
        while len(where["gpu-0"]) < 6:
            await run_one()
        info = (await workers_of(scheduler))["gpu-0"]["workflows"]["txt2img"]
        assert info["breaker"] == "open"
        clock.advance(61)
        c.sims[0].pending_failures.clear()  # the GPU is fine again: the trial completes and closes it
        while len(where["gpu-0"]) < 7:
            await run_one()
        assert where["gpu-0"][-1] == "completed"
        info = (await workers_of(scheduler))["gpu-0"]["workflows"]["txt2img"]
        assert info["breaker"] == "closed" and info["failures"] == 0
        assert "gpu-0" in [(await run_one())["worker"] for _ in range(4)]  # back in rotation
