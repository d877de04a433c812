"""The scheduler's job mirror: bytes per mirrored job, and 1,000 jobs ending at once reaching their waiters.

    python bench/mirror_bench.py [--runs 3] [--jobs 20000] [--waiters 1000]

Fake workers (one child process, one port each) speak what the scheduler asks of a worker: ``/health``,
``/workflows`` and the paged ``/jobs`` feed (long-polled), with status objects shaped like a real
worker's (uuid ids, every field of ``GET /status``). Per run, on fresh schedulers (``python -m
t2i.scheduler``, each its own process, default config):

* memory: one scheduler follows a fake worker holding ``--jobs`` finished jobs, another (the
  same-run baseline) one holding none; bytes per mirrored job = the difference of their RSS once the
  listing is mirrored, divided by ``--jobs``;
* fan-out: a scheduler follows a fake worker holding ``--waiters`` pending jobs; one long-poll per job
  is parked on the scheduler (``/status/{id}?wait=30&since=<version>``), then the fake worker completes
  them all in one feed change: time from that change to the first, median and last waiter answered.

Prints each run, then medians [ranges]. Targets (issue 15): a mirrored job <= 1 KB; 1,000 jobs ending
at once reach all their waiters within 1 s. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (Http, Process, code_version, fake_feed_page, free_port, machine_line, med_range,  # noqa: E402
                     percentile, scheduler_process, wait_until)

CATALOGUE = {"default_workflow": "txt2img", "allow_raw_workflows": False, "checked_at": 0,
             "workflows": {"txt2img": {"params": {
                 "prompt": {"type": "string", "required": True, "max_length": 2000},
                 "steps": {"type": "integer", "default": 20, "min": 1, "max": 150}},
                 "ready": True, "reason": None}}}


# --- fake workers (child process) ----------------------------------------------------------------

def status_object(prompt_id: str, version: int, status: str, url: str, now: float) -> dict[str, Any]:
    """A job as a real worker's ``GET /status`` shows it (t2i.worker.jobs.Job.to_json)."""
    done = status == "completed"
    image = f"{url}/images/t2i_{prompt_id}_00001_.png"
    return {"prompt_id": prompt_id, "status": status, "version": version,
            "progress": {"value": 20, "max": 20} if done else None, "queue_position": None if done else 0,
            "image_url": image if done else None, "image_urls": [image] if done else [], "preview_url": None,
            "error": None, "attempt": 1, "workflow": "txt2img", "seed": 1234567890123, "created_at": now,
            "started_at": now if done else None, "completed_at": now if done else None, "client": "anon:127.0.0.1"}


class FakeWorker:
    def __init__(self, name: str, url: str, jobs: int, status: str):
        self.name, self.url = name, url
        self.epoch = f"{name}-{os.getpid()}"
        self.seq = int(time.time() * 1000)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.changed = asyncio.Event()
        now = time.time()
        for _ in range(jobs):
            self.seq += 1
            prompt_id = str(uuid.uuid4())
            self.jobs[prompt_id] = status_object(prompt_id, self.seq, status, url, now)

    def set_all(self, status: str) -> None:
        now = time.time()
        for prompt_id in self.jobs:
            self.seq += 1
            self.jobs[prompt_id] = status_object(prompt_id, self.seq, status, self.url, now)
        self.changed.set()
        self.changed = asyncio.Event()

    def counts(self) -> dict[str, int]:
        pending = sum(1 for job in self.jobs.values() if job["status"] == "pending")
        return {"held": len(self.jobs), "pending": pending, "running": 0}


