"""One request to the result through the scheduler: ``GET /result/{id}?wait=S`` and ``?redirect=image``."""

from __future__ import annotations

import pytest

from support.cluster import call, start_scheduler, start_sim, start_worker, wait_status
from support.timing import until


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


@pytest.mark.gen_test(timeout=40)
async def test_an_image_asked_of_the_scheduler_is_sent_to_the_worker_that_has_it(tmp_path):
    sim = await start_sim(step_time=0.05)
    worker = await start_worker(tmp_path / "w", sim.url)
    scheduler = await start_scheduler(tmp_path / "s", [worker])
    image = {"Accept": "image/*"}
    try:
        await worker.runner.comfy.wait_connected(5)
        prompt_id = (await call("POST", f"{scheduler.url}/generate", {"prompt": "x", "steps": 10})).json["prompt_id"]
        # Unfinished: the same request, at the job's worker, which answers with the image when it has it.
        moved = await call("GET", f"{scheduler.url}/result/{prompt_id}?wait=30", headers=image)
        assert moved.code == 307, moved
        assert moved.headers["Location"] == f"{worker.url}/result/{prompt_id}?wait=30"
        assert moved.headers["Vary"] == "Accept"
        picture = await call("GET", moved.headers["Location"], headers=image)
        assert picture.code == 200 and picture.body.startswith(b"\x89PNG"), picture
        # Completed: still the worker's to answer (it serves the image; this scheduler holds none).
        await wait_status(worker.url, prompt_id)
        again = await call("GET", f"{scheduler.url}/result/{prompt_id}", headers=image)
        assert again.code == 307 and again.headers["Location"] == f"{worker.url}/result/{prompt_id}"
        # Ended without an image, or unknown: the JSON answer, as without Accept.
        sim.fail_next("KSampler", "CUDA out of memory")
        failed = (await call("POST", f"{scheduler.url}/generate", {"prompt": "y", "steps": 2})).json["prompt_id"]
        await wait_status(worker.url, failed)
        reply = await call("GET", f"{scheduler.url}/result/{failed}?wait=10", headers=image)
        assert reply.code == 200 and reply.json["status"] == "failed", reply
        unknown = await call("GET", f"{scheduler.url}/result/00000000-0000-4000-8000-000000000000", headers=image)
        assert unknown.code == 404 and "error" in unknown.json
        # Its worker unreachable: not sent to a refused connection, but answered here as without Accept.
        await worker.stop()
        await until(lambda: not scheduler.mirror.feed_up(worker.config.name), what="the feed to go down")
        down = await call("GET", f"{scheduler.url}/result/{prompt_id}", headers=image)
        assert down.code == 200 and down.json["status"] == "completed", down
    finally:
        await scheduler.stop()
        await worker.stop()
        await sim.stop()
