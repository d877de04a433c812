"""GPUs never idle while work waits: the makespan of a burst of mixed jobs on mixed-speed GPUs.

    python bench/makespan_bench.py [--jobs 200] [--runs 1] [--scale 1] [--clients 40] [--seed 15]
                                   [--modes page,at-once] [--timeout 600] [--backlog N] [--max-queue N]

Per run and client mode, a fresh fleet, each part its own process on 127.0.0.1: 4 ComfyUI test doubles
with step times 0.02, 0.02, 0.01, 0.04 s (x ``--scale``: relative speeds 1, 1, 2, 0.5), a worker in
front of each (its defaults: ``comfyui.ahead`` 2, ``backlog`` as configured by default, or ``--backlog``;
journal on), one scheduler over them (its defaults; workers.yaml entries without ``max_queue``, so each
worker takes as many jobs as its /health capacity says, unless ``--max-queue``). Before the burst each
worker runs ``--warm-up`` (8) jobs of 2 and 18 steps in turn sent to it directly, at least until its
/health reports its seconds per step (after 3): two sizes, so a worker that fits seconds per job and per
step (t2i/worker/speed.py) knows both before the burst, as one in service would.
Then ``--jobs`` jobs of
1-20 steps (seeded random, 64x64) are submitted at once through the scheduler, by ``--clients`` API
clients (a key each in scheduler.yaml, jobs dealt round-robin, so the per-client cap of 8 unfinished
jobs does not bind at the default 5 jobs per client), each job on its own like a page's row:

  page:    503 and 429 waited out as static/app.js does (api.js retryWait): the server's Retry-After
           x (1 + 0.25 r) when it gave one, else Backoff(1 s, cap 10 s, jitter 0.5).next(); no
           answer: Backoff(1.5 s, cap 30 s);
  at-once: 503 and 429 sent again at once.

Accepted jobs are followed with /status long-polls (?wait=20&since=V) and their image fetched from
the worker. Printed per run: the makespan (burst start -> the last job's completed_at, worker clock),
the lower bound max(total steps / total speed, longest job x fastest step time), their ratio, the 503s
and 429s answered; per GPU its jobs and steps, its busy share of the makespan (ComfyUI's execution_start
-> execution_success, from its /history), its idle time while work waited (from the burst's start to the
last job's execution_start: some job was waiting then, in a queue or a client's backoff), and the
double's own time per job beyond its steps (on a loaded 2-core box its timers run late: part of any gap
to the bound that no scheduler can close; idle-while-waiting is not inflated by it), and the ratio to
the same bound at the step times the doubles actually ran at (busy seconds / steps placed, per GPU). Then medians
[ranges] per mode. Target (issue 15): makespan <= 1.10x the lower bound with page-like clients. Asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (Http, code_version, comfy_process, free_port, healthy, machine_line,  # noqa: E402
                     med_range, scheduler_process, scheduler_sees, stop_all, wait_until, worker_process)

STEP_TIMES = (0.02, 0.02, 0.01, 0.04)
FINAL = ("completed", "failed", "cancelled")


class Backoff:
    """static/api.js Backoff: about first, first*2 ... capped, each cut by a random part of up to ``jitter``."""

    def __init__(self, first: float, cap: float, rng: random.Random, jitter: float = 0.5):
        self.first, self.cap, self.rng, self.jitter = first, cap, rng, jitter
        self.current = first

    def next(self) -> float:
        base = self.current
        self.current = min(self.current * 2, self.cap)
        return base * (1 - self.jitter * self.rng.random())


def retry_wait(value: str | None, backoff: Backoff, rng: random.Random) -> float:
    """static/api.js retryWait: the server's Retry-After, never sooner and up to a quarter later
    (afterRetryAfter), when it gave one; else the backoff's next wait."""
    try:
        seconds = max(0.0, float(value)) if value else None
    except ValueError:
        seconds = None
    return backoff.next() if seconds is None else seconds * (1 + 0.25 * rng.random())


