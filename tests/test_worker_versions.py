"""A job's version moves only when what ``/status`` shows moves: a transition it would show the same (a node
starting, which only restarts the stall watchdog; the start of copying the images; ComfyUI taking the
job) wakes no long-poll and no feed follower (issue 15: CPU per job)."""

from __future__ import annotations

import pytest

from support.cluster import WorkerCluster, call, wait_status
from t2i.worker.jobs import FINISHING, PHASE_STATUS, SHOWN_FIELDS, STARTED, Job


@pytest.mark.gen_test(timeout=30)
async def test_a_change_status_would_show_the_same_makes_no_new_version(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        c.sim.stall = True  # the job runs and then holds still: only the test's messages move it
        prompt_id = (await c.generate({"prompt": "a", "steps": 3})).json["prompt_id"]
        await wait_status(c.url, prompt_id, predicate=lambda s: s["status"] == "running")
        runner, store = c.worker.runner, c.worker.store
        before = store.get(prompt_id)
        version, active_at = before.version, before.active_at

        runner.on_message("executing", {"node": "8", "display_node": "8", "prompt_id": prompt_id})
        job = store.get(prompt_id)
        assert job.active_at > active_at  # the watchdog started again
        assert job.version == version and store.seq >= version  # and nobody was woken for it
        parked = await call("GET", f"{c.url}/status/{prompt_id}?wait=0&since={version}")
        assert parked.json["version"] == version

        runner.on_message("progress", {"value": 2, "max": 3, "prompt_id": prompt_id, "node": "3"})
        assert store.get(prompt_id).version > version  # progress shows: a new version
        c.sim.stall = False
        assert (await wait_status(c.url, prompt_id))["status"] == "completed"


@pytest.mark.gen_test(timeout=30)
async def test_a_phase_change_within_running_keeps_the_version_and_a_new_status_does_not(tmp_path):
    async with WorkerCluster(tmp_path) as c:
        c.sim.stall = True
        prompt_id = (await c.generate({"prompt": "b", "steps": 3})).json["prompt_id"]
        await wait_status(c.url, prompt_id, predicate=lambda s: s["status"] == "running")
        runner, store = c.worker.runner, c.worker.store
        assert store.get(prompt_id).phase == STARTED
        version = store.get(prompt_id).version
        # `executing` with no node: the run is over, its history is read next (still "running" to clients).
        runner.on_message("executing", {"node": None, "prompt_id": prompt_id})
        job = store.get(prompt_id)
        assert job.phase == FINISHING and job.version == version
        # The double holds the prompt (stalled), so it has no history entry: the job fails, and that shows.
        ended = await wait_status(c.url, prompt_id)
        assert ended["status"] == "failed" and ended["version"] > version
        c.sim.stall = False


def test_what_is_written_in_place_is_nothing_status_shows():
    """Every field outside jobs.SHOWN_FIELDS (and the phase within one status, attempt 0 -> 1) leaves a
    job's /status the same: a field added to Job.to_json must be added there too."""
    job = Job("p-1", 1_795_805_000.0, workflow="txt2img", seed=7, phase=STARTED, params={"steps": 3},
              progress_value=1, progress_max=3, started_at=1_795_805_001.0, webhook={"state": "pending", "attempts": 0,
                                                                                     "last_error": None})
    shown = job.to_json("http://w")
    for name in Job.__slots__:
        if name in SHOWN_FIELDS or name in ("phase", "attempt", "version"):
            continue
        assert job.evolve(**{name: object()}).to_json("http://w") == shown, name
    for phase, status in PHASE_STATUS.items():
        if status == job.status:
            assert job.evolve(phase=phase).to_json("http://w") == shown, phase
    assert job.evolve(attempt=0).to_json("http://w") == job.evolve(attempt=1).to_json("http://w")
