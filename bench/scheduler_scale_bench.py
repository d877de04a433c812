"""How the scheduler holds up with a thousand workers: CPU and memory per followed worker,
placement latency, start-up and shutdown, ``GET /workers``, and its longest event-loop stall.

    python bench/scheduler_scale_bench.py                      # 1,000 workers (about 2 minutes)
    python bench/scheduler_scale_bench.py --workers 200 --idle 10 --placements 200 --listing 5000

Fake workers (one child process, one tiny Tornado app on one port per worker) answer what the
scheduler asks of a worker: ``/health``, ``/workflows``, ``/jobs`` (paged with ``limit`` and
``after``, as t2i workers page them, and streamed with ``stream=1``; ``--no-stream``: long-polls),
``/generate`` (the job completes a moment later) and ``/status``. The scheduler runs in this process,
as ``python -m t2i.scheduler`` would (its GC policy included), with its default ``health_interval``
(5 s), so its CPU time and memory are its own. Cost per worker is the difference to a baseline pool
of ``--baseline`` workers measured in the same run.

It prints numbers and asserts nothing. Targets (issue 10): >= 1,000 workers followed, placement
p99 <= 50 ms, <= 0.05 % of a core per idle worker, no loop stall > 20 ms on big listings.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/harness.py

from harness import fake_feed_page  # noqa: E402

from t2i.gcpolicy import STATS  # noqa: E402

# --- the fake workers (child process) ---------------------------------------------------------


def fake_job(prompt_id: str, version: int, status: str, now: float) -> dict[str, Any]:
    """A status object of about the size a real worker sends."""
    done = status == "completed"
    image = f"http://127.0.0.1:1/images/t2i_{prompt_id}_00001_.png"
    return {"prompt_id": prompt_id, "status": status, "version": version,
            "progress": {"value": 20, "max": 20} if done else None, "queue_position": None if done else 0,
            "image_url": image if done else None, "image_urls": [image] if done else [], "preview_url": None,
            "error": None, "attempt": 1, "workflow": "txt2img", "seed": 123456789, "created_at": now,
            "started_at": now if done else None, "completed_at": now if done else None}


class FakeWorker:
    def __init__(self, name: str, jobs: int = 0):
        self.name = name
        self.epoch = f"{name}-{os.getpid()}"
        self.seq = int(time.time() * 1000)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.changed = asyncio.Event()
        now = time.time()
        for i in range(jobs):
            self.seq += 1
            self.jobs[f"{name}-old-{i:06d}"] = fake_job(f"{name}-old-{i:06d}", self.seq, "completed", now)

    def put(self, prompt_id: str, status: str) -> None:
        self.seq += 1
        self.jobs[prompt_id] = fake_job(prompt_id, self.seq, status, time.time())
        self.changed.set()
        self.changed = asyncio.Event()

    def counts(self) -> dict[str, int]:
        pending = sum(1 for job in self.jobs.values() if job["status"] == "pending")
        return {"pending": pending, "running": 0, "held": len(self.jobs)}


CATALOGUE = {"default_workflow": "txt2img", "allow_raw_workflows": False, "checked_at": 0,
             "workflows": {"txt2img": {"params": {
                 "prompt": {"type": "string", "required": True, "max_length": 2000},
                 "steps": {"type": "integer", "default": 20, "min": 1, "max": 150}},
                 "ready": True, "reason": None}}}


def make_fake_app(by_port: dict[int, FakeWorker], streams: bool = True):
    from tornado import web

    from t2i.idempotency import prompt_id_for

    class Base(web.RequestHandler):
        def prepare(self):
            self.worker = by_port[int(self.request.host.rsplit(":", 1)[1])]

        def reply(self, body: Any, status: int = 200) -> None:
            self.set_status(status)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(body))

    class Health(Base):
        def get(self):
            self.reply({"ok": True, "name": self.worker.name, "comfyui": {"reachable": True, "ok": True},
                        "jobs": self.worker.counts()})

    class Workflows(Base):
        def get(self):
            self.reply(CATALOGUE)

    class Jobs(Base):
        async def get(self):
            if streams and self.get_argument("stream", "0") == "1":
                await self.stream()
            else:
                self.reply(await fake_feed_page(self.worker, self))

        async def stream(self):
            """``GET /jobs?stream=1`` as a t2i worker answers it (t2i.worker.handlers.JobsHandler.stream):
            per change, the changed jobs' lines and a mark; a last mark after ``wait``; one ``full`` mark
            when the follower must list the jobs first."""
            worker = self.worker
            since = int(self.get_argument("since", "0"))
            deadline = time.monotonic() + float(self.get_argument("wait", "0"))
            self.set_header("Content-Type", "application/x-ndjson")
            relist = self.get_argument("epoch", worker.epoch) != worker.epoch or not 0 < since <= worker.seq
            while not relist:
                lines = [json.dumps(job).encode() + b"\n" for job in worker.jobs.values() if job["version"] > since]
                since = worker.seq
                self.write(b"".join(lines) + mark(worker, since, False))
                await self.flush()
                if worker.seq == since and not await changed(worker, deadline - time.monotonic()):
                    break
            self.finish(mark(worker, worker.seq if relist else since, relist))

    async def changed(worker: FakeWorker, left: float) -> bool:
        try:
            await asyncio.wait_for(worker.changed.wait(), max(left, 0))
            return True
        except asyncio.TimeoutError:
            return False

    def mark(worker: FakeWorker, seq: int, full: bool) -> bytes:
        return json.dumps({"epoch": worker.epoch, "seq": seq, "full": full, "jobs": [], "removed": []}).encode() + b"\n"

    class Generate(Base):
        def post(self):
            key = self.request.headers.get("Idempotency-Key") or os.urandom(8).hex()
            prompt_id = prompt_id_for(key)
            worker = self.worker
            worker.put(prompt_id, "pending")
            asyncio.get_running_loop().call_later(0.05, worker.put, prompt_id, "completed")
            self.reply({"prompt_id": prompt_id, "worker": worker.name, "worker_url": "http://127.0.0.1:1",
                        "status_url": f"/status/{prompt_id}", "result_url": f"/result/{prompt_id}"})

    class Status(Base):
        def get(self, prompt_id):
            job = self.worker.jobs.get(prompt_id)
            self.reply(job if job else {"error": "no such job"}, 200 if job else 404)

    return web.Application([(r"/health", Health), (r"/workflows", Workflows), (r"/jobs", Jobs),
                            (r"/generate", Generate), (r"/status/([^/]+)", Status)])


async def serve_fakes(count: int, big: int, streams: bool) -> None:
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    by_port: dict[int, FakeWorker] = {}
    server = HTTPServer(make_fake_app(by_port, streams), idle_connection_timeout=120)
    ports = []
    for i in range(count + 1):
        sockets = bind_sockets(0, "127.0.0.1", backlog=1024)
        port = sockets[0].getsockname()[1]
        by_port[port] = FakeWorker("big" if i == count else f"fake-{i:04d}", jobs=big if i == count else 0)
        server.add_sockets(sockets)
        ports.append(port)
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()


# --- measuring the scheduler (this process) ---------------------------------------------------


class GCMeter:
    """Garbage collections since the last :meth:`take`: how many, the longest (CPU ms of this thread)
    and its generation, and how many were full (generation 2) passes."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_generation = 0
        self.count = self.full = 0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.thread_time()
            return
        took = time.thread_time() - self._started
        self.count += 1
        self.full += info["generation"] == 2
        if took > self.worst:
            self.worst, self.worst_generation = took, info["generation"]

    def take(self) -> str:
        text = (f"gc {self.count} x, longest {self.worst * 1000:.0f} ms gen {self.worst_generation}, "
                f"{self.full} full")
        self.worst, self.worst_generation, self.count, self.full = 0.0, 0, 0, 0
        return text