@dataclass
class Job:
    number: int
    steps: int
    client: int
    prompt_id: str | None = None
    worker: str | None = None
    status: str | None = None
    error: str | None = None
    completed_at: float | None = None
    image_at: float | None = None
    answers: Counter = field(default_factory=Counter)


class Fleet:
    def __init__(self, directory: Path, step_times: list[float], keys: dict[str, str], log_level: str,
                 backlog: int | None = None, max_queue: int | None = None):
        self.directory = directory
        self.step_times = step_times
        self.comfy_urls, self.worker_urls, self.processes = [], [], []
        entries = []
        for i, step_time in enumerate(step_times):
            comfy_port, worker_port = free_port(), free_port()
            self.comfy_urls.append(f"http://127.0.0.1:{comfy_port}")
            self.worker_urls.append(f"http://127.0.0.1:{worker_port}")
            self.processes.append(comfy_process(directory, f"comfy-{i}", comfy_port, step_time))
            self.processes.append(worker_process(directory, f"gpu-{i}", worker_port, self.comfy_urls[i],
                                                 log_level=log_level,
                                                 **({"backlog": backlog} if backlog is not None else {})))
            entries.append({"name": f"gpu-{i}", "url": self.worker_urls[i],
                            **({"max_queue": max_queue} if max_queue is not None else {})})
        scheduler_port = free_port()
        self.url = f"http://127.0.0.1:{scheduler_port}"
        self.processes.append(scheduler_process(directory, "scheduler", scheduler_port, entries, log_level=log_level,
                                                clients={"keys": keys}))

    def start(self) -> None:
        for process in self.processes:
            process.start()

    def stop(self) -> None:
        stop_all(reversed(self.processes))


class Burst:
    def __init__(self, http: Http, fleet: Fleet, jobs: list[Job], keys: list[str], mode: str, seed: int,
                 timeout: float):
        self.http, self.fleet, self.jobs, self.keys, self.mode = http, fleet, jobs, keys, mode
        self.rng = random.Random(seed + 1)
        self.deadline = time.monotonic() + timeout
        self.answers: Counter = Counter()

    async def fetch(self, route: str, method: str, url: str, body=None, key: str | None = None, timeout: float = 40):
        headers = {"Authorization": f"Bearer {key}"} if key else None
        try:
            reply = await self.http.request(method, url, body, headers=headers, timeout=timeout)
        except ConnectionError:
            self.answers[f"{route} no answer"] += 1
            return None
        self.answers[f"{route} {reply.status}"] += 1
        return reply

    async def run_job(self, job: Job) -> None:
        key = self.keys[job.client]
        body = {"prompt": f"makespan job {job.number}", "steps": job.steps, "width": 64, "height": 64,
                "seed": job.number}
        busy, limited, network = (Backoff(1.0, 10.0, self.rng), Backoff(1.0, 10.0, self.rng),
                                  Backoff(1.5, 30.0, self.rng))
        while True:
            if time.monotonic() > self.deadline:
                job.status = "never accepted"
                return
            reply = await self.fetch("POST /generate", "POST", self.fleet.url + "/generate", body, key)
            if reply is not None:
                job.answers[reply.status] += 1
            if reply is not None and reply.status == 200:
                answer = reply.json()
                job.prompt_id, job.worker = answer["prompt_id"], answer.get("worker")
                break
            if self.mode == "at-once":
                await asyncio.sleep(0)
                continue
            if reply is None:
                await asyncio.sleep(network.next())
            elif reply.status == 503:
                await asyncio.sleep(retry_wait(reply.headers.get("retry-after"), busy, self.rng))
            elif reply.status == 429:
                await asyncio.sleep(retry_wait(reply.headers.get("retry-after"), limited, self.rng))
            else:
                job.status, job.error = f"refused {reply.status}", reply.body[:200].decode(errors="replace")
                return
        since = 0
        while time.monotonic() < self.deadline:
            reply = await self.fetch("GET /status", "GET", f"{self.fleet.url}/status/{job.prompt_id}?wait=20&since={since}",
                                     key=key)
            if reply is None or reply.status != 200:
                await asyncio.sleep(0.5)
                continue
            state = reply.json()
            since = state["version"]
            if state["status"] in FINAL:
                job.status, job.error, job.completed_at = state["status"], state.get("error"), state.get("completed_at")
                if job.status == "completed":
                    image = await self.fetch("GET image", "GET", state["image_url"])
                    if image is not None and image.status == 200:
                        job.image_at = time.time()
                return
        job.status = "stuck"


