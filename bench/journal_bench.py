"""Journal bench: what the SQLite job journal costs the event loop, the submitter and start-up.

    python bench/journal_bench.py [--jobs 1000] [--load-jobs 20000] [--samples 2000] [--commits 300]

All in one run, on temp dirs (``t2i.worker.journal.Journal``, real SQLite):

* save() on the loop: the time one ``Journal.save()`` holds the event loop (it
  only queues a snapshot; the writer thread encodes and commits), median and
  p99 over ``--samples`` transitions, against a baseline measured alongside:
  the same row built and put in an in-memory dict.
* commit latency: ``save()`` then ``await flush()`` for one job on an idle
  journal, what ``POST /generate`` waits for (``--commits`` samples).
* throughput: ``--jobs`` jobs, each saved in 5 transitions (submitting, queued,
  running, collecting, completed) as a worker does: 16 jobs in flight, their
  transitions interleaved, ``flush()`` only when a job is accepted (as
  ``Runner.submit`` does). Wall time, commits and rows, scaled per 1,000 jobs.
  Once back to back (the loop's top rate: a job's later transitions often meet
  in one queued row) and once with its transitions 1 ms apart (each one a row).
  Meanwhile a 1 ms asyncio heartbeat records the longest gap between its
  beats (the worst event-loop stall), against the same heartbeat on an idle loop.
* start-up: ``open()`` of a journal of ``--load-jobs`` jobs (95 % finished, the
  rest unfinished with their ComfyUI graph), median of 3; the file's size.

Prints a table; no targets, nothing asserted. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from t2i.comfyui import ImageRef  # noqa: E402
from t2i.worker.jobs import COLLECTING, COMPLETED, QUEUED, STARTED, SUBMITTING, Job  # noqa: E402
from t2i.worker.journal import FILENAME, Journal, _row_of  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GRAPH = json.loads((ROOT / "t2i" / "workflows" / "txt2img.json").read_text(encoding="utf-8"))
PHASES = (SUBMITTING, QUEUED, STARTED, COLLECTING, COMPLETED)
IN_FLIGHT = 16


def new_job(n: int, now: float) -> Job:
    prompt_id = f"{n:08d}-5e1c-4a8e-9d6b-{n:012x}"
    params = {"prompt": f"a lighthouse at dusk, oil painting, job {n}", "negative_prompt": "blurry",
              "seed": 1_000_000 + n, "steps": 20, "width": 512, "height": 512}
    job = Job(prompt_id, now, workflow="txt2img", seed=params["seed"], client_id="0f6c3a4e9b1d4c2e",
              graph=GRAPH, params=params)
    job.client = "client-a"
    return job


def advance(job: Job, phase: str, now: float) -> Job:
    """The job in ``phase``, with the fields the lifecycle sets on the way."""
    changes: dict = {"phase": phase}
    if phase == QUEUED:
        changes.update(attempt=1, progress_max=None)
    elif phase == STARTED:
        changes.update(started_at=now, progress_max=20)
    elif phase == COLLECTING:
        changes.update(outputs=(ImageRef(f"t2i/{job.prompt_id}_00001_.png", "t2i", "output"),))
    elif phase == COMPLETED:
        changes.update(finished_at=now, images=(f"{job.prompt_id}_0.png",))
    return job.evolve(**changes)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Heartbeat:
    """A task that sleeps 1 ms in a loop; ``worst`` is the longest gap between two of its beats."""

    def __init__(self, period: float = 0.001):
        self.period = period
        self.worst = 0.0
        self.beats = 0
        self._running = False
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        last = time.perf_counter()
        while self._running:
            await asyncio.sleep(self.period)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last)
            self.beats += 1
            last = now

    async def __aenter__(self) -> "Heartbeat":
        self._running = True
        self._task = asyncio.ensure_future(self._run())
        await asyncio.sleep(0.005)  # settle; the first beats do not count
        self.worst, self.beats = 0.0, 0
        return self

    async def __aexit__(self, *exc) -> None:
        self._running = False
        await self._task


# --- measurements ---------------------------------------------------------------------------

async def save_cost(directory: Path, samples: int) -> dict:
    """Per transition on the loop: Journal.save() vs the same row put in a dict (alternated)."""
    journal = Journal(directory)
    await journal.open()
    memory: dict[str, tuple] = {}
    saves, dicts = [], []
    clock = time.perf_counter_ns
    now = time.time()
    job = new_job(0, now)
    for i in range(samples):
        if i % len(PHASES) == 0:
            job = new_job(i, now)
        else:
            job = advance(job, PHASES[i % len(PHASES)], now)
        t0 = clock()
        memory[job.prompt_id] = _row_of(job)
        t1 = clock()
        journal.save(job)
        t2 = clock()
        dicts.append(t1 - t0)
        saves.append(t2 - t1)
        if i % 4 == 3:
            await asyncio.sleep(0)  # the writer commits in the background, as between messages
    await journal.close()
    save_med, dict_med = statistics.median(saves) / 1000, statistics.median(dicts) / 1000
    return {"save_med": save_med, "save_p99": pct(saves, 0.99) / 1000, "dict_med": dict_med,
            "dict_p99": pct(dicts, 0.99) / 1000, "ratio": save_med / dict_med, "commits": journal.commits}


async def commit_latency(directory: Path, samples: int) -> dict:
    """save() + await flush() of one job on an otherwise idle journal."""
    journal = Journal(directory)
    await journal.open()
    now = time.time()
    times = []
    for i in range(samples):
        job = new_job(i, now)
        t0 = time.perf_counter()
        journal.save(job)
        await journal.flush()
        times.append(time.perf_counter() - t0)
    await journal.close()
    return {"med": statistics.median(times) * 1000, "p99": pct(times, 0.99) * 1000}


async def throughput(directory: Path, jobs: int, gap: float = 0.0) -> dict:
    """``jobs`` jobs x 5 transitions, 16 in flight, flush per acceptance; the loop's worst stall.

    ``gap``: how long a job waits between its transitions (0: one loop turn, so a job's later
    transitions often meet in one queued row; 1 ms: each transition is a row of its own)."""
    journal = Journal(directory)
    await journal.open()
    numbers = iter(range(jobs))

    async def worker() -> None:
        for n in numbers:
            now = time.time()
            job = new_job(n, now)
            journal.save(job)            # Runner.submit: saved before POST /prompt ...
            await asyncio.sleep(0)       # ... POST /prompt in flight ...
            await journal.flush()        # ... answered once the row is on disk
            for phase in PHASES[1:]:     # then ComfyUI's messages, each a transition
                await asyncio.sleep(gap)
                job = advance(job, phase, now)
                journal.save(job)

    gc.collect()
    async with Heartbeat() as beat:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        await journal.flush()
        wall = time.perf_counter() - t0
    await journal.close()
    with sqlite3.connect(directory / FILENAME) as db:
        rows = db.execute("SELECT count(*) FROM jobs WHERE phase = ?", (COMPLETED,)).fetchone()[0]
    db.close()
    assert rows == jobs, (rows, jobs)  # a sanity check of the bench itself, not a target
    return {"wall": wall, "commits": journal.commits, "writes": journal.writes, "stall": beat.worst,
            "beats": beat.beats}


async def idle_stall(seconds: float) -> float:
    async with Heartbeat() as beat:
        await asyncio.sleep(seconds)
    return beat.worst


async def load(directory: Path, jobs: int, runs: int = 3) -> dict:
    journal = Journal(directory)
    await journal.open()
    now = time.time() - 86400
    for n in range(jobs):
        job = new_job(n, now + n * 0.01)
        if n < jobs * 0.95:
            for phase in PHASES[1:]:
                job = advance(job, phase, now + n * 0.01 + 5)
        else:
            job = advance(job, QUEUED, now)
        journal.save(job)
        if n % 1000 == 999:
            await journal.flush()
    await journal.close()
    size = (directory / FILENAME).stat().st_size
    times = []
    for _ in range(runs):
        gc.collect()
        journal = Journal(directory)
        t0 = time.perf_counter()
        restored, _ = await journal.open()
        times.append(time.perf_counter() - t0)
        await journal.close()
        assert len(restored) == jobs, (len(restored), jobs)
        del restored
    return {"open": statistics.median(times) * 1000, "size": size}


# --- the run ----------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="t2i-journal-bench-") as tmp:
        base = Path(tmp)
        started = time.perf_counter()
        cost = await save_cost(base / "cost", args.samples)
        latency = await commit_latency(base / "latency", args.commits)
        put = await throughput(base / "throughput", args.jobs)
        paced = await throughput(base / "paced", args.jobs, gap=0.001)
        idle = await idle_stall(min(put["wall"], 2.0))
        loaded = await load(base / "load", args.load_jobs)
        total = time.perf_counter() - started

    per_k = 1000 / args.jobs
    rows = [
        ("save() on the loop, median / p99", f"{cost['save_med']:.1f} / {cost['save_p99']:.1f} us"),
        ("  baseline: dict update of the row", f"{cost['dict_med']:.1f} / {cost['dict_p99']:.1f} us "
                                               f"-> save is {cost['ratio']:.1f}x (medians)"),
        ("commit latency save->flush, median / p99", f"{latency['med']:.2f} / {latency['p99']:.2f} ms "
                                                     f"({args.commits} single-job commits)"),
        (f"{args.jobs:,} jobs x 5 transitions",
         f"{put['wall'] * 1000:.0f} ms, {put['commits']:,} commits, {put['writes']:,} rows written "
         f"for {args.jobs * 5:,} transitions"),
        ("  per 1,000 jobs", f"{put['wall'] * 1000 * per_k:.0f} ms, {put['commits'] * per_k:,.0f} commits "
                             f"({put['writes'] / max(put['commits'], 1):.1f} rows per commit), "
                             f"{args.jobs * 5 / put['wall']:,.0f} transitions/s"),
        ("  longest 1 ms heartbeat gap meanwhile", f"{put['stall'] * 1000:.1f} ms "
                                                   f"(idle loop: {idle * 1000:.1f} ms)"),
        (f"{args.jobs:,} jobs, transitions 1 ms apart",
         f"{paced['wall'] * 1000:.0f} ms, {paced['commits']:,} commits, {paced['writes']:,} rows written"),
        ("  per 1,000 jobs", f"{paced['commits'] * per_k:,.0f} commits "
                             f"({paced['writes'] / max(paced['commits'], 1):.1f} rows per commit)"),
        ("  longest 1 ms heartbeat gap meanwhile", f"{paced['stall'] * 1000:.1f} ms"),
        (f"open() of {args.load_jobs:,} jobs, median of 3", f"{loaded['open']:.0f} ms"),
        ("  file size", f"{loaded['size'] / 1e6:.1f} MB ({loaded['size'] / args.load_jobs:.0f} B per job)"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"journal bench: SQLite {sqlite3.sqlite_version}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {IN_FLIGHT} jobs in flight")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"(bench run {total:.1f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs in the throughput run (default 1000)")
    parser.add_argument("--load-jobs", type=int, default=20_000, help="jobs in the journal open() reads")
    parser.add_argument("--samples", type=int, default=2000, help="save() timings")
    parser.add_argument("--commits", type=int, default=300, help="single-job commit timings")
    args = parser.parse_args()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
