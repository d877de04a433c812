"""Faults around a worker: ComfyUI restarts, drops its websocket, is down, stalls; the disk fills up."""

import errno

import pytest

from support.cluster import (WorkerCluster, call, sim_interrupted_ids, sim_pending_ids, start_sim, start_worker,
                             wait_status)
from support.net import free_port
from support.timing import until
from t2i.worker.images import ImageStore
from t2i.worker import lifecycle as lc
from t2i.worker.runner import Runner


@pytest.mark.gen_test(timeout=30)
async def test_comfyui_restart_mid_job_resubmits_the_lost_jobs(tmp_path):
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05}) as c:
        running = await c.submit({"prompt": "long", "steps": 30})
        pending = await c.submit({"prompt": "queued", "steps": 30})
        await c.wait(running, "running")
        old_client = c.worker.runner.comfy.client_id
        await c.sim.restart()  # ComfyUI forgets its queue and history (PROTOCOL §9)
        for prompt_id in (running, pending):
            state = await c.wait(prompt_id)
            assert state["status"] == "completed", state
            assert state["attempt"] == 2 and state["error"] is None
            assert (await call("GET", state["image_url"])).code == 200
        # The same prompt_ids went to the new ComfyUI, under a fresh clientId.
        assert {running, pending} <= {prompt_id for prompt_id, _, _ in c.sim.submitted}
        assert c.worker.runner.comfy.client_id != old_client
        metrics = (await call("GET", f"{c.url}/metrics")).body
        assert b't2i_comfyui_ws_reconnects_total{worker="gpu-a"}' in metrics
        assert b't2i_jobs_resubmitted_total{worker="gpu-a"} 2.0' in metrics


@pytest.mark.gen_test(timeout=30)
async def test_a_job_that_crashes_comfyui_every_time_fails_after_max_resubmits(tmp_path):
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05}, comfyui={"max_resubmits": 1}) as c:
        prompt_id = await c.submit({"prompt": "poison", "steps": 30})
        for attempt in (1, 2):
            await c.wait(prompt_id, predicate=lambda s, a=attempt: s["status"] == "running" and s["attempt"] == a)
            await c.sim.restart()  # as if this workflow took ComfyUI down with it
        state = await c.wait(prompt_id)
        assert state["status"] == "failed" and state["attempt"] == 2
        assert state["error"] == lc.lost_sentence(1) and "giving up" in state["error"]


@pytest.mark.gen_test(timeout=30)
async def test_with_no_resubmits_a_lost_job_fails_at_once(tmp_path):
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05}, comfyui={"max_resubmits": 0}) as c:
        prompt_id = await c.submit({"prompt": "long", "steps": 30})
        await c.wait(prompt_id, "running")
        await c.sim.restart()
        state = await c.wait(prompt_id)
        assert state["status"] == "failed"
        assert state["error"] == "ComfyUI lost this job (it restarted or its queue was cleared)."


@pytest.mark.gen_test(timeout=30)
async def test_websocket_drop_mid_run_still_completes_through_reconcile(tmp_path, monkeypatch):
    # ComfyUI sends the rest of the run to the old clientId, which nobody holds: only /history tells.
    monkeypatch.setattr(Runner, "reconcile_interval", 0.3)
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05}) as c:
        prompt_id = await c.submit({"prompt": "keep going", "steps": 20})
        await c.wait(prompt_id, predicate=lambda s: (s["progress"] or {}).get("value", 0) >= 2)
        old_client = c.worker.runner.comfy.client_id
        c.sim.drop_websockets()
        state = await c.wait(prompt_id)
        assert state["status"] == "completed", state
        assert c.worker.runner.comfy.client_id != old_client
        assert state["progress"] == {"value": 20, "max": 20}
        assert (await call("GET", state["image_url"])).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_comfyui_down_at_submit_is_503_then_recovers(tmp_path):
    port = free_port()
    worker = await start_worker(tmp_path, f"http://127.0.0.1:{port}")
    sim = None
    try:
        reply = await call("POST", f"{worker.url}/generate", {"prompt": "x"})
        assert reply.code == 503, reply
        assert reply.headers["Retry-After"] and "ComfyUI is not reachable" in reply.json["error"]
        health = await call("GET", f"{worker.url}/health")
        assert health.code == 503 and health.json["ok"] is False
        assert health.json["comfyui"]["reachable"] is False and health.json["comfyui"]["error"]
        assert (await call("GET", f"{worker.url}/jobs")).json["jobs"] == []

        sim = await start_sim(step_time=0.02, port=port)
        assert await worker.runner.comfy.wait_connected(12)
        prompt_id = (await call("POST", f"{worker.url}/generate", {"prompt": "x", "steps": 2})).json["prompt_id"]
        assert (await wait_status(worker.url, prompt_id))["status"] == "completed"
        worker.runner.probe.ttl = 0
        health = await call("GET", f"{worker.url}/health")
        assert health.code == 200 and health.json["comfyui"]["websocket_connected"] is True
    finally:
        await worker.stop()
        if sim is not None:
            await sim.stop()