WARM_UP_STEPS = (2, 18)   # 10 on average, as before; two sizes tell a job's fixed seconds from its steps


async def warm_up(http: Http, fleet: Fleet, jobs: int, most: int = 20) -> list[dict]:
    """``jobs`` jobs of 2 and 18 steps in turn straight to each worker, more until its /health reports its
    seconds per step (a worker trusts its measure after a few jobs), so placement knows each GPU's speed
    as after a while in service (the measure is a moving average: one job slowed by the box weighs less)."""
    async def measured(url: str) -> None:
        for n in range(most):
            load = (await http.request("GET", url + "/health")).json().get("load") or {}
            if n >= jobs and load.get("seconds_per_step"):
                return
            body = {"prompt": f"warm-up {n}", "steps": WARM_UP_STEPS[n % 2], "width": 64, "height": 64}
            reply = await http.request("POST", url + "/generate", body)
            if reply.status != 200:
                raise SystemExit(f"warm-up on {url}: {reply.status} {reply.body[:200]!r}")
            prompt_id = reply.json()["prompt_id"]
            while (await http.request("GET", f"{url}/result/{prompt_id}?wait=30")).status == 202:
                pass
        raise SystemExit(f"warm-up on {url}: no seconds_per_step in /health after {most} jobs")

    await asyncio.gather(*(measured(url) for url in fleet.worker_urls))
    return [(await http.request("GET", url + "/health")).json().get("load") for url in fleet.worker_urls]


async def executions(http: Http, fleet: Fleet, ids: set[str]) -> list[dict[str, tuple[float, float]]]:
    """Per ComfyUI: prompt_id -> (execution_start, end) in epoch seconds, for the burst's jobs (its /history)."""
    out = []
    for url in fleet.comfy_urls:
        history = (await http.request("GET", url + "/history?max_items=100000")).json()
        runs = {}
        for prompt_id, entry in history.items():
            if prompt_id not in ids:
                continue
            stamps = {event: data.get("timestamp") for event, data in entry["status"]["messages"]}
            end = stamps.get("execution_success") or stamps.get("execution_error") or stamps.get("execution_interrupted")
            if end is not None and "execution_start" in stamps:
                runs[prompt_id] = (stamps["execution_start"] / 1000, end / 1000)
        out.append(runs)
    return out


