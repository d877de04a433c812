"""Admission (issue 15, GPUs never idle while work waits): each worker takes jobs up to the capacity its
/health reports (ComfyUI's ``ahead`` + its own ``backlog``), workers.yaml ``max_queue`` caps it when set;
503 only when every worker is full, its Retry-After from when the first place is expected to free up;
a burst is placed by the real steps of jobs the feeds have not shown yet; queue positions count the
worker's own queue.

Units drive :class:`t2i.scheduler.placement.Placement` over a registry with hand-set health; the end to
end tests run real workers in front of ComfyUI doubles and a scheduler on loopback.
"""

from __future__ import annotations

import pytest

from support.cluster import SchedulerCluster, call, wait_status, worker_entry, write_workers_yaml
from support.timing import until
from t2i.scheduler.mirror import Mirror
from t2i.scheduler.placement import FALLBACK_CAPACITY, NoWorkerAvailable, Placement
from t2i.scheduler.registry import Registry
from test_scheduler_units import entry, make_placement, up


def health(capacity=None, seconds_per_step=None, steps=0):
    load = {"steps": steps, "seconds_per_step": seconds_per_step}
    if capacity is not None:
        load["capacity"] = capacity
    return {"ok": True, "load": load}


# --- units ------------------------------------------------------------------------------

def test_a_worker_takes_jobs_up_to_the_capacity_it_reports(tmp_path):
    placement, registry, loads = make_placement(tmp_path, [entry("a", 1)])
    up(registry, "a")
    a = registry.workers["a"]
    a.health = health(capacity=34)
    loads["a"] = 33
    assert placement.choose().name == "a"
    loads["a"] = 34
    with pytest.raises(NoWorkerAvailable, match=r"its queue is full \(34 of 34\)|queue is full"):
        placement.choose()
    assert placement.describe()[0]["capacity"] == 34 and placement.describe()[0]["max_queue"] is None
    # A worker that does not say (an older one, or not checked yet) gets the old default.
    a.health = {}
    loads["a"] = FALLBACK_CAPACITY - 1
    assert placement.choose().name == "a"
    loads["a"] = FALLBACK_CAPACITY
    with pytest.raises(NoWorkerAvailable):
        placement.choose()


def test_an_explicit_max_queue_still_caps_and_never_raises_the_workers_own(tmp_path):
    placement, registry, loads = make_placement(tmp_path, [entry("a", 1, max_queue=2), entry("b", 2, max_queue=50)])
    up(registry, "a", "b")
    registry.workers["a"].health = health(capacity=34)
    registry.workers["b"].health = health(capacity=10)
    assert [w["capacity"] for w in placement.describe()] == [2, 10]
    loads.update(a=2, b=0)
    assert {placement.choose().name for _ in range(3)} == {"b"}
    loads.update(b=10)
    with pytest.raises(NoWorkerAvailable, match="Every available worker's queue is full"):
        placement.choose()


def test_503_only_when_every_worker_is_full_with_retry_after_from_the_expected_drain(tmp_path):
    placement, registry, loads = make_placement(tmp_path, [entry("a", 1), entry("b", 2), entry("c", 3)])
    up(registry, "a", "b", "c")
    registry.workers["a"].health = health(capacity=3, seconds_per_step=0.5)
    registry.workers["b"].health = health(capacity=2, seconds_per_step=1.0)
    registry.workers["c"].mark_down("refused", unreachable=True)
    loads.update(a=3, b=1)          # b has room: it gets the job, whatever a's queue
    assert placement.choose().name == "b"
    loads.update(b=2)               # now the whole pool is full
    with pytest.raises(NoWorkerAvailable) as caught:
        placement.choose()
    # a: 3 jobs of 20 steps (FakeMirror: each a typical one) at 0.5 s a step: a place in 10 s;
    # b: 2 jobs at 1.0 s a step: in 20 s. The first place frees up on a.
    assert caught.value.ready is True and caught.value.retry_after == 10
    registry.workers["a"].health = health(capacity=3, seconds_per_step=0.001)
    with pytest.raises(NoWorkerAvailable) as caught:
        placement.choose()
    assert caught.value.retry_after == 1    # never sooner than a second: every waiting client would come at once
    registry.workers["a"].health = health(capacity=3, seconds_per_step=30)
    registry.workers["b"].health = health(capacity=2, seconds_per_step=30)
    with pytest.raises(NoWorkerAvailable) as caught:
        placement.choose()
    assert caught.value.retry_after == 30   # a longer wait is a guess: ask again by then
    # Down or not ready is no "full": the usual Retry-After of the router.
    registry.workers["a"].mark_down("gone", unreachable=True)
    registry.workers["b"].mark_down("gone", unreachable=True)
    with pytest.raises(NoWorkerAvailable) as caught:
        placement.choose()
    assert caught.value.retry_after is None


