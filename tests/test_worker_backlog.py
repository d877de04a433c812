"""The worker's own queue: ComfyUI is kept `ahead` prompts deep, the rest wait (journaled) on the worker."""

from __future__ import annotations

import pytest

from support.cluster import WorkerCluster, call, sim_interrupted_ids, sim_pending_ids, start_worker


def _in_comfyui(sim) -> set[str]:
    return {item[1] for item in sim.queue_running} | set(sim_pending_ids(sim))


@pytest.mark.gen_test(timeout=30)
async def test_jobs_beyond_ahead_wait_on_the_worker_with_true_positions_and_go_on_in_order(tmp_path):
    async with WorkerCluster(tmp_path, comfyui={"ahead": 1}, backlog=2) as c:
        c.sim.stall = True
        first = await c.submit({"prompt": "first", "steps": 2})
        await c.wait(first, "running")
        second = await c.submit({"prompt": "second", "steps": 2})
        third = await c.submit({"prompt": "third", "steps": 2})
        assert _in_comfyui(c.sim) == {first}  # one ahead: the others are the worker's
        states = [(await call("GET", f"{c.url}/status/{p}")).json for p in (second, third)]
        assert [(s["status"], s["queue_position"]) for s in states] == [("pending", 1), ("pending", 2)]

        full = await call("POST", f"{c.url}/generate", {"prompt": "fourth", "steps": 2})
        assert full.code == 503 and "queue is full" in full.json["error"] and full.headers["Retry-After"]

        cancelled = await call("POST", f"{c.url}/cancel/{third}")
        assert cancelled.code == 200 and cancelled.json["status"] == "cancelled"
        assert third not in sim_interrupted_ids(c.sim)  # nothing to undo in ComfyUI

        c.sim.stall = False
        for prompt_id in (first, second):
            assert (await c.wait(prompt_id))["status"] == "completed"
        order = [prompt_id for prompt_id, _, _ in c.sim.submitted]
        assert order == [first, second]  # the worker's queue went on in order, the cancelled one never


@pytest.mark.gen_test(timeout=30)
async def test_the_worker_queue_survives_a_restart(tmp_path):
    async with WorkerCluster(tmp_path, comfyui={"ahead": 1}) as c:
        c.sim.stall = True
        first = await c.submit({"prompt": "first", "steps": 2})
        await c.wait(first, "running")
        waiting = [await c.submit({"prompt": f"waiting {i}", "steps": 2}) for i in range(2)]
        await c.worker.stop()
        c.worker = await start_worker(tmp_path, c.sim.url, comfyui={"ahead": 1})
        await c.worker.runner.comfy.wait_connected(5)
        states = [(await call("GET", f"{c.url}/status/{p}")).json for p in waiting]
        assert [s["status"] for s in states] == ["pending", "pending"]
        c.sim.stall = False
        for prompt_id in [first, *waiting]:
            assert (await c.wait(prompt_id))["status"] == "completed"
        assert [p for p, _, _ in c.sim.submitted] == [first, *waiting]


@pytest.mark.gen_test(timeout=30)
async def test_health_reports_the_steps_left_and_the_measured_speed(tmp_path):
    """What a scheduler needs to place a job where it finishes first."""
    async with WorkerCluster(tmp_path, comfyui={"ahead": 1}, backlog=5) as c:
        # capacity: the jobs it holds at most, one in ComfyUI and 5 in its own queue
        assert (await call("GET", f"{c.url}/health")).json["load"] == {"steps": 0, "seconds_per_step": None,
                                                                       "seconds_per_job": None, "capacity": 6}
        for n in range(3):  # the speed is reported once a few jobs have been seen
            done = await c.submit({"prompt": f"measure {n}", "steps": 4})
            assert (await c.wait(done))["status"] == "completed"
            seen = (await call("GET", f"{c.url}/health")).json["load"]
            assert (seen["seconds_per_step"] is None) == (seen["seconds_per_job"] is None) == (n < 2)
        # Jobs of one size tell no fixed part from the per-step one (t2i/worker/speed.py): all per-step.
        assert seen["seconds_per_job"] == 0.0 and seen["seconds_per_step"] > 0
        c.sim.stall = True
        running = await c.submit({"prompt": "a", "steps": 6})
        await c.wait(running, "running")
        await c.submit({"prompt": "b", "steps": 10})  # waits in the worker's own queue
        load = (await call("GET", f"{c.url}/health")).json["load"]
        assert load["steps"] == 16 and load["seconds_per_step"] > 0
        c.sim.stall = False
