"""Chaos soak: jobs through the whole system while things break, each job tracked to its end.

Starts, as processes on 127.0.0.1 in a temp dir: one ComfyUI test double per worker
(``python -m t2i.comfy_sim --control-port ...``), the workers (``python -m t2i.worker``,
each with its own journal) and one scheduler (``python -m t2i.scheduler``). Submits N
jobs through the scheduler the way the page does (429 and 503 retried after Retry-After,
/status long-polled, the image fetched from the worker), at most ``--concurrency`` at a
time, spread over ``--clients`` API keys (scheduler.yaml ``clients``),
while faults are injected as the run progresses (each when that share of the jobs has
ended):

    10%  every ComfyUI drops its websockets
    20%  ComfyUI 1 restarts (its queue is lost: the worker resubmits, attempt 2)
    30%  ComfyUI 0 fails its next KSampler ("CUDA out of memory")
    40%  ComfyUI 2 stalls for stall_timeout + 2 s (the worker gives up on the job, then recovers)
    50%  worker 0 is SIGKILLed, and started again 3 s later (its journal keeps its jobs)
    65%  workers.yaml: gpu-2 disabled; then a broken file (the last good list stays); then restored
    80%  every ComfyUI drops its websockets again

Then it prints: completed, failed (by reason), cancelled, never accepted, stuck
(unfinished at the end), lost (404 after acceptance), completed-without-image (image
URL not 200 with a PNG), failures-without-reason, and every 5xx the client saw, by
route ("retry" when it came with Retry-After, as the API promises for a busy pool or an
unreachable owner; "error" otherwise). Exit status 1 when any of stuck, lost,
completed-without-image, failures-without-reason or 5xx errors is not 0.

    python bench/chaos_soak.py [--jobs 200] [--workers 3] [--concurrency 16] [--clients 4] [--step-time 0.05]
                               [--timeout 150] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "t2i" / "workflows" / "txt2img.json"
STALL_TIMEOUT = 3.0
FINAL = ("completed", "failed", "cancelled")
CLIENT_ROUTES = ("POST /generate", "GET /status/{id}", "GET /images/{file}")  # what a browser calls


def free_port() -> int:
    """A free port below the ephemeral range (32768+), so that no outgoing connection, nor a test
    server elsewhere on the box asking the OS for any port, takes it between now and its use."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


# --------------------------------------------------------------------------- processes

class Process:
    """One ``python -m <module> ...`` with its output in ``<dir>/<name>-<n>.log`` (one file per start)."""

    def __init__(self, directory: Path, name: str, *args: str):
        self.directory, self.name, self.args = directory, name, args
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.directory / f"{self.name}-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", *self.args], cwd=ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def check(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            log = self.directory / f"{self.name}-{self.starts}.log"
            raise SystemExit(f"{self.name} exited ({self.proc and self.proc.returncode}):\n{log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class Fleet:
    """ComfyUI doubles, workers and a scheduler on loopback, configured in ``directory``."""

    def __init__(self, directory: Path, workers: int, step_time: float, clients: int):
        self.directory = directory
        self.n = workers
        # The page's users, as API-keyed clients of the scheduler (each holds at most max_jobs unfinished).
        self.keys = {f"soak-{c}": f"soak-key-{c}-{random.randrange(16 ** 16):016x}" for c in range(clients)}
        self.comfy_ports = [free_port() for _ in range(workers)]
        self.control_ports = [free_port() for _ in range(workers)]
        self.worker_ports = [free_port() for _ in range(workers)]
        self.scheduler_port = free_port()
        self.comfys = [Process(directory, f"comfy{i}", "t2i.comfy_sim", "--port", str(self.comfy_ports[i]),
                               "--control-port", str(self.control_ports[i]), "--step-time", str(step_time),
                               "--output-dir", str(directory / f"comfy{i}-output"), "--log-level", "warning")
                       for i in range(workers)]
        self.workers = [Process(directory, f"worker{i}", "t2i.worker", "--config", str(self.write_worker(i)))
                        for i in range(workers)]
        self.workers_yaml = directory / "workers.yaml"
        self.write_workers()
        scheduler_yaml = directory / "scheduler.yaml"
        scheduler_yaml.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{self.scheduler_port}", "workers_file": str(self.workers_yaml),
            "reload_interval": 0.5, "health_interval": 1,
            "clients": {"keys": self.keys, "max_jobs": 8, "allow_anonymous": False}}))
        self.scheduler = Process(directory, "scheduler", "t2i.scheduler", "--config", str(scheduler_yaml))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.scheduler_port}"

    def control(self, i: int) -> str:
        return f"http://127.0.0.1:{self.control_ports[i]}/control"

    def write_worker(self, i: int) -> Path:
        directory = self.directory / f"worker{i}"
        directory.mkdir()
        path = directory / "worker.yaml"
        path.write_text(yaml.safe_dump({
            "name": f"gpu-{i}",
            "listen": f"127.0.0.1:{self.worker_ports[i]}",
            "public_url": f"http://127.0.0.1:{self.worker_ports[i]}",
            "job_timeout": 60,
            "state_dir": str(directory / "state"),
            "images": {"dir": str(directory / "images")},
            "comfyui": {"url": f"http://127.0.0.1:{self.comfy_ports[i]}", "connect_timeout": 2,
                        "request_timeout": 10, "stall_timeout": STALL_TIMEOUT},
        }))
        return path

    def write_workers(self, disabled: tuple[int, ...] = ()) -> None:
        self.workers_yaml.write_text(yaml.safe_dump({"workers": [
            {"name": f"gpu-{i}", "url": f"http://127.0.0.1:{self.worker_ports[i]}", "enabled": i not in disabled,
             "max_queue": 8} for i in range(self.n)]}))

    def start(self) -> None:
        for process in (*self.comfys, *self.workers, self.scheduler):
            process.start()

    def stop(self) -> None:
        for process in (self.scheduler, *self.workers, *self.comfys):
            process.stop()