@pytest.mark.gen_test(timeout=30)
async def test_job_timeout_interrupts_in_comfyui_and_fails(tmp_path):
    async with WorkerCluster(tmp_path, job_timeout=1) as c:
        c.sim.stall = True
        prompt_id = await c.submit({"prompt": "stuck", "steps": 3})
        state = await c.wait(prompt_id)
        assert state["status"] == "failed" and state["error"] == "Timed out after 1 s."
        await until(lambda: prompt_id in sim_interrupted_ids(c.sim), what="the targeted interrupt")
        assert prompt_id not in sim_pending_ids(c.sim)
        c.sim.stall = False


@pytest.mark.gen_test(timeout=30)
async def test_a_job_stuck_in_the_queue_times_out_after_the_queue_allowance(tmp_path, monkeypatch):
    """Someone else's prompt hangs in ComfyUI: ours waits QUEUE_TIMEOUT_FACTOR x job_timeout, then fails."""
    import json
    from pathlib import Path

    from t2i.worker import runner

    monkeypatch.setattr(runner, "QUEUE_TIMEOUT_FACTOR", 2)
    workflow = json.loads((Path(__file__).parent / "recordings" / "workflow_slow_noise_long.json").read_text())
    async with WorkerCluster(tmp_path, job_timeout=1) as c:
        c.sim.stall = True
        foreign = await call("POST", f"{c.sim.url}/prompt", {"prompt": workflow})  # not t2i's, never times out
        assert foreign.code == 200
        prompt_id = await c.submit({"prompt": "behind a hung prompt", "steps": 3})
        state = await c.wait(prompt_id)
        assert state["status"] == "failed", state
        assert state["error"] == "Timed out after 2 s in ComfyUI's queue without starting."
        await until(lambda: prompt_id not in sim_pending_ids(c.sim), what="withdrawn from ComfyUI's queue")
        c.sim.stall = False


@pytest.mark.gen_test(timeout=30)
async def test_disk_full_fails_the_job_and_the_worker_keeps_serving(tmp_path, monkeypatch):
    def no_space(self, name, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    async with WorkerCluster(tmp_path) as c:
        with monkeypatch.context() as patch:
            patch.setattr(ImageStore, "_write", no_space)
            state = await c.wait(await c.submit({"prompt": "x", "steps": 2}))
        assert state["status"] == "failed"
        assert state["error"] == "Could not save the image: [Errno 28] No space left on device"
        assert list((tmp_path / "images").iterdir()) == []
        assert (await c.wait(await c.submit({"prompt": "y", "steps": 2})))["status"] == "completed"


@pytest.mark.gen_test(timeout=30)
async def test_cancel_while_comfyui_is_down_is_503_and_changes_nothing(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        c.sim.stall = True
        prompt_id = await c.submit({"prompt": "x", "steps": 3})
        await c.sim.stop()
        reply = await call("POST", f"{c.url}/cancel/{prompt_id}")
        assert reply.code == 503 and reply.headers["Retry-After"]
        assert "not stopped" in reply.json["error"]
        assert (await call("GET", f"{c.url}/status/{prompt_id}")).json["status"] in ("pending", "running")


@pytest.mark.gen_test(timeout=30)
async def test_job_dropped_from_comfyuis_queue_by_someone_else_is_resubmitted_then_fails(tmp_path, monkeypatch):
    # No message says so; the periodic check of every unfinished job notices. ComfyUI "lost" it:
    # submitted again once (max_resubmits 1), and when it is dropped again, it fails.
    monkeypatch.setattr(Runner, "reconcile_interval", 0.2)
    monkeypatch.setattr(Runner, "full_reconcile_interval", 0.2)
    async with WorkerCluster(tmp_path) as c:
        c.sim.stall = True
        running = await c.submit({"prompt": "a", "steps": 3})
        pending = await c.submit({"prompt": "b", "steps": 3})
        await c.wait(pending, predicate=lambda s: s["queue_position"] == 1)
        assert (await call("POST", f"{c.sim.url}/queue", {"clear": True})).code == 200
        await c.wait(pending, predicate=lambda s: s["attempt"] == 2 and s["queue_position"] == 1)
        assert pending in sim_pending_ids(c.sim)
        assert (await call("POST", f"{c.sim.url}/queue", {"clear": True})).code == 200
        state = await c.wait(pending)
        assert state["status"] == "failed" and "ComfyUI lost this job again" in state["error"]
        assert (await call("GET", f"{c.url}/status/{running}")).json["status"] == "running"
        c.sim.stall = False
        assert (await c.wait(running))["status"] == "completed"


@pytest.mark.gen_test(timeout=30)
async def test_interrupt_by_someone_else_fails_the_job(tmp_path):
    # e_interrupt: a global POST /interrupt (another ComfyUI client) stops whatever runs.
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05}) as c:
        prompt_id = await c.submit({"prompt": "x", "steps": 40})
        await c.wait(prompt_id, "running")
        assert (await call("POST", f"{c.sim.url}/interrupt")).code == 200
        state = await c.wait(prompt_id)
        assert state["status"] == "failed" and "interrupted in ComfyUI" in state["error"]
        assert (await c.wait(await c.submit({"prompt": "y", "steps": 2})))["status"] == "completed"


