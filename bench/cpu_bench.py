"""CPU per job: the worker's and the scheduler's own CPU time for each job, the ComfyUI double's as a reference.

    python bench/cpu_bench.py [--jobs 200] [--runs 3] [--concurrency 4] [--step-time 0.01] [--idle 5]

Starts, each as its own process on 127.0.0.1: the ComfyUI test double (``python -m t2i.comfy_sim``),
one worker (``python -m t2i.worker --config ...``, its defaults: ahead 2, backlog 128, journal on) and
one scheduler over it (``python -m t2i.scheduler --config ...``, its defaults), all at log level info
as deployed, the minimal forwarder and the minimal wrapper. Then, per run, eight phases of ``--jobs`` jobs of 1 sampler step (64x64), at most
``--concurrency`` in flight, each reading every process's CPU time (user + system, all threads; psutil
when installed, else /proc/<pid>/stat) before and after:

  direct:  POST /generate to the worker, GET /result/{id}?wait=30 there, GET image_url
           (the scheduler only follows the worker's /jobs feed meanwhile);
  image:   the same in one request after the submit: GET /result/{id}?wait=30 with Accept: image/*
           answers with the image itself;
  result:  the same through the scheduler (one request to the result);
  redirect: POST /generate to the scheduler, GET /result/{id}?wait=30 with Accept: image/* there too,
           whose 307 sends it on to the job's worker, which answers with the image (a client that knows
           only the scheduler's address);
  page:    through the scheduler as the page does it: /status/{id}?wait=20&since=V long-polls until
           the job ends, then GET image_url;
  submit:  POST /generate to the scheduler, then the one image request at the worker its answer names;
  floor:   the same with a minimal Tornado forwarder (``bench/floors.py forwarder``: POST in, the same curl
           client out to the worker, its answer back, nothing else) in the scheduler's place: the floor
           under the scheduler's CPU for a job it places. The scheduler's own cost of placing is its
           submit phase less its image phase (where it only mirrors), printed against the forwarder's;
  bare:    POST /generate and the one image request to a minimal ComfyUI wrapper on the worker's stack
           (``bench/floors.py wrapper``: Tornado server, curl client, websocket_connect; no journal, no image
           on disk, no feed, no queue of its own, no logs) on the same ComfyUI double: the floor under the
           worker's CPU per job, printed against the worker's image phase.

Before the runs the processes sit idle for ``--idle`` seconds: their idle CPU rate (timers, health
checks, feed long-polls) is the same-run baseline. Printed per process: ms of CPU per job, raw and net of
the idle rate, and the median [range] over the runs. Targets (issue 15): worker <= 5 ms, scheduler <= 1 ms
per job. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (CPU_SOURCE, Http, Process, code_version, comfy_process, cpu_resolution,  # noqa: E402
                     cpu_seconds, free_port, healthy, machine_line, med_range, run_in_temp_dir, scheduler_process,
                     scheduler_sees, stop_all, wait_until, worker_process)

PHASES = ("direct", "image", "result", "redirect", "page", "submit", "floor", "bare")
TARGETS = {"worker": 5.0, "scheduler": 1.0}
FINAL = ("completed", "failed", "cancelled")


async def one_job(http: Http, base: str, phase: str, number: int, worker_url: str) -> None:
    body = {"prompt": f"cpu bench job {number}", "steps": 1, "width": 64, "height": 64,
            "seed": random.randrange(2 ** 48)}
    while True:
        reply = await http.request("POST", base + "/generate", body)
        if reply.status == 200:
            break
        if reply.status not in (429, 503):
            raise SystemExit(f"POST {base}/generate: {reply.status} {reply.body[:300]!r}")
        await asyncio.sleep(float(reply.headers.get("retry-after", 1)))
    prompt_id = reply.json()["prompt_id"]
    if phase in ("submit", "floor"):  # the placing server's part is done: the picture from the worker
        base, phase = worker_url, "image"
    elif phase == "bare":
        phase = "image"
    if phase == "page":
        since = 0
        while True:
            reply = await http.request("GET", f"{base}/status/{prompt_id}?wait=20&since={since}")
            if reply.status != 200:
                await asyncio.sleep(0.2)
                continue
            state = reply.json()
            since = state["version"]
            if state["status"] in FINAL:
                break
    elif phase in ("image", "redirect"):
        url = f"{base}/result/{prompt_id}?wait=30"
        while True:
            reply = await http.request("GET", url, headers={"Accept": "image/*"})
            if reply.status == 307:  # the scheduler: the same request at the job's worker
                url = reply.headers["location"]
                continue
            if reply.status != 202:
                break
        if reply.status != 200 or not reply.headers.get("content-type", "").startswith("image/"):
            raise SystemExit(f"job {prompt_id}: {reply.status} {reply.body[:300]!r}")
        return
    else:
        while True:
            reply = await http.request("GET", f"{base}/result/{prompt_id}?wait=30")
            if reply.status != 202:
                break
        state = reply.json()
    if state.get("status") != "completed":
        raise SystemExit(f"job {prompt_id} ended {state.get('status')}: {state.get('error')}")
    image = await http.request("GET", state["image_url"])
    if image.status != 200:
        raise SystemExit(f"GET {state['image_url']}: {image.status}")


async def http_ok(http: Http, url: str) -> bool:
    """Whether a server answers at ``url`` yet (any status)."""
    try:
        await http.request("GET", url)
    except OSError:
        return False
    return True


async def phase_run(http: Http, base: str, phase: str, jobs: int, concurrency: int, worker_url: str) -> None:
    numbers = iter(range(jobs))

    async def lane() -> None:
        for number in numbers:
            await one_job(http, base, phase, number, worker_url)

    await asyncio.gather(*(lane() for _ in range(concurrency)))


async def run(args: argparse.Namespace, directory: Path) -> int:
    comfy_port, worker_port, scheduler_port, forwarder_port, bare_port = (free_port() for _ in range(5))
    worker_url, scheduler_url = f"http://127.0.0.1:{worker_port}", f"http://127.0.0.1:{scheduler_port}"
    bases = {"direct": worker_url, "image": worker_url, "floor": f"http://127.0.0.1:{forwarder_port}",
             "bare": f"http://127.0.0.1:{bare_port}"}
    processes = {
        "comfy double": comfy_process(directory, "comfy", comfy_port, args.step_time),
        "worker": worker_process(directory, "gpu-a", worker_port, f"http://127.0.0.1:{comfy_port}",
                                 log_level=args.log_level),
        "scheduler": scheduler_process(directory, "scheduler", scheduler_port, [{"name": "gpu-a", "url": worker_url}],
                                       log_level=args.log_level),
        "forwarder": Process(directory, "forwarder", "bench.floors", "forwarder", str(forwarder_port), worker_url),
        "bare wrapper": Process(directory, "bare", "bench.floors", "wrapper", str(bare_port),
                                f"http://127.0.0.1:{comfy_port}"),
    }
    print(f"cpu bench: {args.runs} run(s) x {len(PHASES)} phases x {args.jobs} jobs of 1 step (64x64), "
          f"concurrency {args.concurrency}, double step time {args.step_time}s; CPU from {CPU_SOURCE}"
          + (f" ({cpu_resolution() * 1000:.0f} ms ticks)" if cpu_resolution() else ""))
    print(f"  code {code_version()}; {machine_line()}; processes and logs in {directory}", flush=True)
    http = Http()
    for process in processes.values():
        process.start()
    results: dict[str, dict[str, list[float]]] = {phase: {name: [] for name in processes} for phase in PHASES}
    try:
        await wait_until(lambda: healthy(http, worker_url), what="the worker", processes=processes.values())
        await wait_until(lambda: scheduler_sees(http, scheduler_url, 1), what="the scheduler",
                         processes=processes.values())
        for name, base in (("the forwarder", bases["floor"]), ("the bare wrapper", bases["bare"])):
            await wait_until(lambda: http_ok(http, base + "/generate"), what=name, processes=processes.values())
        for phase in PHASES:  # warm-up: imports, first-use caches, the feed's first changes
            await phase_run(http, bases.get(phase, scheduler_url), phase, 5, 1, worker_url)
        await asyncio.sleep(1)
        pids = {name: process.pid for name, process in processes.items()}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.monotonic()
        await asyncio.sleep(args.idle)
        idle_wall = time.monotonic() - started
        idle_rate = {name: (cpu_seconds(pid) - before[name]) / idle_wall for name, pid in pids.items()}
        print("  idle: " + ", ".join(f"{name} {rate * 1000:.1f} ms/s" for name, rate in idle_rate.items()))
        for run_no in range(args.runs):
            for phase in PHASES:
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                started = time.monotonic()
                await phase_run(http, bases.get(phase, scheduler_url), phase, args.jobs, args.concurrency, worker_url)
                wall = time.monotonic() - started
                after = {name: cpu_seconds(pid) for name, pid in pids.items()}
                line = []
                for name in pids:
                    used = after[name] - before[name]
                    net = (used - idle_rate[name] * wall) / args.jobs * 1000
                    results[phase][name].append(net)
                    line.append(f"{name} {used / args.jobs * 1000:5.2f} raw / {net:5.2f} net")
                print(f"run {run_no + 1} {phase:6s} {args.jobs / wall:5.1f} jobs/s  ms CPU per job: "
                      + ", ".join(line), flush=True)
                await asyncio.sleep(0.5)
    finally:
        http.close()
        stop_all(reversed(list(processes.values())))

    print(f"\nms of CPU per job (net of the idle rate), median [range] of {args.runs} run(s):")
    for phase in PHASES:
        cells = []
        for name in processes:
            target = f" (target <= {TARGETS[name]:g})" if name in TARGETS else ""
            cells.append(f"{name} {med_range(results[phase][name], '{:.2f}')}{target}")
        print(f"  {phase:6s} " + "; ".join(cells))
    bare = results["bare"]["bare wrapper"]
    print(f"  the worker's job (image phase) {med_range(results['image']['worker'], '{:.2f}')} ms; a minimal Tornado "
          f"ComfyUI wrapper's {med_range(bare, '{:.2f}')} ms: "
          f"{med_range([w / b for w, b in zip(results['image']['worker'], bare) if b > 0], '{:.2f}')}x the floor")
    placing = [submit - image for submit, image in zip(results["submit"]["scheduler"], results["image"]["scheduler"])]
    floor = results["floor"]["forwarder"]
    print(f"  placing a job at the scheduler (submit less image, per run) {med_range(placing, '{:.2f}')} ms; a minimal "
          f"Tornado forwarder's whole job {med_range(floor, '{:.2f}')} ms: "
          f"{med_range([p / f for p, f in zip(placing, floor) if f > 0], '{:.2f}')}x the floor")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per phase per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="jobs in flight at once")
    parser.add_argument("--step-time", type=float, default=0.01, help="the double's seconds per sampler step")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle baseline before the runs")
    parser.add_argument("--log-level", default="info", help="the worker's and scheduler's (default: info)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with configs and logs")
    args = parser.parse_args()
    run_in_temp_dir(run, args, "t2i-cpu-")


if __name__ == "__main__":
    main()