async def one_run(args: argparse.Namespace, mode: str, run_no: int, directory: Path) -> dict:
    step_times = [t * args.scale for t in STEP_TIMES]
    rng = random.Random(args.seed)
    jobs = [Job(n, rng.randint(1, 20), n % args.clients) for n in range(args.jobs)]
    keys = {f"page-{i}": secrets.token_urlsafe(24) for i in range(args.clients)}
    home = directory / f"{mode}-{run_no}"
    home.mkdir()
    fleet = Fleet(home, step_times, keys, args.log_level, args.backlog, args.max_queue)
    http = Http()
    fleet.start()
    try:
        await wait_until(lambda: all_healthy(http, fleet), what="the workers", processes=fleet.processes)
        await wait_until(lambda: scheduler_sees(http, fleet.url, len(step_times)), what="the scheduler",
                         processes=fleet.processes)
        loads = await warm_up(http, fleet, args.warm_up)
        await asyncio.sleep(args.settle)  # the scheduler's next health check sees the warmed-up loads
        burst = Burst(http, fleet, jobs, list(keys.values()), mode, args.seed, args.timeout)
        started = time.time()
        await asyncio.gather(*(burst.run_job(job) for job in jobs))
        clients_done = time.time() - started
        ids = {job.prompt_id for job in jobs if job.prompt_id}
        runs = await executions(http, fleet, ids)
    finally:
        http.close()
        fleet.stop()

    total_steps = sum(job.steps for job in jobs)
    speed = sum(1 / t for t in step_times)
    bound = max(total_steps / speed, max(job.steps for job in jobs) * min(step_times))
    completed = [job for job in jobs if job.status == "completed"]
    makespan = max(job.completed_at for job in completed) - started if completed else float("nan")
    outcomes = Counter(job.status for job in jobs)
    answers = Counter()
    for job in jobs:
        answers.update(job.answers)
    by_worker = Counter(job.worker for job in jobs if job.worker)
    steps_by_worker = Counter()
    for job in jobs:
        if job.worker:
            steps_by_worker[job.worker] += job.steps
    print(f"\n{mode} run {run_no + 1}: {len(jobs)} jobs, {total_steps} steps, {args.clients} clients")
    print("  warmed-up loads: " + ", ".join(f"gpu-{i} {load}" for i, load in enumerate(loads)))
    print(f"  outcomes {dict(outcomes)}; POST /generate answers {dict(sorted(answers.items()))}")
    print(f"  makespan {makespan:.2f} s (all images held by the clients at {clients_done:.2f} s); "
          f"lower bound {bound:.2f} s; ratio {makespan / bound:.2f}x  (target <= 1.10x)")
    # "Idle while work waits": GPU-seconds with nothing executing between the burst's start and the moment
    # the last job started executing (until then some job was waiting: in a queue or in a client's backoff).
    last_start = max((start for gpu in runs for start, _ in gpu.values()), default=started)
    window = last_start - started
    shares, idle = [], []
    for i, gpu in enumerate(runs):
        name = f"gpu-{i}"
        busy = sum(end - start for start, end in gpu.values())
        in_window = sum(max(0.0, min(end, last_start) - max(start, started)) for start, end in gpu.values())
        idle.append(window - in_window)
        extras = [gpu[job.prompt_id][1] - gpu[job.prompt_id][0] - job.steps * step_times[i]
                  for job in jobs if job.prompt_id in gpu]
        extra = statistics.mean(extras) if extras else float("nan")
        share = busy / makespan if makespan == makespan and makespan > 0 else float("nan")
        shares.append(share)
        first = min((start for start, _ in gpu.values()), default=float("nan"))
        last = max((end for _, end in gpu.values()), default=float("nan"))  # GPUs ending apart: misjudged work
        print(f"  {name} (step {step_times[i] * 1000:.0f} ms): {by_worker[name]:3d} jobs, {steps_by_worker[name]:5d} "
              f"steps, busy {busy:6.2f} s = {share * 100:5.1f} % of the makespan, idle {idle[-1]:5.2f} s while work "
              f"waited, first start +{first - started:5.2f} s, last end +{last - started:5.2f} s, "
              f"the double's own time per job ~{extra * 1000:.0f} ms")
    idle_share = sum(idle) / (window * len(runs)) if window > 0 else 0.0
    # The same bound at the speeds the doubles ran at in this run (busy seconds per step placed there,
    # their own per-job time included): what is left of the ratio is placement and idling, not the box.
    effective = [sum(end - start for start, end in gpu.values()) / steps_by_worker[f"gpu-{i}"]
                 if steps_by_worker[f"gpu-{i}"] else step_times[i] for i, gpu in enumerate(runs)]
    effective_bound = max(total_steps / sum(1 / t for t in effective), max(job.steps for job in jobs) * min(effective))
    print(f"  idle while work waited (burst start -> last job started, {window:.2f} s): {sum(idle):.2f} GPU-seconds "
          f"= {idle_share * 100:.1f} % of the GPUs' time then")
    print(f"  at the step times the doubles ran at ({', '.join(f'{t * 1000:.0f}' for t in effective)} ms per step, "
          f"their own per-job time included): bound {effective_bound:.2f} s, ratio {makespan / effective_bound:.2f}x")
    return {"makespan": makespan, "bound": bound, "ratio": makespan / bound, "503": answers[503],
            "429": answers[429], "busy": statistics.mean(shares) if shares else float("nan"), "idle": idle_share,
            "effective_ratio": makespan / effective_bound,
            "completed": len(completed), "clients_done": clients_done}


