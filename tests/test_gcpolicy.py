"""The GC policy (t2i.gcpolicy): its decisions, what a tick and a compaction do to real objects, and the
pauses in /metrics. No timing: counts and reachability only (speed is bench/scheduler_scale_bench.py's)."""

from __future__ import annotations

import gc
import weakref

import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from support.cluster import call
from t2i import gcpolicy
from t2i.gcpolicy import COMPACT, COMPACT_FLOOR, COMPACT_GROWTH, COMPACT_MIN_INTERVAL, FREEZE, GCPolicy, plan
from t2i.metrics import MetricsHandler

HEAP = 1_000_000   # allocated blocks after the last compaction, in the plan() cases


class Plain:
    """A container nothing else refers to."""


class Cycle:
    """A container that refers to itself: only the collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def policy():
    """A started policy ticked by hand (every=None: no timer); the process's GC state restored after."""
    clock = [1000.0]
    collector = GCPolicy(every=None, clock=lambda: clock[0])
    collector.clock_now = clock
    yield collector
    collector.stop()
    gc.unfreeze()


def test_plan_freezes_until_the_heap_grew_by_a_quarter_and_the_interval_passed():
    late = COMPACT_MIN_INTERVAL
    grown = int(HEAP * (1 + COMPACT_GROWTH)) + 1
    assert plan(late, grown, 0.0, HEAP) == COMPACT
    assert plan(late - 1, grown, 0.0, HEAP) == FREEZE            # grown, but compacted too lately
    assert plan(late, int(HEAP * (1 + COMPACT_GROWTH)) - 1, 0.0, HEAP) == FREEZE   # not grown enough
    assert plan(late * 10, HEAP // 2, 0.0, HEAP) == FREEZE       # shrunk: nothing to reclaim
    # A small heap's growth counts against COMPACT_FLOOR blocks, not a few thousand.
    assert plan(late, 5_000 + int(COMPACT_FLOOR * COMPACT_GROWTH) - 1, 0.0, 5_000) == FREEZE
    assert plan(late, 5_000 + int(COMPACT_FLOOR * COMPACT_GROWTH) + 1, 0.0, 5_000) == COMPACT


def test_a_tick_freezes_what_survived_and_a_compaction_frees_cycles_that_died_frozen(policy):
    policy.start()
    assert gcpolicy.STATS.running and gc.get_freeze_count() > 0   # start-up's objects
    cycle = Cycle()
    gone = weakref.ref(cycle)
    frozen = gc.get_freeze_count()
    freezes = gcpolicy.STATS.freezes
    assert policy.tick() == FREEZE
    assert gcpolicy.STATS.freezes == freezes + 1
    assert gc.get_freeze_count() > frozen
    assert not any(obj is cycle for obj in gc.get_objects())   # out of every generation a pass scans
    # Dead but frozen: a full collection does not see it (the leak compaction bounds) ...
    del cycle
    gc.collect()
    assert gone() is not None
    # ... a compaction does.
    compactions = gcpolicy.STATS.compactions
    policy.compact()
    assert gone() is None
    assert gcpolicy.STATS.compactions == compactions + 1
    assert gcpolicy.STATS.last_compaction_freed >= 1   # the Cycle


def test_a_frozen_object_that_dies_without_a_cycle_is_freed_at_once(policy):
    policy.start()
    plain = Plain()
    gone = weakref.ref(plain)
    policy.tick()
    assert not any(obj is plain for obj in gc.get_objects())   # frozen
    del plain
    assert gone() is None   # reference counting, no pass needed: most of a finished request's objects


def test_a_tick_compacts_once_the_interval_passed_and_the_heap_grew(policy):
    policy.start()
    policy.heap_after_compaction = 1   # as if the heap had been tiny at the last compaction
    assert policy.tick() == FREEZE     # grown, but the interval has not passed
    policy.clock_now[0] += COMPACT_MIN_INTERVAL
    compactions = gcpolicy.STATS.compactions
    assert policy.tick() == COMPACT
    assert gcpolicy.STATS.compactions == compactions + 1
    assert policy.heap_after_compaction > 1                   # measured again after the compaction
    assert policy.tick() == FREEZE                            # and the interval starts over


def test_one_policy_per_process(policy):
    policy.start()
    other = GCPolicy(every=None)
    other.start()       # a second server in the same process (the demo): the first one's policy runs
    other.stop()
    assert gcpolicy.STATS.running
    policy.stop()
    assert not gcpolicy.STATS.running


@pytest.mark.gen_test(timeout=20)
async def test_metrics_show_each_generation_s_passes():
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(web.Application([(r"/metrics", MetricsHandler)]))
    server.add_sockets(sockets)
    url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/metrics"
    try:
        def full_passes(text: str) -> float:
            full = 't2i_gc_pause_seconds_count{generation="2"}'
            return float(next(line for line in text.splitlines() if line.startswith(full)).split()[-1])

        before = full_passes((await call("GET", url)).body.decode())
        gc.collect()
        after = (await call("GET", url)).body.decode()
        assert full_passes(after) >= before + 1
        assert 't2i_gc_pause_seconds_bucket{generation="2",le="+Inf"}' in after
        for name in ("t2i_gc_longest_pause_seconds", "t2i_gc_freezes_total", "t2i_gc_compactions_total",
                     "t2i_gc_compaction_freed_objects"):
            assert f"\n{name}" in after, name
    finally:
        server.stop()
