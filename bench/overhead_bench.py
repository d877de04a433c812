"""Client-seen overhead: submit -> image bytes held, minus ComfyUI's own execution time.

    python bench/overhead_bench.py [--jobs 40] [--runs 3] [--step-time 0.02] [--warmup 3] [--gap 0.05]
    T2I_COMFYUI_URL=http://127.0.0.1:8188 python bench/overhead_bench.py     # against a real ComfyUI

Four clients, one job at a time each, their jobs interleaved (a, b, c, d, then b, c, d, a ...) on one
ComfyUI, side by side in one run:

  a. floor:     a bare ComfyUI protocol client (PROTOCOL.md sections 3, 5, 7): one websocket with its
                clientId, POST /prompt (its own prompt_id), execution_success (or executing null) on
                the websocket, GET /history/{id}, GET /view of the output file;
  b. worker:    two requests after the submit: POST /generate to the t2i worker, GET /result/{id}?wait=30
                (held until the job ends), GET image_url;
  c. worker 1:  one request after the submit: POST /generate, GET /result/{id}?wait=30 with
                ``Accept: image/*`` (answered with the image's bytes);
  d. scheduler: as b through the t2i scheduler (image_url still served by the worker);
  e. scheduler 1: POST /generate to the scheduler, then c at the worker its answer names (``worker_url``:
                GET /result/{id}?wait=30 with ``Accept: image/*``), as an API client that wants the
                picture and no status loop does;
  f. scheduler 1 via 307: POST /generate to the scheduler, GET /result/{id}?wait=30 with ``Accept: image/*``
                there too: its 307 sends the request on to the job's worker, which answers with the image
                (a client that knows only the scheduler's address).

Each job: 1 sampler step, 64x64, a new seed, the same prompt text (so ComfyUI's cache treats every
path alike). Overhead = wall time from just before the submit to the last image byte, minus ComfyUI's
own execution time: execution_success.timestamp - execution_start.timestamp of the job's history entry
(status.messages; whole milliseconds, as the real server records them). The double (``python -m
t2i.comfy_sim``), the worker and the scheduler run as processes of this run; with ``T2I_COMFYUI_URL`` the
double is not started and the worker drives that ComfyUI (it needs the template's checkpoint).
The worker also has the scheduler following its /jobs feed during b (as deployed).

Prints p50/p90 overhead per run and path, each path's p50 over the floor's, p90 minus the floor's p90,
and medians [ranges] over the runs. Targets (issue 15): scheduler + worker p50 <= 1.8x the floor,
worker alone <= 1.5x, p90 within 15 ms of the floor's. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (ROOT, Http, Process, code_version, comfy_process, free_port, healthy,  # noqa: E402
                     machine_line, med_range, percentile, run_in_temp_dir, scheduler_process, scheduler_sees,
                     stop_all, wait_until, worker_process)

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
TEMPLATE = json.loads((ROOT / "t2i" / "workflows" / "txt2img.json").read_text())
PATHS = ("floor", "worker", "worker 1", "scheduler", "scheduler 1", "scheduler 307")
LABELS = {"floor": "a. floor (bare ComfyUI client)", "worker": "b. worker, 2 requests",
          "worker 1": "c. worker, 1 request", "scheduler": "d. scheduler + worker, 2 requests",
          "scheduler 1": "e. scheduler submit, worker 1 req", "scheduler 307": "f. scheduler 1 req, 307 to worker"}


class ExecutionFailed(Exception):
    pass


def execution_ms(entry: dict[str, Any]) -> float:
    """ComfyUI's own execution time of a history entry: execution_start -> execution_success (ms)."""
    stamps = {event: data.get("timestamp") for event, data in entry["status"]["messages"]}
    if "execution_success" not in stamps:
        raise ExecutionFailed(f"the job did not succeed in ComfyUI: {entry['status']}")
    return float(stamps["execution_success"] - stamps["execution_start"])


