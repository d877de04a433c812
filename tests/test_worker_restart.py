"""A worker restarted or killed at any moment loses no job it had accepted (real processes, real SQLite).

The worker runs as ``python -m t2i.worker``; the ComfyUI test double runs in the test's
own loop, so it keeps running (and finishing prompts) while the worker is down, as the
real ComfyUI does.
"""

from __future__ import annotations

import os
import time

import pytest

from support.cluster import call, start_scheduler, start_sim, wait_status, write_worker_yaml
from support.net import free_port
from support.processes import WorkerProcess
from support.timing import until

FINAL = ("completed", "failed", "cancelled")


async def _worker(tmp_path, sim, **overrides) -> WorkerProcess:
    port = free_port()
    config = write_worker_yaml(tmp_path / "worker", sim.url, port=port, **overrides)
    return WorkerProcess(config, f"http://127.0.0.1:{port}")


async def _submit(url: str, prompt: str, steps: int) -> str:
    reply = await call("POST", f"{url}/generate", {"prompt": prompt, "steps": steps})
    assert reply.code == 200, reply
    return reply.json["prompt_id"]


async def _image_served(state: dict) -> bool:
    reply = await call("GET", state["image_url"])
    return reply.code == 200 and reply.body.startswith(b"\x89PNG")


@pytest.mark.gen_test(timeout=90)
async def test_sigkill_mid_run_loses_nothing_through_worker_and_scheduler(tmp_path):
    sim = await start_sim(step_time=0.03)
    worker = await _worker(tmp_path, sim)
    scheduler = None
    try:
        await worker.start()
        scheduler = await start_scheduler(tmp_path / "scheduler", [], health_interval=0.2)
        (tmp_path / "scheduler" / "workers.yaml").write_text(
            f"workers:\n  - name: gpu-a\n    url: {worker.url}\n")
        done_before = await _submit(worker.url, "finished before the kill", 2)
        before = await wait_status(worker.url, done_before)
        assert before["status"] == "completed"
        running = await _submit(worker.url, "running at the kill", 40)
        queued = [await _submit(worker.url, f"queued {i}", 5) for i in range(2)]
        await wait_status(worker.url, running, predicate=lambda s: (s["progress"] or {}).get("value", 0) >= 2)
        await until(lambda: _scheduler_knows(scheduler.url, queued[-1]), what="the scheduler's mirror")

        await worker.kill()
        # While it is down the scheduler still answers from its mirror, or says the owner is unreachable.
        reply = await call("GET", f"{scheduler.url}/status/{running}")
        assert reply.code in (200, 502, 503), reply

        await worker.start()
        for prompt_id in [running, *queued]:
            state = await wait_status(worker.url, prompt_id, timeout=30)
            assert state["status"] == "completed", (state, worker.log())
            assert await _image_served(state)
            via_scheduler = await wait_status(scheduler.url, prompt_id, timeout=30)
            assert via_scheduler["status"] == "completed" and via_scheduler["image_url"] == state["image_url"]
        after = (await call("GET", f"{worker.url}/status/{done_before}")).json
        assert after["status"] == "completed" and after["image_url"] == before["image_url"]
        assert await _image_served(after)
        assert (await call("GET", f"{worker.url}/result/{done_before}")).code == 200
        # Re-attached, not run again: ComfyUI got each prompt once.
        submitted = [prompt_id for prompt_id, _, _ in sim.submitted]
        assert all(submitted.count(p) == 1 for p in [running, *queued]), submitted
        metrics = (await call("GET", f"{worker.url}/metrics")).body
        assert b"t2i_jobs_reattached_total" in metrics
    finally:
        if scheduler is not None:
            await scheduler.stop()
        await worker.close()
        await sim.stop()


async def _scheduler_knows(url: str, prompt_id: str) -> bool:
    return (await call("GET", f"{url}/status/{prompt_id}")).code == 200


