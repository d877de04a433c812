"""A finished job's image is fsynced off the path to the client, and ``completed`` is journaled only once
it is durable: a worker killed in between restarts with the job collecting and copies the image out of
ComfyUI again (issue 15). Real SQLite, the ComfyUI double over real sockets, the worker as a process
where the kill is the point."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from support.cluster import call, start_sim, start_worker, wait_status, write_worker_yaml
from support.net import free_port
from support.processes import WorkerProcess
from support.timing import T0
from t2i.worker.images import ImageStore
from t2i.worker.jobs import COLLECTING, COMPLETED, Job
from t2i.worker.journal import FILENAME, Journal

IMAGE = {"Accept": "image/*"}


def journaled_phase(state_dir: Path, prompt_id: str) -> str | None:
    with closing(sqlite3.connect(state_dir / FILENAME)) as db:
        row = db.execute("SELECT phase FROM jobs WHERE prompt_id = ?", (prompt_id,)).fetchone()
    return row[0] if row else None


def job(phase: str, **fields) -> Job:
    return Job("job-1", T0, workflow="txt2img", phase=phase, graph={"1": {"class_type": "SaveImage"}}, **fields)


# --- the journal holds a job's rows back ------------------------------------------------------

@pytest.mark.gen_test(timeout=10)
async def test_rows_held_back_are_written_on_release_the_newest_only(tmp_path):
    journal = Journal(tmp_path)
    await journal.open()
    try:
        journal.save(job(COLLECTING))
        await journal.flush()
        journal.hold("job-1")
        journal.save(job(COMPLETED, images=("a.png",)))
        journal.save(job(COMPLETED, images=("a.png",), webhook={"state": "pending"}))
        await journal.flush()
        assert journaled_phase(tmp_path, "job-1") == COLLECTING
        journal.release("job-1")
        await journal.flush()
        assert journaled_phase(tmp_path, "job-1") == COMPLETED
        with closing(sqlite3.connect(tmp_path / FILENAME)) as db:
            assert db.execute("SELECT webhook FROM jobs").fetchone()[0] == '{"state":"pending"}'
        # Held and then removed (retention): removed, and a release afterwards writes nothing back.
        journal.hold("job-1")
        journal.save(job(COMPLETED, images=("b.png",)))
        journal.forget(["job-1"])
        journal.release("job-1")
        await journal.flush()
        assert journaled_phase(tmp_path, "job-1") is None
    finally:
        await journal.close()


@pytest.mark.gen_test(timeout=10)
async def test_a_release_with_nothing_held_back_writes_nothing(tmp_path):
    journal = Journal(tmp_path)
    await journal.open()
    try:
        journal.hold("job-1")
        journal.release("job-1")
        await journal.flush()
        assert journaled_phase(tmp_path, "job-1") is None
        assert journal.writes == 0
    finally:
        await journal.close()


# --- the worker ------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=40)
async def test_an_image_that_cannot_be_made_durable_is_never_journaled_completed(tmp_path, monkeypatch):
    def fsync_fails(self, paths):
        raise OSError(5, "Input/output error")

    sim = await start_sim(step_time=0.02)
    worker = await start_worker(tmp_path, sim.url)
    try:
        await worker.runner.comfy.wait_connected(5)
        with monkeypatch.context() as patch:
            patch.setattr(ImageStore, "_sync", fsync_fails)
            first = (await call("POST", f"{worker.url}/generate", {"prompt": "a", "steps": 2})).json["prompt_id"]
            shown = await call("GET", f"{worker.url}/result/{first}?wait=30", headers=IMAGE)
            assert shown.code == 200 and shown.body.startswith(b"\x89PNG")  # the client had it at once
            # Answered 200 only once everything queued before is committed: the first job's rows too.
            second = await call("POST", f"{worker.url}/generate", {"prompt": "b", "steps": 2})
            assert second.code == 200
        assert journaled_phase(tmp_path / "state", first) == COLLECTING
        await worker.stop()
        worker = await start_worker(tmp_path, sim.url)  # copies it out of ComfyUI again
        state = await wait_status(worker.url, first)
        assert state["status"] == "completed"
        assert (await call("GET", state["image_url"])).body == shown.body
        assert [prompt_id for prompt_id, _, _ in sim.submitted].count(first) == 1  # not run again
    finally:
        await worker.stop()
        await sim.stop()


@pytest.mark.gen_test(timeout=90)
async def test_a_worker_killed_before_the_image_is_durable_collects_it_again(tmp_path, monkeypatch):
    # The worker's fsync of new images waits on this FIFO: the image is served, completed is not journaled.
    gate = tmp_path / "durable-gate"
    os.mkfifo(gate)
    monkeypatch.setenv("T2I_TEST_DURABLE_GATE", str(gate))
    sim = await start_sim(step_time=0.02)
    port = free_port()
    worker = WorkerProcess(write_worker_yaml(tmp_path / "worker", sim.url, port=port), f"http://127.0.0.1:{port}")
    state_dir = tmp_path / "worker" / "state"
    try:
        await worker.start()
        prompt_id = (await call("POST", f"{worker.url}/generate", {"prompt": "x", "steps": 2})).json["prompt_id"]
        shown = await call("GET", f"{worker.url}/result/{prompt_id}?wait=30", headers=IMAGE)
        assert shown.code == 200 and shown.body.startswith(b"\x89PNG")
        assert (await call("GET", f"{worker.url}/status/{prompt_id}")).json["status"] == "completed"
        # A 200 for another job means everything queued before it is committed.
        assert (await call("POST", f"{worker.url}/generate", {"prompt": "y", "steps": 2})).code == 200
        assert journaled_phase(state_dir, prompt_id) == COLLECTING
        await worker.kill()

        monkeypatch.delenv("T2I_TEST_DURABLE_GATE")
        await worker.start()
        state = await wait_status(worker.url, prompt_id, timeout=30)
        assert state["status"] == "completed", worker.log()
        assert (await call("GET", state["image_url"])).body == shown.body
        assert "finished while we were not listening" in worker.log()  # collected again, from history
        assert [p for p, _, _ in sim.submitted].count(prompt_id) == 1
        await worker.terminate()
        assert journaled_phase(state_dir, prompt_id) == COMPLETED
    finally:
        await worker.close()
        await sim.stop()
