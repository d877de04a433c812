"""Placement's speeds (t2i.scheduler.placement): a worker not measured yet runs at the median of every
listed worker's measured speed, read in the same single pass over the pool that placement makes per job."""

from __future__ import annotations

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