async def all_healthy(http: Http, fleet: Fleet) -> bool:
    for url in fleet.worker_urls:
        if not await healthy(http, url):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--runs", type=int, default=1, help="runs per client mode (a fresh fleet each)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the step times 0.02, 0.02, 0.01, 0.04")
    parser.add_argument("--clients", type=int, default=40, help="API clients the jobs are dealt to")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--settle", type=float, default=6.0,
                        help="seconds between the warm-up and the burst (the scheduler's health_interval is 5)")
    parser.add_argument("--modes", default="page,at-once", help="comma-separated: page, at-once")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per burst before jobs count as stuck")
    parser.add_argument("--log-level", default="info", help="the workers' and scheduler's (default: info)")
    parser.add_argument("--warm-up", type=int, default=8,
                        help="jobs of 2 and 18 steps in turn each worker runs before the burst (at least until it reports its speed)")
    parser.add_argument("--backlog", type=int, help="the workers' backlog (default: the worker's default)")
    parser.add_argument("--max-queue", type=int, help="workers.yaml max_queue of each (default: none set)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with configs and logs")
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if any(mode not in ("page", "at-once") for mode in modes):
        parser.error("--modes: page and/or at-once")
    directory = Path(tempfile.mkdtemp(prefix="t2i-makespan-"))
    print(f"makespan bench: {args.jobs} jobs of 1-20 steps (seed {args.seed}) at once, 4 GPUs with step times "
          f"{', '.join(f'{t * args.scale * 1000:g}' for t in STEP_TIMES)} ms; modes {', '.join(modes)}, "
          f"{args.runs} run(s) each; workers' backlog {args.backlog if args.backlog is not None else 'default'}, "
          f"max_queue {args.max_queue if args.max_queue is not None else 'unset'}")
    print(f"  code {code_version()}; {machine_line()}; processes and logs in {directory}", flush=True)
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        for run_no in range(args.runs):
            for mode in modes:
                results[mode].append(asyncio.run(one_run(args, mode, run_no, directory)))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    print(f"\nmakespan / lower bound, median [range] of {args.runs} run(s) per mode (target <= 1.10x with page clients):")
    for mode, runs in results.items():
        print(f"  {mode:8s} makespan {med_range([r['makespan'] for r in runs], '{:.2f}')} s, bound "
              f"{runs[0]['bound']:.2f} s, ratio {med_range([r['ratio'] for r in runs], '{:.2f}')}x, "
              f"at the doubles' actual speeds {med_range([r['effective_ratio'] for r in runs], '{:.2f}')}x, "
              f"503s {med_range([r['503'] for r in runs], '{:.0f}')}, 429s {med_range([r['429'] for r in runs], '{:.0f}')}, "
              f"GPUs busy {med_range([r['busy'] * 100 for r in runs], '{:.0f}')} % of the makespan, idle while work waited "
              f"{med_range([r['idle'] * 100 for r in runs], '{:.0f}')} %, "
              f"completed {med_range([r['completed'] for r in runs], '{:.0f}')}/{args.jobs}")
    sys.exit(0)


if __name__ == "__main__":
    main()
