"""One request from submit to the picture: ``GET /result/{id}?wait=S`` with ``Accept: image/*`` answers
with the image's bytes themselves once the job's run has succeeded and its image is fetched from ComfyUI,
without waiting for the worker's own disk write (the worker's own route)."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

import pytest

from support.cluster import WorkerCluster, call, start_sim, start_worker

IMAGE = {"Accept": "image/*"}


@pytest.mark.gen_test(timeout=30)
async def test_accept_image_answers_with_the_bytes_once_the_job_completes(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        prompt_id = (await c.generate({"prompt": "a lighthouse", "steps": 3})).json["prompt_id"]
        reply = await call("GET", f"{c.url}/result/{prompt_id}?wait=30", headers=IMAGE)
        assert reply.code == 200, reply
        assert reply.headers["Content-Type"] == "image/png"
        assert reply.headers["Vary"] == "Accept"
        state = (await call("GET", f"{c.url}/result/{prompt_id}?wait=30")).json  # the end, as JSON
        assert state["status"] == "completed"
        assert reply.headers["Content-Location"] == state["image_url"]
        assert reply.body == (await call("GET", state["image_url"])).body
        assert reply.body.startswith(b"\x89PNG")
        # Its ETag is the image's unique name (not a hash of its bytes), and a client holding it gets a 304.
        name = state["image_url"].rsplit("/", 1)[1]
        assert reply.headers["Etag"] == f'"{name}"'
        again = await call("GET", f"{c.url}/result/{prompt_id}", headers={**IMAGE, "If-None-Match": f'"{name}"'})
        assert again.code == 304 and not again.body


@pytest.mark.gen_test(timeout=30)
async def test_only_an_image_type_first_in_accept_gets_the_image(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        prompt_id = (await c.generate({"prompt": "a fox", "steps": 2})).json["prompt_id"]
        assert (await call("GET", f"{c.url}/result/{prompt_id}?wait=30")).json["status"] == "completed"
        for accept in ("image/png", "IMAGE/*;q=0.9, application/json;q=0.5"):
            reply = await call("GET", f"{c.url}/result/{prompt_id}", headers={"Accept": accept})
            assert reply.code == 200 and reply.body.startswith(b"\x89PNG"), accept
        # A browser's page load (text/html first), any type, JSON, or no Accept at all: the JSON answer.
        for headers in ({"Accept": "text/html,application/xhtml+xml,image/avif,image/webp,*/*;q=0.8"},
                        {"Accept": "*/*"}, {"Accept": "application/json"}, {}):
            reply = await call("GET", f"{c.url}/result/{prompt_id}", headers=headers)
            assert reply.code == 200 and reply.json["status"] == "completed", headers
            assert reply.headers["Content-Type"].startswith("application/json")
        # ?redirect=image still redirects, whatever Accept says.
        moved = await call("GET", f"{c.url}/result/{prompt_id}?redirect=image", headers=IMAGE)
        assert moved.code == 303


@pytest.mark.gen_test(timeout=30)
async def test_accept_image_for_a_job_without_an_image_is_the_json_answer(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        c.sim.fail_next("KSampler", "CUDA out of memory")
        failed = (await c.generate({"prompt": "boom", "steps": 2})).json["prompt_id"]
        reply = await call("GET", f"{c.url}/result/{failed}?wait=30", headers=IMAGE)
        assert reply.code == 200 and reply.json["status"] == "failed" and "CUDA" in reply.json["error"]
        assert (await call("GET", f"{c.url}/result/unknown-id", headers=IMAGE)).code == 404
        c.sim.stall = True
        running = (await c.generate({"prompt": "held", "steps": 3})).json["prompt_id"]
        early = await call("GET", f"{c.url}/result/{running}?wait=0", headers=IMAGE)
        assert early.code == 202 and early.json["status"] in ("pending", "running")
        c.sim.stall = False


@pytest.mark.gen_test(timeout=40)
async def test_the_image_comes_from_disk_after_a_restart_and_json_once_the_file_is_gone(tmp_path):
    sim = await start_sim(step_time=0.02)
    worker = await start_worker(tmp_path, sim.url)
    try:
        await worker.runner.comfy.wait_connected(5)
        prompt_id = (await call("POST", f"{worker.url}/generate", {"prompt": "kept", "steps": 2})).json["prompt_id"]
        first = await call("GET", f"{worker.url}/result/{prompt_id}?wait=30", headers=IMAGE)
        assert first.code == 200 and first.body.startswith(b"\x89PNG")
        await worker.stop()
        worker = await start_worker(tmp_path, sim.url)  # same journal and images/, nothing in memory
        again = await call("GET", f"{worker.url}/result/{prompt_id}", headers=IMAGE)
        assert again.code == 200 and again.body == first.body
        for path in (tmp_path / "images").iterdir():
            path.unlink()
        gone = await call("GET", f"{worker.url}/result/{prompt_id}", headers=IMAGE)
        assert gone.code == 200 and gone.json["status"] == "completed"
    finally:
        await worker.stop()
        await sim.stop()


@contextmanager
def disk_writes_held(images, fail: bool = False):
    """The worker's image writes (on its executor thread) wait until the block ends, then go on or fail."""
    gate = threading.Event()
    write = images._write

    def held(name, data):
        gate.wait(30)
        if fail:
            raise OSError(28, "No space left on device")
        write(name, data)

    images._write = held
    try:
        yield
    finally:
        gate.set()
        images._write = write


@pytest.mark.gen_test(timeout=30)
async def test_the_image_comes_while_the_worker_still_writes_it(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        images = c.worker.runner.images
        with disk_writes_held(images):
            prompt_id = await c.submit({"prompt": "a quick heron", "steps": 2})
            as_json = asyncio.ensure_future(call("GET", f"{c.url}/result/{prompt_id}?wait=30"))
            reply = await call("GET", f"{c.url}/result/{prompt_id}?wait=30", headers=IMAGE)
            assert reply.code == 200 and reply.body.startswith(b"\x89PNG"), reply
            name = reply.headers["Content-Location"].rsplit("/", 1)[1]
            assert reply.headers["Etag"] == f'"{name}"'
            # Not completed yet: its file is not written, and the JSON waiter waits on for the end.
            assert not (images.directory / name).exists()
            assert (await call("GET", f"{c.url}/status/{prompt_id}")).json["status"] == "running"
            assert not as_json.done()
        done = await as_json
        assert done.code == 200 and done.json["status"] == "completed", done
        assert (await call("GET", done.json["image_url"])).body == reply.body


@pytest.mark.gen_test(timeout=30)
async def test_an_image_whose_write_fails_is_forgotten_and_the_job_fails(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        images = c.worker.runner.images
        with disk_writes_held(images, fail=True):
            prompt_id = await c.submit({"prompt": "a full disk", "steps": 2})
            reply = await call("GET", f"{c.url}/result/{prompt_id}?wait=30", headers=IMAGE)
            assert reply.code == 200 and reply.body.startswith(b"\x89PNG"), reply
            name = reply.headers["Content-Location"].rsplit("/", 1)[1]
        state = (await call("GET", f"{c.url}/result/{prompt_id}?wait=30", headers=IMAGE)).json
        assert state["status"] == "failed" and "No space left" in state["error"], state
        assert images.fresh(name) is None and c.worker.runner.image_in_hand(prompt_id) is None
        assert (await call("GET", f"{c.url}/images/{name}")).code == 404
