"""Fairness: one client floods, another submits one job at a time. How long does the second one wait?

A child process runs ComfyUI test doubles, workers and a scheduler (``clients`` with keys for
"flood" and "polite", ``max_jobs`` as given) on 127.0.0.1; this process is the two clients:

- **flood** keeps ``--flood`` submissions going at once, each retrying a 503 or 429 every 0.1 s
  (Retry-After ignored) and submitting again as soon as one is accepted;
- **polite** submits one job, follows it to its end (``/status`` long-polls), then the next; on a
  503 or 429 it waits the Retry-After it was given.

First the polite client alone: one job's run time (``completed_at - started_at``), its routing
(``POST /generate``'s answer time) and its end-to-end time. Then the flood starts, and once
the flood holds its share (or every queue is full), the polite client's ``--jobs`` jobs: the
wait from its first POST to the job's end, and the time its job queued before it started,
each as a ratio of one job's run time plus routing (medians and max). The whole run is done
twice: with the fair share (``--max-jobs``) and without it (max_jobs 100000). Nothing is
asserted: it prints numbers.

    python bench/fairness_bench.py [--workers 2] [--step-time 0.05] [--steps 20] [--max-jobs 8]
                                   [--ahead 2] [--flood 16] [--jobs 8] [--give-up 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"flood": "flood-key-3b9c0d4e5f6a7b8c", "polite": "polite-key-1d2e3f4a5b6c7d8e"}
NO_CAP = 100_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the servers (child process) ----------------------------------------------------------

async def serve(directory: Path, workers: int, step_time: float, max_jobs: int, ahead: int) -> None:
    """ComfyUI doubles, workers and a scheduler in this process until stdin closes."""
    logging.basicConfig(level=logging.ERROR)  # thousands of 429s and 503s are the point, not news
    sys.path.insert(0, str(ROOT))
    from t2i.comfy_sim import ComfySim
    from t2i.config import load_scheduler_config, load_worker_config
    from t2i.scheduler.app import Scheduler
    from t2i.worker.app import Worker

    sims, started, entries = [], [], []
    for i in range(workers):
        sim = ComfySim(step_time=step_time)
        await sim.start(port=0, address="127.0.0.1")
        sims.append(sim)
        port = free_port()
        folder = directory / f"w{i}"
        folder.mkdir()
        (folder / "worker.yaml").write_text(yaml.safe_dump({
            "name": f"gpu-{i}", "listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}",
            "comfyui": {"url": sim.url, "ahead": ahead}, "images": {"dir": str(folder / "images")},
            "state_dir": str(folder / "state")}))
        worker = Worker(load_worker_config(folder / "worker.yaml"))
        await worker.start()
        started.append(worker)
        entries.append({"name": f"gpu-{i}", "url": worker.url, "max_queue": 8})
    (directory / "workers.yaml").write_text(yaml.safe_dump({"workers": entries}))
    port = free_port()
    (directory / "scheduler.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "workers_file": "workers.yaml",
        "clients": {"keys": KEYS, "allow_anonymous": False, "max_jobs": max_jobs}}))
    scheduler = Scheduler(load_scheduler_config(directory / "scheduler.yaml"))
    await scheduler.start()
    print(scheduler.url, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes it
    await scheduler.stop()
    for thing in [*started, *sims]:
        await thing.stop()


# --- the clients (this process) -----------------------------------------------------------

class Client:
    def __init__(self, http: AsyncHTTPClient, base: str, name: str):
        self.http = http
        self.base = base
        self.headers = {"Authorization": f"Bearer {KEYS[name]}", "Content-Type": "application/json"}
        self.answers: Counter = Counter()

    async def post(self, path: str, body: dict | None = None):
        return await self.http.fetch(HTTPRequest(self.base + path, method="POST", headers=self.headers,
                                                 body=json.dumps(body or {}), request_timeout=30), raise_error=False)

    async def status(self, prompt_id: str, since: int) -> dict:
        response = await self.http.fetch(f"{self.base}/status/{prompt_id}?wait=20&since={since}",
                                         request_timeout=30, raise_error=False)
        return json.loads(response.body) if response.code == 200 else {"status": "?", "version": since}


async def flood(client: Client, body: dict, stop: asyncio.Event) -> None:
    """Submit, and on 503/429 retry every 0.1 s; once accepted, submit the next at once."""
    while not stop.is_set():
        response = await client.post("/generate", body)
        client.answers[response.code] += 1
        if response.code != 200:
            await asyncio.sleep(0.1)


async def one_job(client: Client, body: dict, give_up: float) -> dict:
    """Submit (honouring Retry-After), follow the job to its end; its times."""
    started = time.monotonic()
    refused = 0
    while True:
        sent = time.monotonic()
        response = await client.post("/generate", body)
        routing = time.monotonic() - sent
        client.answers[response.code] += 1
        if response.code == 200:
            break
        refused += 1
        if time.monotonic() - started > give_up:
            return {"gave_up": True, "wait": time.monotonic() - started, "refused": refused}
        await asyncio.sleep(float(response.headers.get("Retry-After", 1)))
    prompt_id = json.loads(response.body)["prompt_id"]
    state, version = {}, 0
    while state.get("status") not in ("completed", "failed", "cancelled"):
        state = await client.status(prompt_id, version)
        version = state.get("version", version)
    ended = time.monotonic()
    return {"gave_up": False, "status": state["status"], "wait": ended - started, "routing": routing,
            "refused": refused, "run": (state.get("completed_at") or 0) - (state.get("started_at") or 0),
            "queued": (state.get("started_at") or 0) - (state.get("created_at") or 0)}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def phase(args, max_jobs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="t2i-fairness-") as tmp:
        child = subprocess.Popen([sys.executable, __file__, "--serve", tmp, "--workers", str(args.workers),
                                  "--step-time", str(args.step_time), "--max-jobs", str(max_jobs),
                                  "--ahead", str(args.ahead)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            base = child.stdout.readline().strip()
            await run_phase(args, base, max_jobs)
        finally:
            child.stdin.close()
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()


async def run_phase(args, base: str, max_jobs: int) -> None:
    http = AsyncHTTPClient(force_instance=True, max_clients=args.flood + 10)
    body = {"prompt": "a red fox in snow", "steps": args.steps, "width": 64, "height": 64}
    polite, flooder = Client(http, base, "polite"), Client(http, base, "flood")
    while (await http.fetch(base + "/health", raise_error=False)).code != 200:
        await asyncio.sleep(0.1)
    solo = [await one_job(polite, body, args.give_up) for _ in range(3)]
    run = median([j["run"] for j in solo])
    routing = median([j["routing"] for j in solo])
    unit = run + routing
    label = f"fair share on (max_jobs {max_jobs})" if max_jobs < NO_CAP else "fair share off"
    print(f"\n== {label}: {args.workers} workers (comfyui.ahead {args.ahead}), {args.steps} steps of "
          f"{args.step_time} s, flood of {args.flood} submitters")
    print(f"one job alone: run {run:.2f} s, routing {routing * 1000:.0f} ms, end to end "
          f"{median([j['wait'] for j in solo]):.2f} s (medians of 3)")
    stop = asyncio.Event()
    flooding = [asyncio.ensure_future(flood(flooder, body, stop)) for _ in range(args.flood)]
    # The flood holds its share (or every queue is full) before the polite client starts.
    while flooder.answers[200] < min(max_jobs, 8 * args.workers):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    polite.answers.clear()
    flood_before = flooder.answers[200]
    started = time.monotonic()
    results = [await one_job(polite, body, args.give_up) for _ in range(args.jobs)]
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.gather(*flooding)
    cancelled = json.loads((await flooder.post("/cancel")).body)
    done = [r for r in results if not r["gave_up"]]
    waits = [r["wait"] for r in done]
    queued = [r["queued"] for r in done]
    print(f"while flooding ({elapsed:.0f} s): flood accepted {flooder.answers[200] - flood_before} jobs "
          f"({flooder.answers[429]} x 429, {flooder.answers[503]} x 503 in all); "
          f"polite: {len(done)} of {len(results)} jobs done, {len(results) - len(done)} given up after "
          f"{args.give_up:g} s, answers {dict(sorted(polite.answers.items()))}")
    if done:
        print(f"polite's wait (first POST -> end):  median {median(waits):.2f} s = {median(waits) / unit:.1f}x "
              f"one job's run + routing, max {max(waits):.2f} s = {max(waits) / unit:.1f}x")
        print(f"polite's queue wait (accepted -> started): median {median(queued):.2f} s = "
              f"{median(queued) / run:.1f}x one job's run, max {max(queued):.2f} s = {max(queued) / run:.1f}x")
        print(f"polite's own run during the flood: median {median([r['run'] for r in done]):.2f} s; "
              f"refusals before acceptance: {sum(r['refused'] for r in results)}")
    print(f"cancelled the flood's {cancelled['cancelled']} unfinished jobs")
    http.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-time", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-jobs", type=int, default=8)
    parser.add_argument("--ahead", type=int, default=2, help="the workers' comfyui.ahead")
    parser.add_argument("--flood", type=int, default=16, help="the flooding client's submissions at once")
    parser.add_argument("--jobs", type=int, default=8, help="the polite client's jobs, one at a time")
    parser.add_argument("--give-up", type=float, default=60.0, help="the polite client gives a job up after this")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(Path(args.serve), args.workers, args.step_time, args.max_jobs, args.ahead))
        return

    async def both() -> None:
        await phase(args, args.max_jobs)
        await phase(args, NO_CAP)

    asyncio.run(both())


if __name__ == "__main__":
    main()