# --------------------------------------------------------------------------- jobs

@dataclass
class Job:
    number: int
    prompt_id: str | None = None
    status: str | None = None      # final status, or None (never accepted, or stuck)
    error: str | None = None
    refused: str | None = None     # why it was never accepted
    attempt: int = 1
    saw_404: bool = False
    image_ok: bool | None = None


class Soak:
    def __init__(self, fleet: Fleet, args: argparse.Namespace):
        self.fleet = fleet
        self.args = args
        self.jobs = [Job(n) for n in range(args.jobs)]
        self.slots = asyncio.Semaphore(args.concurrency)
        self.client = AsyncHTTPClient()
        self.fivexx: Counter = Counter()
        self.answers: Counter = Counter()
        self.fault_log: list[str] = []
        self.fault_windows: list[tuple[float, float, str]] = []   # (start, end, what) in run seconds
        self.fivexx_at: list[tuple[float, str]] = []              # (run seconds, "503 GET /status/{id}")
        self.started = time.monotonic()
        self.deadline = self.started + args.timeout

    @property
    def ended(self) -> int:
        return sum(job.status is not None or job.refused is not None for job in self.jobs)

    def clock(self) -> str:
        return f"{time.monotonic() - self.started:6.1f}s"

    async def fetch(self, route: str, url: str, body: Any = None, timeout: float = 20,
                    key: str | None = None) -> tuple[int, Any, Any]:
        """(status, headers, parsed JSON or bytes); 599 for no answer. Counts 5xx by route."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = HTTPRequest(url, method="POST" if body is not None else "GET",
                              body=json.dumps(body) if body is not None else None, headers=headers,
                              connect_timeout=3, request_timeout=timeout)
        try:
            response = await self.client.fetch(request, raise_error=False)
        except Exception as exc:  # noqa: BLE001 - a refused connection is an answer here
            self.answers[f"{route} no answer ({type(exc).__name__})"] += 1
            return 599, {}, None
        code = response.code
        if code == 599:
            self.answers[f"{route} no answer"] += 1
            return 599, {}, None
        self.answers[f"{route} {code}"] += 1
        if code >= 500 and route in CLIENT_ROUTES:  # the bench's own probes are not a client's
            kind = "retry" if response.headers.get("Retry-After") else "error"
            self.fivexx[(route, code, kind)] += 1
            self.fivexx_at.append((time.monotonic() - self.started, f"{code} {route}"))
        payload: Any = response.body
        if "json" in response.headers.get("Content-Type", ""):
            try:
                payload = json.loads(response.body)
            except ValueError:
                pass
        return code, response.headers, payload

    async def run_job(self, job: Job) -> None:
        async with self.slots:
            await self.submit(job)
            if job.prompt_id is not None:
                await self.follow(job)

    def key_of(self, job: Job) -> str:
        keys = list(self.fleet.keys.values())
        return keys[job.number % len(keys)]

    async def submit(self, job: Job) -> None:
        body = {"prompt": f"chaos soak job {job.number}", "steps": 4 + job.number % 4, "width": 64, "height": 64}
        while time.monotonic() < self.deadline:
            code, headers, answer = await self.fetch("POST /generate", self.fleet.url + "/generate", body,
                                                     key=self.key_of(job))
            if code == 200:
                job.prompt_id = answer["prompt_id"]
                return
            if code in (429, 503, 599):  # a client's share full, no worker with room, no answer: later
                await asyncio.sleep(min(float(headers.get("Retry-After", 1)), 2.0))
                continue
            job.refused = f"{code}: {answer.get('error') if isinstance(answer, dict) else answer!r}"
            return
        job.refused = "no worker took it before the deadline"

    async def follow(self, job: Job) -> None:
        since = 0
        while time.monotonic() < self.deadline:
            code, _, state = await self.fetch("GET /status/{id}",
                                              f"{self.fleet.url}/status/{job.prompt_id}?wait=10&since={since}",
                                              key=self.key_of(job))
            if code == 404:
                job.saw_404 = True
            if code != 200:
                await asyncio.sleep(0.5)
                continue
            since = state["version"]
            job.attempt = max(job.attempt, state.get("attempt") or 1)
            if state["status"] in FINAL:
                job.status, job.error = state["status"], state.get("error")
                if job.status == "completed":
                    job.image_ok = await self.image(state["image_url"])
                return

    async def image(self, url: str) -> bool:
        """The image served by its worker (tried again while the worker is down)."""
        while True:
            code, _, body = await self.fetch("GET /images/{file}", url)
            if code == 200:
                return isinstance(body, bytes) and body.startswith(b"\x89PNG")
            if code != 599 or time.monotonic() > self.deadline:
                return False
            await asyncio.sleep(0.5)

    # ----------------------------------------------------------------------- faults

    async def control(self, i: int, knob: str, body: dict | None = None) -> dict:
        """A knob of ComfyUI i's control port (``state`` is a GET, the rest POSTs)."""
        code, _, answer = await self.fetch("control", f"{self.fleet.control(i)}/{knob}",
                                           None if knob == "state" else body or {})
        if code != 200:
            raise RuntimeError(f"control {knob} on ComfyUI {i}: {code} {answer}")
        return answer

    async def drop_all(self) -> str:
        dropped = [(await self.control(i, "drop-websockets"))["dropped"] for i in range(self.fleet.n)]
        return f"dropped {sum(dropped)} websocket(s)"

    async def restart_comfy(self, i: int) -> str:
        """Restart ComfyUI i once it has work (up to 10 s): its queue is lost, the worker resubmits."""
        for _ in range(100):
            state = await self.control(i, "state")
            lost = len(state["queue_running"]) + len(state["queue_pending"])
            if lost >= 2:
                break
            await asyncio.sleep(0.1)
        await self.control(i, "restart")
        return f"ComfyUI {i} restarted with {lost} prompt(s) queued or running"

    async def fail_next(self, i: int) -> str:
        await self.control(i, "fail-next", {"node_type": "KSampler", "message": "CUDA out of memory"})
        return f"ComfyUI {i}'s next KSampler raises"

    async def stall(self, i: int) -> str:
        await self.control(i, "stall", {"on": True})
        await asyncio.sleep(STALL_TIMEOUT + 2)
        await self.control(i, "stall", {"on": False})
        return f"ComfyUI {i} stalled for {STALL_TIMEOUT + 2:g} s"

    async def kill_worker(self, i: int) -> str:
        """SIGKILL worker i, start it again 3 s later; the fault lasts until it answers again."""
        killed = time.monotonic()
        self.fleet.workers[i].kill()
        await asyncio.sleep(3)
        self.fleet.workers[i].start()
        url = f"http://127.0.0.1:{self.fleet.worker_ports[i]}/health"
        while (await self.fetch("fault", url, timeout=3))[0] == 599 and time.monotonic() < self.deadline:
            await asyncio.sleep(0.1)
        return f"worker {i} SIGKILLed, started again 3 s later, down {time.monotonic() - killed:.1f} s in all"

    async def edit_workers_yaml(self) -> str:
        disabled = self.fleet.n - 1
        self.fleet.write_workers(disabled=(disabled,))
        await asyncio.sleep(2)
        self.fleet.workers_yaml.write_text("workers:\n  - name: gpu-0\n    url: [unclosed\n")
        reported = None
        for _ in range(20):
            await asyncio.sleep(0.25)
            code, _, answer = await self.fetch("GET /workers", self.fleet.url + "/workers")
            if code == 200 and (answer.get("config") or {}).get("error"):
                reported = answer["config"]["error"]
                break
        self.fleet.write_workers()
        return (f"gpu-{disabled} disabled for 2 s; a broken workers.yaml "
                f"{'reported: ' + reported.splitlines()[0][:80] if reported else 'NOT reported'}; restored")

    async def faults(self) -> None:
        n = self.fleet.n
        schedule: list[tuple[float, Callable[[], Awaitable[str]]]] = [
            (0.10, self.drop_all),
            (0.20, lambda: self.restart_comfy(1 % n)),
            (0.30, lambda: self.fail_next(0)),
            (0.40, lambda: self.stall(2 % n)),
            (0.50, lambda: self.kill_worker(0)),
            (0.65, self.edit_workers_yaml),
            (0.80, self.drop_all),
        ]
        running = []
        for share, action in schedule:
            while self.ended < share * len(self.jobs):
                if time.monotonic() > self.deadline or self.ended == len(self.jobs):
                    break
                await asyncio.sleep(0.1)
            else:
                # Each fault runs on its own: a stall or a worker's downtime does not hold up the next one.
                running.append(asyncio.ensure_future(self.inject(action)))
                continue
            break
        await asyncio.gather(*running)

    async def inject(self, action: Callable[[], Awaitable[str]]) -> None:
        started, ended, start = self.clock(), self.ended, time.monotonic() - self.started
        try:
            what = await action()
        except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported
            what = f"FAILED to inject: {exc!r}"
        self.fault_windows.append((start, time.monotonic() - self.started, what.split(";")[0]))
        self.fault_log.append(f"{started} at {ended}/{len(self.jobs)} ended: {what}")
        print(f"  fault {self.fault_log[-1]}", flush=True)

    # ----------------------------------------------------------------------- the run

    async def wait_ready(self) -> None:
        """Every process up, each worker answering as itself, the scheduler seeing them all."""
        while True:
            for process in (*self.fleet.comfys, *self.fleet.workers, self.fleet.scheduler):
                process.check()
            names = []
            for i, port in enumerate(self.fleet.worker_ports):
                code, _, answer = await self.fetch("startup", f"http://127.0.0.1:{port}/health", timeout=3)
                names.append(answer.get("name") if code == 200 and isinstance(answer, dict) else None)
            code, _, answer = await self.fetch("startup", self.fleet.url + "/health", timeout=3)
            if (names == [f"gpu-{i}" for i in range(self.fleet.n)] and code == 200
                    and sum(w["ok"] for w in answer.get("workers", [])) == self.fleet.n):
                return
            if time.monotonic() - self.started > 60:
                raise SystemExit(f"the fleet did not come up in 60 s; logs in {self.fleet.directory}")
            await asyncio.sleep(0.2)

    async def run(self) -> None:
        await self.wait_ready()
        self.started = time.monotonic()
        self.deadline = self.started + self.args.timeout
        faults = asyncio.ensure_future(self.faults())
        await asyncio.gather(*(self.run_job(job) for job in self.jobs))
        await faults
        self.elapsed = time.monotonic() - self.started


