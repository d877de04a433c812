"""Garbage collection for a long-running server: keep CPython's full collections from holding the event loop.

A full (generation-2) pass scans every container object that has lived through two younger passes.
At 1,000 followed workers the scheduler keeps about 90,000 such objects in flight (its feed and
health requests, each replaced every few seconds), and a full pass over them held its event loop
80 to 110 ms every 7 to 10 s (bench/scheduler_scale_bench.py). :class:`GCPolicy`, started by both
servers' ``main()`` before the server starts (so start-up's own full passes stay short too: at 1,000
workers one of 49 ms instead of four of up to 143 ms):

* collects once and ``gc.freeze()``s what is there (modules, the configuration): the permanent
  generation, which no pass scans;
* every :data:`FREEZE_EVERY` seconds, a young collection (generations 0 and 1: what died young
  goes) and ``gc.freeze()`` again: whatever survived moves to the permanent generation, so the old
  generation never holds more than a second's survivors and any full pass is short. A frozen
  object is still freed by reference counting when it dies, as nearly all of a finished request's
  objects are (measured at 1,000 workers after 500 placements: a full collection over the whole
  frozen set, ~147,000 objects, found 1,737 to free); only garbage *cycles* among frozen objects
  wait, for:
* a compaction (``gc.unfreeze()``, a full collection, freeze again) once the Python heap has grown
  by :data:`COMPACT_GROWTH` since the last one (CPython's own rule for full passes) and
  :data:`COMPACT_MIN_INTERVAL` has passed: the one long pause left (about 0.1 s per 100,000
  objects on a 2-core VM), rare, and timed in ``/metrics`` like every pass. The heap is read as
  ``sys.getallocatedblocks()`` (0.3 ms for 2 million blocks), not ``gc.get_freeze_count()``, which
  walks the frozen list (27 ms for 600,000 objects) and would itself hold the loop.

CPython's collection thresholds are left as they are: raising the young one (e.g. to 5,000) made
young passes rarer but up to 10x longer at 1,000 workers, because the young count is allocations
minus deallocations and the frozen requests dying offset the new ones, so the young generation grew
far past the threshold before a pass.

:data:`PAUSES` times every pass of the process from import (whether or not a policy runs);
``t2i.metrics`` exports it.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from typing import Any, Callable

from tornado.ioloop import PeriodicCallback

log = logging.getLogger(__name__)

FREEZE_EVERY = 1.0             # seconds between two young collections + freezes
COMPACT_GROWTH = 0.25          # the heap grew by this fraction since the last compaction ...
COMPACT_MIN_INTERVAL = 900.0   # ... and this many seconds passed: unfreeze and collect everything once
COMPACT_FLOOR = 200_000        # growth is measured against at least this many blocks (a small heap's
#                                 compaction is short, but not worth doing for a few thousand objects)
PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)   # seconds

FREEZE = "freeze"
COMPACT = "compact"


def plan(now: float, heap: int, last_compaction: float, heap_after_compaction: int) -> str:
    """What a tick does: :data:`COMPACT` when the heap (allocated blocks) grew by COMPACT_GROWTH
    since the last compaction (against at least COMPACT_FLOOR blocks) and COMPACT_MIN_INTERVAL
    has passed, else :data:`FREEZE`. Growth is the only sign of cyclic garbage among frozen objects
    that is cheap to read (what lives legitimately, e.g. mirrored jobs, grows it too)."""
    grown = heap - heap_after_compaction
    if now - last_compaction >= COMPACT_MIN_INTERVAL \
            and grown > COMPACT_GROWTH * max(heap_after_compaction, COMPACT_FLOOR):
        return COMPACT
    return FREEZE


class GCPauses:
    """Every collection of the process, per generation: how many, how long (wall clock, which is
    what the event loop lost), in PAUSE_BUCKETS. Plain numbers only: the callback runs inside the
    collector, where taking a lock another frame of this thread holds would deadlock."""

    def __init__(self) -> None:
        self.buckets = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in range(3)]   # the last one is +Inf
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self.collected = [0, 0, 0]
        self._started = 0.0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = min(2, int(info.get("generation", 2)))
        self.count[generation] += 1
        self.seconds[generation] += pause
        self.collected[generation] += int(info.get("collected", 0))
        if pause > self.longest[generation]:
            self.longest[generation] = pause
        index = next((i for i, bound in enumerate(PAUSE_BUCKETS) if pause <= bound), len(PAUSE_BUCKETS))
        self.buckets[generation][index] += 1


class PolicyStats:
    """What the running policy did (process-wide, as the collector is)."""

    def __init__(self) -> None:
        self.running = False
        self.freezes = 0
        self.compactions = 0
        self.last_compaction_pause = 0.0     # seconds
        self.last_compaction_freed = 0       # objects the last compaction's full collection freed


PAUSES = GCPauses()
gc.callbacks.append(PAUSES.callback)
STATS = PolicyStats()


class GCPolicy:
    """``start()`` before the server starts, ``stop()`` at shutdown.

    One per process: the collector is the process's. ``tick()`` is public so it can be driven
    by hand (tests, benches) with ``every=None``.
    """

    def __init__(self, *, every: float | None = FREEZE_EVERY, clock: Callable[[], float] = time.monotonic):
        self.every = every
        self.clock = clock
        self.last_compaction = 0.0
        self.heap_after_compaction = 0
        self._started = False
        self._callback: PeriodicCallback | None = None

    def start(self) -> None:
        if STATS.running:
            log.debug("a GC policy runs in this process already")
            return
        STATS.running = self._started = True
        gc.collect()   # start-up's garbage goes, not into the permanent generation
        gc.freeze()
        self.last_compaction = self.clock()
        self.heap_after_compaction = sys.getallocatedblocks()
        if self.every:
            self._callback = PeriodicCallback(self.tick, self.every * 1000, jitter=0.1)
            self._callback.start()

    def stop(self) -> None:
        """Stop ticking (what is frozen stays so: the process is about to end)."""
        if self._callback is not None:
            self._callback.stop()
            self._callback = None
        if self._started:
            STATS.running = self._started = False

    def tick(self) -> str:
        """One young collection and freeze, or a compaction when :func:`plan` says so; which one."""
        step = plan(self.clock(), sys.getallocatedblocks(), self.last_compaction, self.heap_after_compaction)
        if step == COMPACT:
            self.compact()
        else:
            gc.collect(1)
            gc.freeze()
            STATS.freezes += 1
        return step

    def compact(self) -> None:
        """Unfreeze, collect everything (cyclic garbage among frozen objects included), freeze again."""
        started = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        pause = time.perf_counter() - started
        self.last_compaction = self.clock()
        self.heap_after_compaction = sys.getallocatedblocks()
        STATS.compactions += 1
        STATS.last_compaction_pause = pause
        STATS.last_compaction_freed = freed
        log.info("GC compaction: a full collection in %.0f ms freed %d objects", pause * 1000, freed)
