"""A load run through the whole system: N browsers' worth of jobs against the demo.

Starts ``python -m t2i.demo`` (scheduler, workers, simulated ComfyUIs) on
127.0.0.1 in a subprocess, submits N jobs at once the way the page does
(retrying 503 and 429 after Retry-After, long-polling /status, fetching the image),
and prints outcomes, wall time, jobs/s, and how the scheduler answered.
Nothing is asserted: it prints numbers.

    python bench/load_run.py [--jobs 400] [--workers 2] [--step-time 0.002]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from collections import Counter

from tornado.httpclient import AsyncHTTPClient, HTTPRequest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def one_job(client: AsyncHTTPClient, base: str, number: int, seen: Counter) -> tuple[str, float]:
    started = time.monotonic()
    body = json.dumps({"prompt": f"load run {number}", "steps": 5, "width": 64, "height": 64})
    while True:
        response = await client.fetch(HTTPRequest(base + "/generate", method="POST", body=body,
                                                       headers={"Content-Type": "application/json"}), raise_error=False)
        seen[f"POST /generate {response.code}"] += 1
        if response.code == 200:
            break
        if response.code not in (429, 503):  # 429: this one client holds clients.max_jobs; the page waits too
            return f"refused {response.code}", time.monotonic() - started
        await asyncio.sleep(float(response.headers.get("Retry-After", 1)) * 0.2)
    prompt_id = json.loads(response.body)["prompt_id"]
    since = 0
    while True:
        response = await client.fetch(f"{base}/status/{prompt_id}?wait=10&since={since}", raise_error=False,
                                      request_timeout=20)
        seen[f"GET /status {response.code}"] += 1
        if response.code != 200:
            await asyncio.sleep(0.2)
            continue
        state = json.loads(response.body)
        since = state["version"]
        if state["status"] == "completed":
            image = await client.fetch(state["image_url"], raise_error=False)
            return ("completed" if image.code == 200 else f"image {image.code}"), time.monotonic() - started
        if state["status"] in ("failed", "cancelled"):
            return state["status"], time.monotonic() - started


async def run(args) -> None:
    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "t2i.demo", "--port", str(port), "--workers", str(args.workers),
                             "--step-time", str(args.step_time), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        demo.stdout.readline()  # the "running at" line
        base = f"http://127.0.0.1:{port}"
        AsyncHTTPClient.configure(None, max_clients=args.jobs + 10)
        client = AsyncHTTPClient()
        while (await client.fetch(base + "/health", raise_error=False)).code != 200:
            await asyncio.sleep(0.1)
        seen: Counter = Counter()
        started = time.monotonic()
        results = await asyncio.gather(*(one_job(client, base, n, seen) for n in range(args.jobs)))
        elapsed = time.monotonic() - started
        outcomes = Counter(outcome for outcome, _ in results)
        latencies = sorted(latency for _, latency in results)
        print(f"{args.jobs} jobs on {args.workers} workers (step time {args.step_time}s, 5 steps, 64x64)")
        print(f"  outcomes: {dict(outcomes)}")
        print(f"  wall time {elapsed:.1f}s, {args.jobs / elapsed:.1f} jobs/s, "
              f"job latency median {latencies[len(latencies) // 2]:.2f}s, max {latencies[-1]:.2f}s")
        print(f"  answers: {dict(sorted(seen.items()))}")
    finally:
        demo.terminate()
        demo.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-time", type=float, default=0.002)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