def reason_of(error: str | None) -> str:
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", error or "")
    return re.sub(r"\d+(\.\d+)?", "N", text)[:110]


def report(soak: Soak) -> int:
    jobs = soak.jobs
    by_status = Counter(job.status for job in jobs if job.status)
    accepted = [job for job in jobs if job.prompt_id]
    stuck = [job for job in accepted if job.status is None]
    lost = [job for job in stuck if job.saw_404]
    no_image = [job for job in jobs if job.status == "completed" and not job.image_ok]
    no_reason = [job for job in jobs if job.status == "failed" and not (job.error or "").strip()]
    refused = Counter(job.refused for job in jobs if job.refused)
    errors = sum(count for (_, _, kind), count in soak.fivexx.items() if kind == "error")
    print(f"\n{len(jobs)} jobs, {soak.fleet.n} workers, concurrency {soak.args.concurrency}, "
          f"step time {soak.args.step_time}s: {soak.elapsed:.1f} s")
    print(f"  completed                 {by_status['completed']}"
          f"  ({sum(job.attempt > 1 for job in jobs if job.status == 'completed')} after a resubmit, attempt 2+)")
    print(f"  failed                    {by_status['failed']}")
    for reason, count in Counter(reason_of(job.error) for job in jobs if job.status == "failed").most_common():
        print(f"      {count:4d}  {reason}")
    print(f"  cancelled                 {by_status['cancelled']}")
    print(f"  never accepted            {sum(refused.values())}")
    for reason, count in refused.most_common():
        print(f"      {count:4d}  {reason}")
    print(f"  stuck (unfinished)        {len(stuck)}" + (f"  {[j.prompt_id for j in stuck[:5]]}" if stuck else ""))
    print(f"  lost (404 after accept)   {len(lost)}  ({sum(j.saw_404 for j in accepted)} answered 404 at some point)")
    print(f"  completed without image   {len(no_image)}")
    print(f"  failed without reason     {len(no_reason)}")
    print(f"  client-seen 5xx           {sum(soak.fivexx.values())} ({errors} errors, "
          f"{sum(soak.fivexx.values()) - errors} with Retry-After)")
    for (route, code, kind), count in sorted(soak.fivexx.items()):
        print(f"      {count:4d}  {code} {route} ({kind})")
    during: Counter = Counter()
    for at, what in soak.fivexx_at:  # which fault was under way (or had just ended: 3 s of grace)
        faults = [name for start, end, name in soak.fault_windows if start <= at <= end + 3]
        during[(what, faults[-1] if faults else "no fault under way")] += 1
    for (what, fault), count in sorted(during.items()):
        print(f"      {count:4d}  {what} while: {fault}")
    print("  faults")
    for line in soak.fault_log:
        print(f"      {line}")
    print("  answers: " + ", ".join(f"{key}: {count}" for key, count in sorted(soak.answers.items())
                                    if not key.startswith(("startup", "fault"))))
    bad = len(stuck) + len(lost) + len(no_image) + len(no_reason) + errors
    return 1 if bad else 0