class StallMeter:
    """The event loop's longest stall since the last :meth:`take`, measured with a 5 ms timer: how
    late it fired (wall clock, which includes time this process waited for a CPU on a busy machine)
    and how much CPU this thread used meanwhile (the loop's own work, what a stall is about)."""

    def __init__(self) -> None:
        self.worst_wall = self.worst_cpu = 0.0
        self.gc = GCMeter()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            wall, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.005)
            self.worst_wall = max(self.worst_wall, time.perf_counter() - wall - 0.005)
            self.worst_cpu = max(self.worst_cpu, time.thread_time() - cpu)

    def take(self) -> str:
        wall, cpu = self.worst_wall, self.worst_cpu
        self.worst_wall = self.worst_cpu = 0.0
        return f"{cpu * 1000:.0f} cpu/{wall * 1000:.0f} wall ({self.gc.take()})"


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_pool(ports: list[int], names: list[str], args, directory: Path, meter: StallMeter) -> dict[str, Any]:
    """One scheduler over these fake workers: start-up, idle, placements, /workers, shutdown."""
    import yaml
    from tornado.httpclient import AsyncHTTPClient

    from t2i.config import load_scheduler_config
    from t2i.scheduler.app import Scheduler

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "workers.yaml").write_text(yaml.safe_dump({"workers": [
        {"name": name, "url": f"http://127.0.0.1:{port}", "max_queue": 1000} for name, port in zip(names, ports)]}))
    # One client places every job, and the fake workers never end one: without room for them all, every
    # placement past clients.max_jobs would be a quick 429, not a placement.
    (directory / "scheduler.yaml").write_text(yaml.safe_dump(
        {"listen": "127.0.0.1:0", "workers_file": "workers.yaml", "health_interval": args.health_interval,
         "clients": {"max_jobs": args.placements + 1}}))
    out: dict[str, Any] = {"workers": len(ports)}
    rss0 = rss_bytes()
    collector = start_gc(args)  # as t2i.scheduler.app.main() does before starting
    await asyncio.sleep(0.02)   # the meter sees start_gc's own collection now, not in the phase measured
    meter.take()
    started = time.perf_counter()
    scheduler = Scheduler(load_scheduler_config(directory / "scheduler.yaml"))
    await scheduler.start()
    if args.gc == "freeze":
        gc.freeze()  # what main() did before the policy: once started
    out["start_s"] = time.perf_counter() - started
    while not all(scheduler.mirror.feed_up(name) for name in names):
        await asyncio.sleep(0.05)
    out["all_feeds_up_s"] = time.perf_counter() - started
    out["startup_stall_ms"] = meter.take()
    await asyncio.sleep(args.health_interval * 1.2)  # every worker checked once more, off the start
    meter.take()
    blocks0, rss_idle0 = sys.getallocatedblocks(), rss_bytes()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(args.idle)
    out["idle_core_pct"] = 100 * (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    out["idle_stall_ms"] = meter.take()
    # Growth while idle: of the Python heap (allocated blocks: what the GC policy watches) and of RSS.
    out["idle_heap_growth"] = sys.getallocatedblocks() - blocks0
    out["idle_rss_growth_mb"] = (rss_bytes() - rss_idle0) / 1e6
    out["rss_mb"] = (rss_bytes() - rss0) / 1e6
    client = AsyncHTTPClient(force_instance=True, max_clients=64)
    latencies = []
    idle_rate = out["idle_core_pct"] / 100
    cpu0, wall0 = time.process_time(), time.perf_counter()
    body = json.dumps({"prompt": "a red fox", "steps": 4})
    for i in range(args.placements):
        t0 = time.perf_counter()
        response = await client.fetch(f"{scheduler.url}/generate", method="POST", body=body, raise_error=False,
                                      headers={"Content-Type": "application/json"})
        latencies.append(time.perf_counter() - t0)
        if response.code != 200:
            out.setdefault("placement_errors", []).append(response.code)
    # CPU per placement, the pool's idle work taken out; the client's own work is in it (same process).
    busy = time.process_time() - cpu0 - idle_rate * (time.perf_counter() - wall0)
    out["place_cpu_ms"] = 1000 * busy / args.placements
    out["place_p50_ms"] = 1000 * pct(latencies, 0.5)
    out["place_p99_ms"] = 1000 * pct(latencies, 0.99)
    out["place_stall_ms"] = meter.take()
    # The fake workers' own answer time (one process answers the whole pool's health checks and feeds,
    # unlike a real pool): a floor under the placement latency above, from the same client.
    direct = []
    for i in range(min(args.placements, 200)):
        t0 = time.perf_counter()
        await client.fetch(f"http://127.0.0.1:{ports[i % len(ports)]}/health", raise_error=False)
        direct.append(time.perf_counter() - t0)
    out["fake_p50_ms"] = 1000 * pct(direct, 0.5)
    out["fake_p99_ms"] = 1000 * pct(direct, 0.99)
    meter.take()
    t0 = time.perf_counter()
    response = await client.fetch(f"{scheduler.url}/workers", raise_error=False)
    out["workers_view_ms"] = 1000 * (time.perf_counter() - t0)
    out["workers_view_kb"] = len(response.body) / 1000
    t0 = time.perf_counter()
    await client.fetch(f"{scheduler.url}/health", raise_error=False)
    out["health_view_ms"] = 1000 * (time.perf_counter() - t0)
    out["views_stall_ms"] = meter.take()
    client.close()
    if collector is not None:
        # The policy's one long pause, done now to be measured: what it rescans and what it frees
        # (cyclic garbage that was frozen alive: the leak it bounds).
        collector.compact()
        out["frozen_objects"] = gc.get_freeze_count()
        out["compaction_ms"] = 1000 * STATS.last_compaction_pause
        out["compaction_freed"] = STATS.last_compaction_freed
        meter.take()
    t0 = time.perf_counter()
    await scheduler.stop()
    out["stop_s"] = time.perf_counter() - t0
    stop_gc(collector)
    return out


def start_gc(args):
    """The GC policy as the servers' main() starts it, before the server (``--gc policy``)."""
    from t2i.gcpolicy import GCPolicy

    if args.gc == "policy":
        collector = GCPolicy()
        collector.start()
        return collector
    return None


def stop_gc(collector) -> None:
    """Stop the policy and give the next scheduler a fresh heap (not measured)."""
    if collector is not None:
        collector.stop()
    gc.unfreeze()
    gc.collect()


async def run_listing(port: int, jobs: int, directory: Path, meter: StallMeter, args) -> dict[str, Any]:
    """A scheduler following one worker that holds ``jobs`` jobs: time to list, longest stall."""
    import yaml

    from t2i.config import load_scheduler_config
    from t2i.scheduler.app import Scheduler

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "workers.yaml").write_text(yaml.safe_dump({"workers": [
        {"name": "big", "url": f"http://127.0.0.1:{port}"}]}))
    (directory / "scheduler.yaml").write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "workers_file": "workers.yaml"}))
    collector = start_gc(args)
    await asyncio.sleep(0.02)   # (see run_pool): the previous pool's objects collected before the listing
    meter.take()
    t0 = time.perf_counter()
    scheduler = Scheduler(load_scheduler_config(directory / "scheduler.yaml"))
    await scheduler.start()
    if args.gc == "freeze":
        gc.freeze()
    while not scheduler.mirror.feed_up("big"):
        await asyncio.sleep(0.01)
    out = {"jobs": jobs, "listed_s": time.perf_counter() - t0, "listing_stall_ms": meter.take(),
           "mirrored": scheduler.mirror.jobs_of("big")}
    await asyncio.sleep(2)  # held: the GC policy's ticks over 20,000 mirrored jobs
    out["held_stall_ms"] = meter.take()
    await scheduler.stop()
    stop_gc(collector)
    return out


