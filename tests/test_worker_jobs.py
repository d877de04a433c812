"""A worker in front of the ComfyUI double, end to end through its HTTP API: the recorded scenarios."""

import asyncio

import pytest

from support.cluster import WorkerCluster, call, sim_interrupted_ids, sim_pending_ids

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def progress_seen(states):
    return [s["progress"] for s in states if s["status"] == "running" and s["progress"]]


@pytest.mark.gen_test(timeout=30)
async def test_success_pending_running_completed_and_the_image_is_served(tmp_path):
    async with WorkerCluster(tmp_path, sim={"step_time": 0.03}) as c:
        reply = await c.generate({"prompt": "a red fox in snow", "seed": 42, "steps": 6, "width": 64,
                                  "height": 64})
        assert reply.code == 200, reply
        body = reply.json
        prompt_id = body["prompt_id"]
        assert body == {"prompt_id": prompt_id, "worker": "gpu-a", "worker_url": c.url,
                        "status_url": f"/status/{prompt_id}", "result_url": f"/result/{prompt_id}", "seed": 42}
        seen = []
        done = await c.wait(prompt_id, seen=seen)
        assert done["status"] == "completed", done
        assert {s["status"] for s in seen} >= {"running", "completed"}
        steps = progress_seen(seen)
        assert steps and all(p["max"] == 6 for p in steps) and any(p["value"] < 6 for p in steps)
        assert done["progress"] == {"value": 6, "max": 6}
        assert done["error"] is None and done["queue_position"] is None and done["preview_url"] is None
        assert done["seed"] == 42 and done["workflow"] == "txt2img"
        assert done["image_url"].startswith(f"{c.url}/images/{prompt_id}_")

        # What ComfyUI got: our prompt_id, our websocket's client_id, the filled template.
        sent_id, prompt, extra_data = c.sim.submitted[-1]
        assert sent_id == prompt_id and extra_data["client_id"] == c.worker.runner.comfy.client_id
        assert prompt["6"]["inputs"]["text"] == "a red fox in snow"
        assert prompt["3"]["inputs"]["seed"] == 42
        assert prompt["9"]["inputs"]["filename_prefix"] == f"t2i_{prompt_id}"

        result = await call("GET", f"{c.url}/result/{prompt_id}")
        assert result.code == 200
        assert result.json["status"] == "completed" and result.json["image_url"] == done["image_url"]
        assert result.json["image_urls"] == [done["image_url"]] and result.json["completed_at"] > 0

        image = await call("GET", done["image_url"])
        assert image.code == 200 and image.body.startswith(PNG_MAGIC)
        assert image.headers["Content-Type"] == "image/png"
        assert image.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        etag = image.headers["Etag"]
        again = await call("GET", done["image_url"], headers={"If-None-Match": etag})
        assert again.code == 304 and not again.body
        assert (tmp_path / "images" / done["image_url"].rsplit("/", 1)[1]).read_bytes() == image.body


@pytest.mark.gen_test(timeout=30)
async def test_identical_requests_give_two_distinct_retrievable_images(tmp_path):
    # ComfyUI would run nothing the second time and report the first job's file (b_cached_rerun);
    # the per-job filename_prefix makes it save a new file for the second job.
    async with WorkerCluster(tmp_path) as c:
        request = {"prompt": "same", "seed": 7, "steps": 3, "width": 64, "height": 64}
        first = await c.wait(await c.submit(request))
        second = await c.wait(await c.submit(request))
        assert first["status"] == second["status"] == "completed"
        assert first["image_url"] != second["image_url"]
        images = [await call("GET", state["image_url"]) for state in (first, second)]
        assert all(r.code == 200 and r.body.startswith(PNG_MAGIC) for r in images)
        assert second["progress"]["value"] == second["progress"]["max"]