async def main_async(args: argparse.Namespace) -> int:
    directory = Path(tempfile.mkdtemp(prefix="t2i-chaos-"))
    AsyncHTTPClient.configure(None, max_clients=args.concurrency + 16)
    fleet = Fleet(directory, args.workers, args.step_time, args.clients)
    print(f"chaos soak: {args.jobs} jobs, {args.workers} workers; processes and logs in {directory}", flush=True)
    fleet.start()
    code = 1
    try:
        soak = Soak(fleet, args)
        await soak.run()
        code = report(soak)
    finally:
        fleet.stop()
        if args.keep or code:
            print(f"logs kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=3, help="workers, each with its own ComfyUI (2 or more)")
    parser.add_argument("--concurrency", type=int, default=16, help="jobs in flight at once")
    parser.add_argument("--clients", type=int, default=4,
                        help="API-keyed clients the jobs are spread over (each may hold 8 unfinished jobs)")
    parser.add_argument("--step-time", type=float, default=0.05, help="ComfyUI seconds per sampler step")
    parser.add_argument("--timeout", type=float, default=150, help="seconds before unfinished jobs count as stuck")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with configs, journals and logs")
    args = parser.parse_args()
    if args.workers < 2:
        parser.error("--workers must be at least 2 (a worker is killed)")
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