async def bench(args) -> None:
    logging.basicConfig(level=logging.ERROR)
    from t2i.httpclient import configure_http_client

    print(f"outbound client: {configure_http_client()}; python {sys.version.split()[0]}; {os.cpu_count()} cores")
    proc = subprocess.Popen([sys.executable, __file__, "--serve-fakes", str(args.workers), "--listing",
                             str(args.listing)] + (["--no-stream"] if args.no_stream else []),
                            stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(proc.stdout.readline())
        big, ports = ports[-1], ports[:-1]
        meter = StallMeter()
        with tempfile.TemporaryDirectory(prefix="t2i-scale-") as tmp:
            names = [f"fake-{i:04d}" for i in range(len(ports))]
            base = await run_pool(ports[:args.baseline], names[:args.baseline], args, Path(tmp) / "base", meter)
            full = await run_pool(ports, names, args, Path(tmp) / "full", meter)
            listing = await run_listing(big, args.listing, Path(tmp) / "big", meter, args)
        meter.task.cancel()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    extra = full["workers"] - base["workers"]
    print(f"{'':20}{'baseline':>40}{'full':>40}")
    for key in full:
        if isinstance(full[key], (int, float)):
            print(f"{key:20}{base.get(key, float('nan')):40.2f}{full[key]:40.2f}")
        else:
            print(f"{key:20}{base.get(key)!s:>40}{full[key]!s:>40}")
    per_worker_cpu = (full["idle_core_pct"] - base["idle_core_pct"]) / extra
    per_worker_kb = 1000 * (full["rss_mb"] - base["rss_mb"]) / extra
    print(f"\nper followed idle worker: {per_worker_cpu:.4f} % of a core, {per_worker_kb:.1f} KB "
          f"(({full['workers']} - {base['workers']}) workers, health_interval {args.health_interval} s)")
    for result in (base, full):
        if result.get("placement_errors"):
            codes = collections.Counter(result["placement_errors"])
            print(f"NOT PLACED at {result['workers']} workers: {len(result['placement_errors'])} of {args.placements} "
                  f"POST /generate answered {dict(codes)}: the latencies below are not all placements")
    print(f"placement at {full['workers']} workers: p50 {full['place_p50_ms']:.1f} ms, "
          f"p99 {full['place_p99_ms']:.1f} ms ({args.placements} sequential POST /generate, client in-process);"
          f" x{full['place_p99_ms'] / max(base['place_p99_ms'], 1e-9):.1f} the p99 at {base['workers']}; "
          f"CPU per placement {full['place_cpu_ms']:.1f} ms (client included) vs {base['place_cpu_ms']:.1f} ms; "
          f"a fake worker's own GET /health from the same client: p50 {full['fake_p50_ms']:.1f} ms, "
          f"p99 {full['fake_p99_ms']:.1f} ms (vs {base['fake_p50_ms']:.1f}, {base['fake_p99_ms']:.1f} at {base['workers']})")
    print(f"start-up {full['start_s']:.2f} s (all feeds up {full['all_feeds_up_s']:.2f} s), "
          f"SIGTERM-like stop {full['stop_s']:.2f} s, GET /workers {full['workers_view_ms']:.0f} ms "
          f"({full['workers_view_kb']:.0f} KB)")
    print(f"one worker holding {listing['jobs']} jobs: listed in {listing['listed_s']:.2f} s, "
          f"{listing['mirrored']} mirrored, longest loop stall (ms) {listing['listing_stall_ms']}; "
          f"then held 2 s: {listing['held_stall_ms']}")
    print("longest loop stall (ms) at {workers} workers: start-up {startup_stall_ms}, idle {idle_stall_ms}, "
          "placing {place_stall_ms}, /workers+/health {views_stall_ms}".format(**full))
    print(f"GC: --gc {args.gc}; while idle {args.idle:.0f} s the heap grew by {full['idle_heap_growth']} blocks "
          f"and RSS by {full['idle_rss_growth_mb']:.1f} MB", end="")
    if "compaction_ms" in full:
        print(f"; a compaction (unfreeze, full collection, freeze again: {full['frozen_objects']} objects) "
              f"took {full['compaction_ms']:.0f} ms and freed {full['compaction_freed']}")
    else:
        print()
    print(f"feeds: {'long-polls (--no-stream)' if args.no_stream else 'streamed (GET /jobs?stream=1)'}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(wall-clock numbers include waiting for a CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--baseline", type=int, default=10, help="workers in the baseline pool")
    parser.add_argument("--idle", type=float, default=30, help="seconds of idle CPU measured")
    parser.add_argument("--placements", type=int, default=500)
    parser.add_argument("--listing", type=int, default=20000, help="jobs held by the big-listing worker")
    parser.add_argument("--health-interval", type=float, default=5.0)
    parser.add_argument("--gc", choices=["policy", "freeze", "off"], default="policy",
                        help="policy: t2i.gcpolicy as the servers run it; freeze: one gc.freeze() after start-up "
                             "(before the policy); off: CPython's defaults")
    parser.add_argument("--no-stream", action="store_true",
                        help="fake workers answer GET /jobs?stream=1 with a plain page (a worker that does not stream)")
    parser.add_argument("--serve-fakes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fakes is not None:
        asyncio.run(serve_fakes(args.serve_fakes, args.listing, not args.no_stream))
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