@pytest.mark.gen_test(timeout=30)
async def test_node_failure_ends_failed_with_the_message_and_node_type(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        c.sim.fail_next(node_type="KSampler", message="CUDA out of memory")
        prompt_id = await c.submit({"prompt": "boom", "steps": 4})
        state = await c.wait(prompt_id)
        assert state["status"] == "failed"
        assert state["error"] == "KSampler failed: CUDA out of memory"
        assert state["image_url"] is None
        result = await call("GET", f"{c.url}/result/{prompt_id}")
        assert result.code == 200 and result.json["status"] == "failed"
        assert result.json["error"] == "KSampler failed: CUDA out of memory"
        # The worker goes on: the next job completes.
        assert (await c.wait(await c.submit({"prompt": "fine", "steps": 2})))["status"] == "completed"


@pytest.mark.gen_test(timeout=30)
async def test_comfyui_rejection_is_502_with_node_errors_and_no_job(tmp_path):
    async with WorkerCluster(tmp_path, allow_raw_workflows=True) as c:
        raw = {"1": {"class_type": "NoSuchNodeClass", "inputs": {}},
               "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
        reply = await c.generate({"workflow": raw})
        assert reply.code == 502, reply
        assert "does not exist" in reply.json["error"]
        assert reply.json["node_errors"] == {}
        assert reply.json["comfyui_error"]["type"] == "invalid_prompt"

        out_of_range = {"prompt": "x", "steps": 5, "width": 64, "height": 64}
        template = c.worker.config.workflows["txt2img"].template
        raw = {k: {**v, "inputs": dict(v["inputs"])} for k, v in template.items()}
        raw["5"]["inputs"]["width"] = 100000
        reply = await c.generate({"workflow": raw})
        assert reply.code == 502, reply
        assert reply.json["node_errors"]["5"]["errors"][0]["details"] == "width"
        assert "ComfyUI rejected the workflow" in reply.json["error"]

        feed = await call("GET", f"{c.url}/jobs")
        assert feed.json["jobs"] == []
        assert reply.code == 502

        # Our own checks come first: a bad field never reaches ComfyUI.
        before = len(c.sim.submitted)
        bad = await c.generate({**out_of_range, "steps": 1000})
        assert bad.code == 400 and bad.json["field"] == "steps"
        assert len(c.sim.submitted) == before


@pytest.mark.gen_test(timeout=30)
async def test_raw_workflows_are_refused_unless_allowed(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        reply = await c.generate({"workflow": {"1": {"class_type": "SaveImage", "inputs": {}}}})
        assert reply.code == 400 and reply.json["field"] == "workflow"
        assert c.sim.submitted == []


@pytest.mark.gen_test(timeout=30)
async def test_cancel_pending_and_running_jobs(tmp_path):
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05}) as c:
        running = await c.submit({"prompt": "long", "steps": 60})
        pending = await c.submit({"prompt": "next", "steps": 60})
        await c.wait(running, "running")
        state = await c.wait(pending, predicate=lambda s: s["queue_position"] == 1)
        assert state["status"] == "pending"

        reply = await call("POST", f"{c.url}/cancel/{pending}")
        assert reply.code == 200, reply
        assert reply.json["status"] == "cancelled" and reply.json["error"] == "Cancelled by request."
        assert pending not in sim_pending_ids(c.sim)

        reply = await call("POST", f"{c.url}/cancel/{running}")
        assert reply.code == 200 and reply.json["status"] == "cancelled"
        assert running in sim_interrupted_ids(c.sim)

        again = await call("POST", f"{c.url}/cancel/{running}")
        assert again.code == 409 and again.json["status"] == "cancelled"
        assert (await call("POST", f"{c.url}/cancel/nope")).code == 404
        result = await call("GET", f"{c.url}/result/{running}")
        assert result.code == 200 and result.json == {"prompt_id": running, "status": "cancelled",
                                                      "error": "Cancelled by request.",
                                                      "completed_at": result.json["completed_at"]}
        # ComfyUI is free again: a new job runs to the end.
        assert (await c.wait(await c.submit({"prompt": "after", "steps": 2})))["status"] == "completed"


@pytest.mark.gen_test(timeout=30)
async def test_queue_positions_of_back_to_back_jobs(tmp_path):
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05}) as c:
        ids = [await c.submit({"prompt": f"job {n}", "steps": 12 if n == 0 else 2}) for n in range(3)]
        await c.wait(ids[0], "running")
        second = await c.wait(ids[1], predicate=lambda s: s["queue_position"] == 1)
        third = await c.wait(ids[2], predicate=lambda s: s["queue_position"] == 2)
        assert second["status"] == third["status"] == "pending"
        result = await call("GET", f"{c.url}/result/{ids[2]}")
        assert result.code == 202 and result.json["status"] == "pending" and result.json["queue_position"] == 2
        # As the first ends, the others move up, then all complete in order.
        await c.wait(ids[2], predicate=lambda s: s["queue_position"] == 1 or s["status"] != "pending")
        states = [await c.wait(prompt_id) for prompt_id in ids]
        assert [s["status"] for s in states] == ["completed"] * 3
        assert states[0]["completed_at"] <= states[1]["completed_at"] <= states[2]["completed_at"]


