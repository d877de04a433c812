"""Prune bench: how long a pass takes, how long it holds the event loop, and what a task state costs.

    python bench/prune_bench.py [--tasks 100000] [--images 10000] [--runs 3]

Each run builds a JobStore of ``--tasks`` finished jobs, the newest ``--images``
of them with one tiny image file each (in a temp dir), then runs one
``Pruner.prune_once()`` that removes 90 % of the task states and 90 % of the
images (the kept jobs whose images go are marked ``image_expired``). A timer
task sleeps 1 ms in a loop meanwhile and records how late it wakes: the
longest lateness is the longest event-loop stall. Medians over the runs.

Memory: tracemalloc over a populated JobStore (Job objects and the store's
indexes), compared with the same jobs held as nested dicts. Targets: stall
<= 20 ms, <= 1 KB per held state.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from t2i.config import RetentionConfig  # noqa: E402
from t2i.worker.images import ImageStore  # noqa: E402
from t2i.worker.jobs import COMPLETED, Job, JobStore  # noqa: E402
from t2i.worker.retention import Pruner  # noqa: E402

STALL_TARGET = 0.020
BYTES_TARGET = 1024


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def populate(store: JobStore, clock: Clock, n: int, with_images: int) -> list[str]:
    """``n`` finished jobs, one per 0.01 s; the newest ``with_images`` get an image name each."""
    names = []
    for i in range(n):
        prompt_id = str(uuid.uuid4())
        job = store.add(Job(prompt_id, created_at=clock(), workflow="txt2img", seed=1_000_000 + i))
        store.update(job, status="running", started_at=clock(), queue_position=None)
        image = ()
        if i >= n - with_images:
            image = (ImageStore.filename_for(prompt_id, 0),)
            names.extend(image)
        store.update(job, status=COMPLETED, progress_value=20, progress_max=20, images=image)
        clock.now += 0.01
    return names


async def one_run(tasks: int, n_images: int, directory: Path) -> dict[str, float]:
    start = time.time() - 10 * 86400
    clock = Clock(start)
    store = JobStore(clock=clock)
    images = ImageStore(directory, clock=clock)
    images.ensure_directory()
    names = populate(store, clock, tasks, n_images)
    for name in names:
        (directory / name).write_bytes(b"\x89PNG tiny")
    await images.take_stock()
    # take_stock indexed real mtimes; give them the jobs' (fake) finish times, in order.
    for name in names:
        job = store.get(name.rsplit("_", 1)[0])
        images.index[name] = (images.index[name][0], job.finished_at)
    end = clock.now
    # task_ttl so that the oldest 90 % of states have expired at ``end``.
    config = RetentionConfig(interval=60, task_ttl=(end - start) - 0.9 * tasks * 0.01,
                             image_max_age=10**9, image_max_count=n_images // 10, image_max_bytes=None)
    pruner = Pruner(store, images, config, None, "bench", clock=clock)

    worst = 0.0
    running = True

    async def watch() -> None:
        nonlocal worst
        while running:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)

    gc.collect()
    watcher = asyncio.ensure_future(watch())
    await asyncio.sleep(0.01)
    worst = 0.0
    started = time.perf_counter()
    report = await pruner.prune_once()
    elapsed = time.perf_counter() - started
    running = False
    await watcher
    assert not report["errors"], report["errors"]
    return {"time": elapsed, "stall": worst, "tasks_removed": report["tasks_removed"],
            "images_removed": report["images_removed"], "held": len(store)}


def nested_job(i: int, now: float) -> dict:
    prompt_id = str(uuid.uuid4())
    return {
        "prompt_id": prompt_id, "status": COMPLETED, "version": 3 * i + 3,
        "progress": {"value": 20, "max": 20}, "queue_position": None,
        "images": [ImageStore.filename_for(prompt_id, 0)], "preview_version": 0, "error": None,
        "created_at": now, "started_at": now + 1.0, "finished_at": now + 2.0, "image_expired": False,
        "seed": 1_000_000 + i, "workflow": "txt2img", "client_id": None,
    }


def bytes_per_state(n: int) -> tuple[float, float]:
    """(JobStore bytes per held state, nested-dict bytes per state), by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    clock = Clock(time.time())
    store = JobStore(clock=clock)
    populate(store, clock, n, n)
    slots = tracemalloc.get_traced_memory()[0] - base
    del store
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    now = time.time()
    nested = {}
    for i in range(n):
        job = nested_job(i, now + i)
        nested[job["prompt_id"]] = job
    dicts = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del nested
    return slots / n, dicts / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="t2i-prune-bench-") as tmp:
            result = asyncio.run(one_run(args.tasks, args.images, Path(tmp) / "images"))
        results.append(result)
        print(f"run {run + 1}: prune {result['time'] * 1000:.0f} ms, longest stall {result['stall'] * 1000:.1f} ms, "
              f"removed {result['tasks_removed']} states and {result['images_removed']} images, "
              f"{result['held']} held")
    prune_ms = statistics.median(r["time"] for r in results) * 1000
    stall_ms = statistics.median(r["stall"] for r in results) * 1000
    per_state, per_dict = bytes_per_state(args.tasks)
    ok_stall = stall_ms <= STALL_TARGET * 1000
    ok_bytes = per_state <= BYTES_TARGET
    print(f"median of {args.runs}: prune {prune_ms:.0f} ms, longest loop stall {stall_ms:.1f} ms "
          f"(target <= {STALL_TARGET * 1000:.0f} ms: {'ok' if ok_stall else 'MISSED'})")
    print(f"bytes per held task state: {per_state:.0f} (JobStore) vs {per_dict:.0f} (nested dicts), "
          f"ratio {per_state / per_dict:.2f} (target <= {BYTES_TARGET}: {'ok' if ok_bytes else 'MISSED'})")
    return 0 if ok_stall and ok_bytes else 1


if __name__ == "__main__":
    sys.exit(main())
