"""One request to the result through the scheduler: ``GET /result/{id}?wait=S`` and ``?redirect=image``."""

from __future__ import annotations

import pytest

from support.cluster import call, start_scheduler, start_sim, start_worker, wait_status


@pytest.mark.gen_test(timeout=40)
async def test_result_waits_for_the_end_and_redirects_through_the_scheduler(tmp_path):
    sim = await start_sim(step_time=0.05)
    worker = await start_worker(tmp_path / "w", sim.url)
    scheduler = await start_scheduler(tmp_path / "s", [worker])
    try:
        await worker.runner.comfy.wait_connected(5)
        placed = await call("POST", f"{scheduler.url}/generate", {"prompt": "x", "steps": 10})
        assert placed.code == 200, placed
        prompt_id = placed.json["prompt_id"]
        assert (await call("GET", f"{scheduler.url}/result/{prompt_id}")).code == 202
        done = await call("GET", f"{scheduler.url}/result/{prompt_id}?wait=30")
        assert done.code == 200 and done.json["status"] == "completed", done
        moved = await call("GET", f"{scheduler.url}/result/{prompt_id}?redirect=image&wait=1")
        assert moved.code == 303 and moved.headers["Location"] == done.json["image_url"]
        assert (await call("GET", moved.headers["Location"])).body.startswith(b"\x89PNG")
        # A failed job is answered, not redirected.
        sim.fail_next("KSampler", "CUDA out of memory")
        failed = (await call("POST", f"{scheduler.url}/generate", {"prompt": "y", "steps": 2})).json["prompt_id"]
        await wait_status(worker.url, failed)
        reply = await call("GET", f"{scheduler.url}/result/{failed}?redirect=image&wait=10")
        assert reply.code == 200 and reply.json["status"] == "failed" and "CUDA" in reply.json["error"]
    finally:
        await scheduler.stop()
        await worker.stop()
        await sim.stop()
