"""Placement's speeds (t2i.scheduler.placement): a worker not measured yet runs at the median of every
listed worker's measured speed, read in the same single pass over the pool that placement makes per job;
a job's expected finish counts each job ahead's fixed seconds as well as the steps ahead."""

from __future__ import annotations

from support.cluster import write_workers_yaml
from support.timing import FakeClock
from t2i.scheduler.mirror import Mirror
from t2i.scheduler.placement import Placement
from t2i.scheduler.registry import Registry
from test_admission import health
from test_scheduler_units import entry, make_placement, up


def test_a_worker_not_measured_yet_runs_at_the_median_of_the_listed_workers_speeds(tmp_path):
    placement, registry, loads = make_placement(tmp_path, [entry("a", 1), entry("b", 2), entry("c", 3),
                                                           entry("new", 4)])
    up(registry, "a", "b", "c", "new")
    registry.workers["a"].health = health(capacity=100, seconds_per_step=0.1)
    registry.workers["b"].health = health(capacity=100, seconds_per_step=1.0)
    registry.workers["c"].health = health(capacity=100, seconds_per_step=0.01)
    registry.workers["c"].mark_down("gone", unreachable=True)   # down, but its speed still counts
    registry.workers["new"].health = health(capacity=100)       # not measured: the median of 0.01, 0.1, 1.0
    loads["b"] = 10                                              # b: 220 s ahead, out of the running
    # A 20-step job ends in 2 s on a and on new (at 0.1 s a step): a tie, in turn. (At the median of the
    # up workers only, 1.0 s, new would take 20 s.)
    assert {placement.choose(steps=20).name for _ in range(4)} == {"a", "new"}
    # a with 10 typical jobs ahead (FakeMirror: 20 steps each): 22 s; new: 2 s.
    loads["a"] = 10
    assert {placement.choose(steps=20).name for _ in range(4)} == {"new"}


def test_with_no_worker_measured_only_the_steps_ahead_count(tmp_path):
    placement, registry, loads = make_placement(tmp_path, [entry("a", 1), entry("b", 2)])
    up(registry, "a", "b")
    for state in registry.workers.values():
        state.health = health(capacity=100)
    loads.update(a=1, b=0)
    assert {placement.choose(steps=4).name for _ in range(4)} == {"b"}
    loads.update(a=0, b=0)
    assert {placement.choose(steps=4).name for _ in range(4)} == {"a", "b"}   # a tie: in turn


# A burst of mixed jobs, dealt in a fixed order: 40 of 1 step, 10 of 20 steps.
BURST = [20 if n % 5 == 0 else 1 for n in range(50)]
# Two GPUs as they run: "a" has a large fixed cost per job and fast steps, "b" the reverse. At 10 steps
# both take 0.4 s a job: what a per-step average over 10-step jobs would make of them (0.04 s a step each).
TRUE = {"a": (0.3, 0.01), "b": (0.0, 0.04)}   # (seconds per job, seconds per step)


def place_burst(tmp_path, loads):
    """Place BURST by ``loads`` (each worker's /health load); the seconds each GPU then really runs."""
    tmp_path.mkdir()
    path = write_workers_yaml(tmp_path / "workers.yaml", [entry("a", 1), entry("b", 2)])
    mirror = Mirror(clock=FakeClock())   # no feed up: each placement counts by its steps until shown
    registry = Registry(path, mirror)
    registry.load_initial()
    placement = Placement(registry, mirror)
    up(registry, "a", "b")
    for name, load in loads.items():
        registry.workers[name].health = {"ok": True, "load": {"steps": 0, "capacity": 100, **load}}
    busy = {"a": 0.0, "b": 0.0}
    for n, steps in enumerate(BURST):
        name = placement.choose(steps=steps).name
        mirror.note_submitted(f"job-{n}", name, steps)
        per_job, per_step = TRUE[name]
        busy[name] += per_job + steps * per_step
    return busy


def test_a_burst_of_mixed_jobs_is_spread_by_each_jobs_fixed_and_per_step_cost(tmp_path):
    busy = place_burst(tmp_path / "two", {name: {"seconds_per_job": per_job, "seconds_per_step": per_step}
                                          for name, (per_job, per_step) in TRUE.items()})
    longest = max(per_job + max(BURST) * per_step for per_job, per_step in TRUE.values())
    assert abs(busy["a"] - busy["b"]) <= longest   # the GPUs end within one job of each other
    # By a per-step figure alone (the fixed cost folded in) the short jobs look 0.04 s on both and the
    # long ones 0.8 s: they are split evenly, and "a" runs seconds after "b" has ended.
    folded = place_burst(tmp_path / "one", {"a": {"seconds_per_step": 0.04}, "b": {"seconds_per_step": 0.04}})
    assert folded["a"] - folded["b"] > 3 * longest


def test_a_worker_not_measured_yet_counts_the_pools_median_seconds_per_job_too(tmp_path):
    placement, registry, loads = make_placement(tmp_path, [entry("a", 1), entry("new", 2)])
    up(registry, "a", "new")
    registry.workers["a"].health = {"ok": True, "load": {"steps": 0, "capacity": 100, "seconds_per_step": 0.01,
                                                         "seconds_per_job": 1.0}}
    registry.workers["new"].health = health(capacity=100)
    loads.update(a=0, new=1)   # new: one 20-step job ahead, 0.2 s at a's step time ... and 1 s more for the job
    # A 1-step job: 1.01 s on a; on new 2 x 1 s + 21 steps x 0.01 s = 2.21 s (by steps alone it would be 0.21 s).
    assert {placement.choose(steps=1).name for _ in range(4)} == {"a"}