@pytest.mark.gen_test(timeout=90)
async def test_jobs_comfyui_finished_while_the_worker_was_down_are_collected(tmp_path):
    """Even when their output files look old to retention: nothing uncollected is pruned."""
    sim = await start_sim(step_time=0.02)
    # ahead 3: all three go to ComfyUI at once (none waits in the worker's own queue).
    worker = await _worker(tmp_path, sim, comfyui={"output_dir": sim.output_dir, "ahead": 3},
                           retention={"image_max_age": 3600})
    try:
        await worker.start()
        ids = [await _submit(worker.url, f"made while away {i}", 10) for i in range(3)]
        await worker.kill()
        await until(lambda: all(prompt_id in sim.history for prompt_id in ids), what="ComfyUI finishing the jobs")
        two_hours_ago = time.time() - 7200
        for name in os.listdir(sim.output_dir):
            os.utime(os.path.join(sim.output_dir, name), (two_hours_ago, two_hours_ago))

        await worker.start()
        for prompt_id in ids:
            state = await wait_status(worker.url, prompt_id, timeout=30)
            assert state["status"] == "completed", (state, worker.log())
            assert await _image_served(state)
    finally:
        await worker.close()
        await sim.stop()


@pytest.mark.gen_test(timeout=90)
async def test_sigterm_exits_0_and_the_next_start_follows_the_running_job(tmp_path):
    sim = await start_sim(step_time=0.03)
    worker = await _worker(tmp_path, sim)
    try:
        await worker.start()
        prompt_id = await _submit(worker.url, "survives a deploy", 60)
        await wait_status(worker.url, prompt_id, "running")
        assert await worker.terminate() == 0, worker.log()
        assert "Traceback" not in worker.log()
        assert sim.queue_running and sim.queue_running[0][1] == prompt_id  # not withdrawn: it carries on

        await worker.start()
        state = await wait_status(worker.url, prompt_id, timeout=30)
        assert state["status"] == "completed" and state["attempt"] == 1, (state, worker.log())
        assert await _image_served(state)
    finally:
        await worker.close()
        await sim.stop()


@pytest.mark.gen_test(timeout=90)
async def test_pruned_jobs_still_answer_410_after_a_restart(tmp_path):
    sim = await start_sim(step_time=0.01)
    worker = await _worker(tmp_path, sim, retention={"task_ttl": 0, "interval": 0.2})
    try:
        await worker.start()
        prompt_id = await _submit(worker.url, "short-lived", 2)
        await until(lambda: _status_code(worker.url, prompt_id, 410), what="the job pruned")
        await worker.kill()
        await worker.start()
        reply = await call("GET", f"{worker.url}/status/{prompt_id}")
        assert reply.code == 410 and "removed it" in reply.json["error"]
    finally:
        await worker.close()
        await sim.stop()


async def _status_code(url: str, prompt_id: str, code: int) -> bool:
    return (await call("GET", f"{url}/status/{prompt_id}")).code == code


@pytest.mark.gen_test(timeout=60)
async def test_a_corrupt_journal_is_moved_aside_and_the_worker_starts_empty(tmp_path):
    sim = await start_sim(step_time=0.01)
    worker = await _worker(tmp_path, sim)
    state_dir = tmp_path / "worker" / "state"
    state_dir.mkdir(parents=True)
    (state_dir / "journal.sqlite3").write_bytes(b"this is not a database" * 100)
    try:
        await worker.start()
        aside = [p.name for p in state_dir.iterdir() if p.name.startswith("journal.sqlite3.corrupt-")]
        assert len(aside) == 1, list(state_dir.iterdir())
        assert "cannot be read" in worker.log() and "moved it to" in worker.log()
        prompt_id = await _submit(worker.url, "after the corrupt journal", 2)
        assert (await wait_status(worker.url, prompt_id))["status"] == "completed"
    finally:
        await worker.close()
        await sim.stop()


def test_an_unusable_state_dir_is_a_config_error(tmp_path):
    import subprocess
    import sys

    from support.processes import ROOT

    (tmp_path / "not-a-dir").write_text("a file")
    config = write_worker_yaml(tmp_path, "http://127.0.0.1:1", state_dir=str(tmp_path / "not-a-dir" / "state"))
    result = subprocess.run([sys.executable, "-m", "t2i.worker", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "state_dir" in lines[0] and "worker.yaml" in lines[0], result.stderr