@pytest.mark.gen_test(timeout=30)
async def test_live_previews_while_running(tmp_path):
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05, "previews": True}) as c:
        prompt_id = await c.submit({"prompt": "preview me", "steps": 8})
        state = await c.wait(prompt_id, predicate=lambda s: s["preview_url"] is not None or s["status"] != "pending"
                             and s["status"] != "running")
        assert state["status"] == "running" and state["preview_url"].startswith(f"{c.url}/previews/{prompt_id}?v=")
        preview = await call("GET", state["preview_url"])
        assert preview.code == 200 and preview.headers["Content-Type"].startswith("image/")
        assert preview.headers["Cache-Control"] == "no-store" and len(preview.body) > 0
        done = await c.wait(prompt_id)
        assert done["status"] == "completed" and done["preview_url"] is None
        gone = await call("GET", f"{c.url}/previews/{prompt_id}")
        assert gone.code == 404 and "error" in gone.json


SLOW_NOISE = {  # recordings/workflow_slow_noise.json, faster
    "1": {"class_type": "SlowNoiseImage",
          "inputs": {"width": 64, "height": 64, "seed": 1, "steps": 3, "step_seconds": 0.02, "fail": False}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t2i"}},
}
EMPTY_IMAGE = {  # recordings/workflow_empty_image.json: nodes without a progress bar
    "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 16711680}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t2i_empty"}},
}


@pytest.mark.gen_test(timeout=30)
async def test_raw_recorded_workflows_run_when_allowed(tmp_path):
    async with WorkerCluster(tmp_path, allow_raw_workflows=True) as c:
        for workflow in (SLOW_NOISE, EMPTY_IMAGE, SLOW_NOISE):
            state = await c.wait(await c.submit({"workflow": workflow}))
            assert state["status"] == "completed", state
            assert state["workflow"] == "(raw)" and state["seed"] is None
            image = await call("GET", state["image_url"])
            assert image.code == 200 and image.body.startswith(PNG_MAGIC)
        # Every job saved under its own prefix in ComfyUI, so the cached third run made a new file too.
        assert [p["2"]["inputs"]["filename_prefix"] for _, p, _ in c.sim.submitted] == [
            f"t2i_{prompt_id}" for prompt_id, _, _ in c.sim.submitted]


@pytest.mark.gen_test(timeout=30)
async def test_partially_invalid_workflow_is_refused_and_withdrawn(tmp_path):
    # ComfyUI answers 200 with node_errors and runs only the valid output; t2i refuses it (502).
    async with WorkerCluster(tmp_path, allow_raw_workflows=True) as c:
        workflow = {**SLOW_NOISE, "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "t2i_broken"}}}
        reply = await c.generate({"workflow": workflow})
        assert reply.code == 502, reply
        assert reply.json["node_errors"]["3"]["errors"][0]["type"] == "required_input_missing"
        assert "accepted only part of the workflow" in reply.json["error"]
        prompt_id = c.sim.submitted[-1][0]
        assert prompt_id not in sim_pending_ids(c.sim) and (prompt_id in sim_interrupted_ids(c.sim))
        assert (await call("GET", f"{c.url}/jobs")).json["jobs"] == []


@pytest.mark.gen_test(timeout=30)
async def test_messages_that_beat_the_post_reply_find_their_job(tmp_path, monkeypatch):
    # ComfyUI may send a whole (cached) run before its POST /prompt reply (b_cached_rerun, g_prompt_id).
    # Hold every reply until ComfyUI has finished the run: all its messages come first.
    from t2i.comfyui import ComfyUIClient

    original = ComfyUIClient.submit
    sim_box = []

    async def late_reply(self, prompt_id, workflow, client_id):
        reply = await original(self, prompt_id, workflow, client_id)
        for _ in range(500):
            if prompt_id in sim_box[0].history:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        return reply

    monkeypatch.setattr(ComfyUIClient, "submit", late_reply)
    async with WorkerCluster(tmp_path) as c:
        sim_box.append(c.sim)
        request = {"prompt": "cached", "seed": 3, "steps": 2}
        for _ in range(2):  # the second run is cached in ComfyUI except for the save node
            prompt_id = await c.submit(request)
            # Every message came before the reply, so nothing more will arrive over the websocket:
            # it completes from them (the 20 s full reconcile would be far too late for this wait).
            state = await c.wait(prompt_id, timeout=5)
            assert state["status"] == "completed", state
            assert (await call("GET", state["image_url"])).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_images_come_from_executed_messages_when_history_lacks_them(tmp_path, monkeypatch):
    from t2i.comfyui import ComfyUIClient

    async def no_history(self, prompt_id):
        return None  # deleted by another client, or evicted (PROTOCOL §5)

    monkeypatch.setattr(ComfyUIClient, "history", no_history)
    async with WorkerCluster(tmp_path) as c:
        state = await c.wait(await c.submit({"prompt": "x", "steps": 2}))
        assert state["status"] == "completed", state
        assert (await call("GET", state["image_url"])).body.startswith(PNG_MAGIC)