def test_a_burst_is_placed_by_the_real_steps_of_placements_no_feed_has_shown_yet(tmp_path):
    path = write_workers_yaml(tmp_path / "workers.yaml", [entry("a", 1), entry("b", 2)])
    mirror = Mirror()   # no feed up: the workers' health (0 steps ahead) plus what was placed here
    registry = Registry(path, mirror)
    registry.load_initial()
    placement = Placement(registry, mirror)
    up(registry, "a", "b")
    for state in registry.workers.values():
        state.health = health(capacity=100, seconds_per_step=0.1)
    first = placement.choose(steps=20)
    mirror.note_submitted("long", first.name, 20)
    other = "b" if first.name == "a" else "a"
    # Ten 1-step jobs are less work than the 20-step one: all go to the other worker (counted as
    # 20 steps each, they would alternate).
    for n in range(10):
        chosen = placement.choose(steps=1)
        assert chosen.name == other, n
        mirror.note_submitted(f"short-{n}", chosen.name, 1)
    assert mirror.recent_unseen_steps(first.name) == 20 and mirror.recent_unseen_steps(other) == 10
    # A submission on its way counts by its steps too.
    registry.workers[other].in_flight, registry.workers[other].in_flight_steps = 1, 15
    assert placement.choose(steps=1).name == first.name


# --- end to end -------------------------------------------------------------------------

async def reported_capacity(scheduler, name: str):
    workers = (await call("GET", scheduler.url + "/workers")).json["workers"]
    return next(w["capacity"] for w in workers if w["name"] == name)


@pytest.mark.gen_test(timeout=60)
async def test_the_scheduler_fills_a_worker_to_its_capacity_with_true_queue_positions_then_503(tmp_path):
    # One worker: ComfyUI one prompt deep, 3 more in its own queue: capacity 4. No max_queue in workers.yaml.
    async with SchedulerCluster(tmp_path, n=1, worker_overrides={"comfyui": {"ahead": 1}, "backlog": 3}) as c:
        await until(lambda: reported_capacity(c.scheduler, "gpu-0"), what="the worker's capacity")
        assert await reported_capacity(c.scheduler, "gpu-0") == 4
        c.sims[0].stall = True
        ids = []
        for n in range(4):
            reply = await call("POST", c.scheduler.url + "/generate", {"prompt": f"job {n}", "steps": 2})
            assert reply.code == 200, reply
            ids.append(reply.json["prompt_id"])
        # Positions through the scheduler count the worker's own queue: 1, 2, 3 behind the running one.
        async def positions():
            states = [(await call("GET", f"{c.scheduler.url}/status/{p}")).json for p in ids]
            seen = [(s["status"], s["queue_position"]) for s in states]
            return seen if seen == [("running", None), ("pending", 1), ("pending", 2), ("pending", 3)] else None
        await until(positions, what="the queue positions through the scheduler")
        full = await call("POST", c.scheduler.url + "/generate", {"prompt": "one too many", "steps": 2})
        assert full.code == 503 and "queue is full" in full.json["error"], full
        assert 1 <= int(full.headers["Retry-After"]) <= 30
        # Ops cap it below its capacity: the cap holds (it has 4 already).
        write_workers_yaml(c.workers_file, [worker_entry(c.workers[0], max_queue=2)])

        async def capped():
            return await reported_capacity(c.scheduler, "gpu-0") == 2
        await until(capped, what="the reload")
        assert (await call("POST", c.scheduler.url + "/generate", {"prompt": "capped", "steps": 2})).code == 503
        c.sims[0].stall = False
        for prompt_id in ids:
            assert (await wait_status(c.scheduler.url, prompt_id))["status"] == "completed"
        # Drained below the cap: it takes jobs again.
        assert (await call("POST", c.scheduler.url + "/generate", {"prompt": "room again", "steps": 2})).code == 200


@pytest.mark.gen_test(timeout=60)
async def test_a_worker_whose_own_queue_is_full_is_passed_over_not_marked_down(tmp_path):
    """The scheduler's view can run ahead of a worker's (another scheduler filled it first): the worker's
    503 says queue_full, the job goes to the next worker, and the first stays in rotation."""
    async with SchedulerCluster(tmp_path, n=2, health_interval=600,
                                workers=[{"comfyui": {"ahead": 1}, "backlog": 1}, {}]) as c:
        registry = c.scheduler.registry
        await until(lambda: all(s.health.get("load") for s in registry.workers.values()), what="health")
        # As if it had room for many, and ends every job first.
        registry.workers["gpu-0"].health["load"].update(capacity=100, seconds_per_step=0.001)
        registry.workers["gpu-1"].health["load"].update(seconds_per_step=10)
        c.sims[0].stall = True
        placed = []
        for n in range(3):
            reply = await call("POST", c.scheduler.url + "/generate", {"prompt": f"job {n}", "steps": 2})
            assert reply.code == 200, reply
            placed.append(reply.json["worker"])
            if n < 2:  # the next is placed once the feed has shown this one (its steps count as gpu-0's)
                await until(lambda: c.scheduler.mirror.owner(reply.json["prompt_id"]), what="mirrored")
        assert placed == ["gpu-0", "gpu-0", "gpu-1"]
        gpu0 = registry.workers["gpu-0"]
        assert gpu0.refused is None and gpu0.routable
        c.sims[0].stall = False