def serve_fakes(spec: list[dict[str, Any]]) -> None:
    import logging

    from tornado import web

    logging.basicConfig(level=logging.WARNING)
    # Feed long-polls still held when this process stops answer 500 (cancelled): not worth a line.
    logging.getLogger("tornado.access").setLevel(logging.CRITICAL)
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    async def main() -> None:
        by_port: dict[int, FakeWorker] = {}

        class Base(web.RequestHandler):
            def prepare(self) -> None:
                self.worker = by_port[int(self.request.host.rsplit(":", 1)[1])]

            def reply(self, body: Any, status: int = 200) -> None:
                self.set_status(status)
                self.set_header("Content-Type", "application/json")
                self.finish(json.dumps(body, separators=(",", ":")))

        class Health(Base):
            def get(self) -> None:
                self.reply({"ok": True, "name": self.worker.name, "comfyui": {"reachable": True, "ok": True},
                            "jobs": self.worker.counts(), "load": {"steps": 0, "seconds_per_step": None}})

        class Workflows(Base):
            def get(self) -> None:
                self.reply(CATALOGUE)

        class Jobs(Base):
            async def get(self) -> None:
                self.reply(await fake_feed_page(self.worker, self))

        class Control(Base):
            def post(self, status: str) -> None:
                self.worker.set_all(status)
                self.reply({"seq": self.worker.seq})

        class Status(Base):
            def get(self, prompt_id: str) -> None:
                job = self.worker.jobs.get(prompt_id)
                self.reply(job if job else {"error": "no such job"}, 200 if job else 404)

        server = HTTPServer(web.Application([
            (r"/health", Health), (r"/workflows", Workflows), (r"/jobs", Jobs), (r"/status/([^/]+)", Status),
            (r"/bench/set/(\w+)", Control)]))
        for entry in spec:
            sockets = bind_sockets(entry["port"], "127.0.0.1")
            by_port[entry["port"]] = FakeWorker(entry["name"], f"http://127.0.0.1:{entry['port']}", entry["jobs"],
                                                entry["status"])
            server.add_sockets(sockets)
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    asyncio.run(main())


# --- measuring -------------------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def mirrored(http: Http, url: str, name: str, jobs: int) -> bool:
    reply = await http.request("GET", url + "/workers", timeout=10)
    if reply.status != 200:
        return False
    for worker in reply.json().get("workers", []):
        if worker["name"] == name:
            return worker.get("jobs") == jobs and (worker.get("feed") or {}).get("state") == "up"
    return False


async def fan_out(http: Http, scheduler_url: str, fake_url: str, ids: list[str]) -> tuple[float, float, float, int]:
    """Park one long-poll per job on the scheduler, complete them all at once on the fake worker:
    (first, median, last) seconds from the change to a waiter's answer, and waiters answered completed."""
    versions = {}
    for prompt_id in ids:
        state = (await http.request("GET", f"{scheduler_url}/status/{prompt_id}")).json()
        if state["status"] != "pending":
            raise SystemExit(f"fan-out: job {prompt_id} is {state['status']} on the scheduler, not pending")
        versions[prompt_id] = state["version"]
    port = int(scheduler_url.rsplit(":", 1)[1])
    done: list[float] = []
    completed = 0

    async def waiter(prompt_id: str, reader: asyncio.StreamReader) -> None:
        nonlocal completed
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line[15:]) for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:")
        body = await reader.readexactly(length)
        done.append(time.perf_counter())
        if json.loads(body).get("status") == "completed":
            completed += 1

    streams, tasks = [], []
    try:
        for i, prompt_id in enumerate(ids):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /status/{prompt_id}?wait=30&since={versions[prompt_id]} HTTP/1.1\r\n"
                         f"Host: 127.0.0.1:{port}\r\n\r\n".encode())
            streams.append(writer)
            tasks.append(asyncio.ensure_future(waiter(prompt_id, reader)))
            if i % 100 == 99:
                await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # all parked
        early = len(done)
        changed = time.perf_counter()
        await http.request("POST", f"{fake_url}/bench/set/completed", {})
        await asyncio.wait_for(asyncio.gather(*tasks), 40)
    finally:
        for writer in streams:
            writer.close()
    if early:
        print(f"  ({early} waiters were answered before the change)")
    after = sorted(t - changed for t in done[early:])
    return after[0], percentile(after, 50), after[-1], completed