@pytest.mark.gen_test(timeout=30)
async def test_health_is_503_while_comfyuis_websocket_is_down(tmp_path):
    """HTTP answers but the websocket does not: the worker cannot follow jobs, so it is not ok."""
    async with WorkerCluster(tmp_path) as c:
        healthy = await call("GET", f"{c.url}/health")
        assert healthy.code == 200 and healthy.json["comfyui"]["websocket_connected"] is True
        comfy = c.worker.runner.comfy
        comfy.ws_url = comfy.ws_url.replace("/ws", "/no-such-ws")  # reconnects now fail with 404
        c.sim.drop_websockets()
        c.worker.runner.probe.ttl = 0
        broken = await call("GET", f"{c.url}/health")
        assert broken.code == 503 and broken.json["ok"] is False
        assert broken.json["comfyui"]["reachable"] is True
        assert broken.json["comfyui"]["websocket_connected"] is False
        assert "websocket" in broken.json["comfyui"]["error"]


@pytest.mark.gen_test(timeout=30)
async def test_a_stalled_comfyui_fails_the_job_and_the_worker_is_unhealthy_until_it_moves(tmp_path):
    async with WorkerCluster(tmp_path, comfyui={"stall_timeout": 0.5}) as c:
        c.worker.runner.probe.ttl = 0
        prompt_id = await c.submit({"prompt": "hangs", "steps": 40})
        await c.wait(prompt_id, predicate=lambda s: (s["progress"] or {}).get("value", 0) >= 1)
        c.sim.stall = True  # the websocket stays open; nothing moves
        state = await c.wait(prompt_id)
        assert state["status"] == "failed" and state["error"] == "ComfyUI made no progress for 0.5 s."
        await until(lambda: prompt_id in sim_interrupted_ids(c.sim), what="the targeted interrupt")
        health = await call("GET", f"{c.url}/health")
        assert health.code == 503 and health.json["ok"] is False
        assert health.json["comfyui"]["stalled"] is True and "no progress" in health.json["comfyui"]["error"]
        refused = await call("POST", f"{c.url}/generate", {"prompt": "x"})
        assert refused.code == 503 and "no progress" in refused.json["error"] and refused.headers["Retry-After"]

        c.sim.stall = False  # ComfyUI moves: the interrupt lands, the queue runs
        await until(lambda: _healthy(c.url), what="healthy again")
        assert (await c.wait(await c.submit({"prompt": "after", "steps": 2})))["status"] == "completed"
        metrics = (await call("GET", f"{c.url}/metrics")).body
        assert b't2i_comfyui_stalls_total{worker="gpu-a"} 1.0' in metrics


@pytest.mark.gen_test(timeout=30)
async def test_comfyui_gone_mid_job_is_reported_at_once_and_the_job_resumes_when_it_is_back(tmp_path):
    async with WorkerCluster(tmp_path, sim={"step_time": 0.05}) as c:
        prompt_id = await c.submit({"prompt": "interrupted by an outage", "steps": 30})
        await c.wait(prompt_id, "running")
        port = c.sim.port
        await c.sim.stop()  # the process is gone: connections are refused
        state = await c.wait(prompt_id, predicate=lambda s: s["error"] is not None)
        assert state["status"] == "running" and "ComfyUI is not reachable" in state["error"]
        await c.sim.start(port=port)  # back, with an empty queue and history
        state = await c.wait(prompt_id)
        assert state["status"] == "completed" and state["error"] is None and state["attempt"] == 2


async def _healthy(url: str) -> bool:
    return (await call("GET", f"{url}/health")).code == 200