class Floor:
    """The bare protocol client: one websocket (clientId), POST /prompt, wait, /history, /view."""

    def __init__(self, http: Http, comfy_url: str):
        self.http = http
        self.comfy_url = comfy_url
        self.client_id = uuid.uuid4().hex
        self.ws = None
        self.waiting: dict[str, asyncio.Future] = {}
        self.done: dict[str, asyncio.Future] = {}
        self.history_retries = 0

    async def connect(self) -> None:
        from tornado.websocket import websocket_connect

        ws_url = self.comfy_url.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}"
        self.ws = await websocket_connect(ws_url, max_message_size=64 * 1024 * 1024)
        asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.ws.read_message()
            if message is None:
                return
            if isinstance(message, bytes):
                continue
            msg = json.loads(message)
            kind, data = msg.get("type"), msg.get("data") or {}
            prompt_id = data.get("prompt_id")
            if kind in ("execution_success", "execution_error", "execution_interrupted"):
                future = self.waiting.get(prompt_id)
                if future is not None and not future.done():
                    future.set_result(kind)
            elif kind == "executing" and data.get("node") is None and prompt_id:
                for table in (self.waiting, self.done):
                    future = table.get(prompt_id)
                    if future is not None and not future.done():
                        future.set_result("executing null")

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()

    def workflow(self, prompt_id: str) -> dict[str, Any]:
        workflow = json.loads(json.dumps(TEMPLATE))
        workflow["6"]["inputs"]["text"] = PROMPT
        workflow["7"]["inputs"]["text"] = ""
        workflow["3"]["inputs"].update(seed=random.randrange(2 ** 48), steps=1)
        workflow["5"]["inputs"].update(width=64, height=64)
        workflow["9"]["inputs"]["filename_prefix"] = f"t2i_{prompt_id}"
        return workflow

    async def job(self) -> tuple[float, float]:
        prompt_id = str(uuid.uuid4())
        loop = asyncio.get_running_loop()
        self.waiting[prompt_id] = loop.create_future()
        self.done[prompt_id] = loop.create_future()
        body = {"prompt": self.workflow(prompt_id), "client_id": self.client_id, "prompt_id": prompt_id}
        started = time.perf_counter()
        try:
            reply = await self.http.request("POST", self.comfy_url + "/prompt", body)
            if reply.status != 200:
                raise ExecutionFailed(f"POST /prompt: {reply.status} {reply.body[:300]!r}")
            outcome = await asyncio.wait_for(self.waiting[prompt_id], 60)
            if outcome not in ("execution_success", "executing null"):
                raise ExecutionFailed(f"ComfyUI: {outcome}")
            history = (await self.http.request("GET", f"{self.comfy_url}/history/{prompt_id}")).json()
            if prompt_id not in history:  # written just after execution_success (PROTOCOL 5)
                self.history_retries += 1
                await asyncio.wait_for(self.done[prompt_id], 60)
                history = (await self.http.request("GET", f"{self.comfy_url}/history/{prompt_id}")).json()
            entry = history[prompt_id]
            image = next(image for output in entry["outputs"].values() for image in output.get("images", []))
            query = urlencode({"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]})
            view = await self.http.request("GET", f"{self.comfy_url}/view?{query}")
            if view.status != 200 or not view.body:
                raise ExecutionFailed(f"GET /view: {view.status}")
            elapsed = (time.perf_counter() - started) * 1000
        finally:
            self.waiting.pop(prompt_id, None)
            self.done.pop(prompt_id, None)
        return elapsed, execution_ms(entry)


async def t2i_job(http: Http, base: str, comfy_url: str, one_request: bool = False,
                  at_worker: bool = False) -> tuple[float, float]:
    """POST /generate, GET /result?wait=30, GET image_url (``one_request``: GET /result?wait=30 with
    ``Accept: image/*``, which is the image; ``at_worker``: that result asked of the worker the submit's
    answer names); then (untimed) ComfyUI's history entry."""
    body = {"prompt": PROMPT, "steps": 1, "width": 64, "height": 64, "seed": random.randrange(2 ** 48)}
    headers = {"Accept": "image/*"} if one_request else None
    started = time.perf_counter()
    reply = await http.request("POST", base + "/generate", body)
    if reply.status != 200:
        raise ExecutionFailed(f"POST {base}/generate: {reply.status} {reply.body[:300]!r}")
    prompt_id = reply.json()["prompt_id"]
    if at_worker:
        base = reply.json()["worker_url"]
    url = f"{base}/result/{prompt_id}?wait=30"
    while True:
        result = await http.request("GET", url, headers=headers)
        if result.status == 307:  # the scheduler sends an image request on to the job's worker
            url = result.headers["location"]
            continue
        if result.status != 202:
            break
    if one_request:
        if result.status != 200 or not result.headers.get("content-type", "").startswith("image/"):
            raise ExecutionFailed(f"GET {base}/result (Accept: image/*): {result.status} {result.body[:300]!r}")
    else:
        state = result.json()
        if result.status != 200 or state.get("status") != "completed":
            raise ExecutionFailed(f"GET {base}/result: {result.status} {result.body[:300]!r}")
        image = await http.request("GET", state["image_url"])
        if image.status != 200 or not image.body:
            raise ExecutionFailed(f"GET image_url: {image.status}")
    elapsed = (time.perf_counter() - started) * 1000
    history = (await http.request("GET", f"{comfy_url}/history/{prompt_id}")).json()
    return elapsed, execution_ms(history[prompt_id])


async def run(args: argparse.Namespace, directory: Path) -> int:
    external = os.environ.get("T2I_COMFYUI_URL", "").rstrip("/")
    comfy_url = external or f"http://127.0.0.1:{free_port()}"
    worker_port, scheduler_port = free_port(), free_port()
    worker_url, scheduler_url = f"http://127.0.0.1:{worker_port}", f"http://127.0.0.1:{scheduler_port}"
    processes: list[Process] = []
    if not external:
        processes.append(comfy_process(directory, "comfy", int(comfy_url.rsplit(":", 1)[1]), args.step_time))
    processes.append(worker_process(directory, "gpu-a", worker_port, comfy_url, log_level=args.log_level))
    processes.append(scheduler_process(directory, "scheduler", scheduler_port,
                                       [{"name": "gpu-a", "url": worker_url}], log_level=args.log_level))
    print(f"overhead bench: {args.runs} run(s) x {args.jobs} jobs per path, 1 step, 64x64, "
          f"{'ComfyUI at ' + external if external else f'the ComfyUI test double (step time {args.step_time}s)'}")
    print(f"  code {code_version()}; {machine_line()}; processes and logs in {directory}", flush=True)
    http = Http()
    floor = Floor(http, comfy_url)
    for process in processes:
        process.start()
    try:
        await wait_until(lambda: healthy(http, worker_url), what="the worker", processes=processes)
        await wait_until(lambda: scheduler_sees(http, scheduler_url, 1), what="the scheduler", processes=processes)
        await floor.connect()
        jobs = {"floor": floor.job,
                "worker": lambda: t2i_job(http, worker_url, comfy_url),
                "worker 1": lambda: t2i_job(http, worker_url, comfy_url, one_request=True),
                "scheduler": lambda: t2i_job(http, scheduler_url, comfy_url),
                "scheduler 1": lambda: t2i_job(http, scheduler_url, comfy_url, one_request=True, at_worker=True),
                "scheduler 307": lambda: t2i_job(http, scheduler_url, comfy_url, one_request=True)}
        for _ in range(args.warmup):
            for name in PATHS:
                await jobs[name]()
        per_run: list[dict[str, dict[str, float]]] = []
        for run_no in range(args.runs):
            samples: dict[str, list[float]] = {name: [] for name in PATHS}
            executions: dict[str, list[float]] = {name: [] for name in PATHS}
            for i in range(args.jobs):
                order = PATHS[i % len(PATHS):] + PATHS[:i % len(PATHS)]
                for name in order:
                    elapsed, execution = await jobs[name]()
                    samples[name].append(elapsed - execution)
                    executions[name].append(execution)
                    await asyncio.sleep(args.gap)
            stats = {name: {"p50": percentile(samples[name], 50), "p90": percentile(samples[name], 90),
                            "max": max(samples[name]), "exec": statistics.median(executions[name])}
                     for name in PATHS}
            per_run.append(stats)
            floor_stats = stats["floor"]
            print(f"\nrun {run_no + 1}: overhead ms (p50 / p90 / max; ComfyUI's execution p50)")
            for name in PATHS:
                s = stats[name]
                ratio = "" if name == "floor" else (f"   {s['p50'] / floor_stats['p50']:.2f}x floor p50, "
                                                    f"p90 {s['p90'] - floor_stats['p90']:+.1f} ms")
                print(f"  {LABELS[name]:34s} {s['p50']:7.1f} / {s['p90']:7.1f} / {s['max']:7.1f}   "
                      f"exec {s['exec']:6.1f}{ratio}", flush=True)
    finally:
        floor.close()
        http.close()
        stop_all(reversed(processes))

    print(f"\nclient-seen overhead (submit -> image bytes held, minus ComfyUI's execution), {args.jobs} jobs per "
          f"path per run, median [range] of {args.runs} run(s):")
    for name in PATHS:
        print(f"  {LABELS[name]:34s} p50 {med_range([r[name]['p50'] for r in per_run])} ms   "
              f"p90 {med_range([r[name]['p90'] for r in per_run])} ms")
    targets = {"worker": 1.5, "worker 1": 1.5, "scheduler": 1.8, "scheduler 1": 1.8, "scheduler 307": 1.8}
    for name, target in targets.items():
        ratios = [r[name]["p50"] / r["floor"]["p50"] for r in per_run]
        print(f"  {LABELS[name]:34s} / floor p50 {med_range(ratios, '{:.2f}')}x   (target <= {target}x)")
    for name in targets:
        gaps = [r[name]["p90"] - r["floor"]["p90"] for r in per_run]
        print(f"  {LABELS[name]:34s} p90 - floor p90 {med_range(gaps)} ms   (target <= 15 ms)")
    if floor.history_retries:
        print(f"  (floor: /history was still empty after execution_success {floor.history_retries} time(s))")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=40, help="jobs per path per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured jobs per path first")
    parser.add_argument("--step-time", type=float, default=0.02, help="the double's seconds per sampler step")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between two jobs (lets each settle)")
    parser.add_argument("--log-level", default="info", help="the worker's and scheduler's (default: info)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with configs and logs")
    args = parser.parse_args()
    run_in_temp_dir(run, args, "t2i-overhead-")


if __name__ == "__main__":
    main()