async def one_run(args: argparse.Namespace, run_no: int, directory: Path) -> dict[str, float]:
    home = directory / f"run-{run_no}"
    home.mkdir()
    fakes = [{"name": "big", "port": free_port(), "jobs": args.jobs, "status": "completed"},
             {"name": "empty", "port": free_port(), "jobs": 0, "status": "completed"},
             {"name": "fan", "port": free_port(), "jobs": args.waiters, "status": "pending"}]
    fake = subprocess.Popen([sys.executable, __file__, "--serve-fakes", json.dumps(fakes)], stdout=subprocess.PIPE,
                            text=True)
    schedulers = {entry["name"]: scheduler_process(home, f"scheduler-{entry['name']}", free_port(),
                                                   [{"name": entry["name"], "url": f"http://127.0.0.1:{entry['port']}",
                                                     "max_queue": 100000}], log_level="warning")
                  for entry in fakes}
    http = Http()
    processes: list[Process] = list(schedulers.values())
    try:
        if fake.stdout.readline().strip() != "ready":
            raise SystemExit("the fake workers did not start")
        for process in processes:
            process.start()
        urls = {name: scheduler_url(process) for name, process in schedulers.items()}
        for entry in fakes:
            await wait_until(lambda entry=entry: mirrored(http, urls[entry["name"]], entry["name"], entry["jobs"]),
                             timeout=120, what=f"the scheduler over {entry['name']}", processes=processes)
        await asyncio.sleep(2.0)  # settled: the listing's garbage collected, health checked
        big, empty = rss_bytes(schedulers["big"].pid), rss_bytes(schedulers["empty"].pid)
        per_job = (big - empty) / args.jobs
        reply = await http.request("GET", f"http://127.0.0.1:{fakes[2]['port']}/jobs?since=0")
        fan_ids = [job["prompt_id"] for job in reply.json()["jobs"]]
        first, median, last, completed = await fan_out(http, urls["fan"], f"http://127.0.0.1:{fakes[2]['port']}",
                                                       fan_ids)
    finally:
        http.close()
        for process in processes:
            process.stop()
        fake.send_signal(signal.SIGTERM)
        fake.wait(10)
    print(f"run {run_no + 1}: scheduler RSS {big / 1e6:.1f} MB with {args.jobs} mirrored jobs vs {empty / 1e6:.1f} MB "
          f"with none: {per_job:.0f} B per mirrored job; fan-out of {len(fan_ids)} completions: first "
          f"{first * 1000:.0f} ms, median {median * 1000:.0f} ms, last {last * 1000:.0f} ms "
          f"({completed} answered completed)", flush=True)
    return {"per_job": per_job, "first": first, "median": median, "last": last}


def scheduler_url(process: Process) -> str:
    import yaml

    config = yaml.safe_load(Path(process.args[process.args.index("--config") + 1]).read_text())
    return "http://" + config["listen"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20000, help="finished jobs held by the big fake worker")
    parser.add_argument("--waiters", type=int, default=1000, help="jobs (and long-polls) of the fan-out")
    parser.add_argument("--serve-fakes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fakes:
        serve_fakes(json.loads(args.serve_fakes))
        return
    print(f"mirror bench: {args.runs} run(s); {args.jobs} mirrored jobs vs none; fan-out of {args.waiters} completions")
    print(f"  code {code_version()}; {machine_line()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="t2i-mirror-") as tmp:
        for run_no in range(args.runs):
            results.append(asyncio.run(one_run(args, run_no, Path(tmp))))
    print(f"\nmedian [range] of {args.runs} run(s):")
    print(f"  bytes per mirrored job   {med_range([r['per_job'] for r in results], '{:.0f}')}  (target <= 1024)")
    print(f"  fan-out, last waiter     {med_range([r['last'] * 1000 for r in results], '{:.0f}')} ms  (target <= 1000 ms)")
    print(f"  fan-out, median waiter   {med_range([r['median'] * 1000 for r in results], '{:.0f}')} ms")
    print(f"  fan-out, first waiter    {med_range([r['first'] * 1000 for r in results], '{:.0f}')} ms")


if __name__ == "__main__":
    main()
