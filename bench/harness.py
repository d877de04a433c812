"""Shared plumbing of the issue-15 benches (overhead_bench, cpu_bench, makespan_bench, poll_rate_bench).

Not a bench itself: processes on loopback (``python -m t2i.comfy_sim | t2i.worker | t2i.scheduler``,
each its own process with its log in a temp dir), their configs, a process's CPU time, a small
keep-alive HTTP/1.1 client (the same one for every path a bench compares, so the client's own cost
is the same on each side), and the statistics the benches print (percentiles, median and range).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


# --------------------------------------------------------------------------- ports, versions

def free_port() -> int:
    """A free port below the ephemeral range (32768+), so no outgoing connection takes it before its use."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port


def code_version() -> str:
    """``<commit> (+ uncommitted changes in t2i/)``: what was measured (``T2I_BENCH_CODE`` names it for a
    copy of the tree outside git, e.g. ``git archive HEAD``)."""
    if os.environ.get("T2I_BENCH_CODE"):
        return os.environ["T2I_BENCH_CODE"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "t2i"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted changes in t2i/' if dirty else ''}"


def machine_line() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load} (before the run), Python {sys.version.split()[0]}"


# --------------------------------------------------------------------------- processes

class Process:
    """``python -m <module> ...`` with stdout+stderr in ``<dir>/<name>.log``."""

    def __init__(self, directory: Path, name: str, *args: str):
        self.directory, self.name, self.args = directory, name, args
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def start(self) -> "Process":
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", *self.args], cwd=ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    def check(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise SystemExit(f"{self.name} exited ({self.proc and self.proc.returncode}):\n{tail}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def comfy_process(directory: Path, name: str, port: int, step_time: float) -> Process:
    return Process(directory, name, "t2i.comfy_sim", "--port", str(port), "--step-time", str(step_time),
                   "--output-dir", str(directory / f"{name}-output"), "--log-level", "warning")


def worker_process(directory: Path, name: str, port: int, comfy_url: str, log_level: str = "info",
                   **overrides: Any) -> Process:
    """A worker with its own state_dir and images dir under ``directory/name``; defaults otherwise
    (``comfyui.ahead``, ``backlog``, retention...), ``overrides`` merged into worker.yaml."""
    home = directory / name
    home.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "name": name, "listen": f"{HOST}:{port}", "public_url": f"http://{HOST}:{port}",
        "state_dir": str(home / "state"), "images": {"dir": str(home / "images")},
        "comfyui": {"url": comfy_url},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    (home / "worker.yaml").write_text(yaml.safe_dump(config))
    return Process(directory, name, "t2i.worker", "--config", str(home / "worker.yaml"), "--log-level", log_level)


def scheduler_process(directory: Path, name: str, port: int, workers: list[dict[str, Any]],
                      log_level: str = "info", http_client: str | None = None, **overrides: Any) -> Process:
    """A scheduler over ``workers`` (workers.yaml entries), its defaults otherwise."""
    home = directory / name
    home.mkdir(parents=True, exist_ok=True)
    (home / "workers.yaml").write_text(yaml.safe_dump({"workers": workers}))
    config = {"listen": f"{HOST}:{port}", "workers_file": "workers.yaml", **overrides}
    (home / "scheduler.yaml").write_text(yaml.safe_dump(config))
    args = ["t2i.scheduler", "--config", str(home / "scheduler.yaml"), "--log-level", log_level]
    if http_client:
        args += ["--http-client", http_client]
    return Process(directory, name, *args)


def stop_all(processes: Iterable[Process]) -> None:
    for process in processes:
        process.stop()


# --------------------------------------------------------------------------- CPU time

try:
    import psutil  # type: ignore
except ImportError:  # pragma: no cover - depends on the box
    psutil = None

CPU_SOURCE = "psutil" if psutil else "/proc/<pid>/stat utime+stime"
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    if psutil is not None:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    # after "(comm)": state is field 3, utime 14, stime 15 (1-based) -> 11, 12 here
    return (int(fields[11]) + int(fields[12])) / _TICKS


def cpu_resolution() -> float:
    return 0.0 if psutil is not None else 1 / _TICKS


# --------------------------------------------------------------------------- HTTP

class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class Http:
    """A minimal keep-alive HTTP/1.1 client over asyncio streams: idle connections pooled per host:port
    (any number in flight), Content-Length and chunked bodies. Raises ``ConnectionError`` for no answer."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Conn]] = {}

    async def request(self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
                      timeout: float = 60.0) -> Response:
        parts = urlsplit(url)
        key = (parts.hostname or HOST, parts.port or 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        data = b""
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {key[0]}:{key[1]}"]
        if body is not None or method == "POST":
            lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + data
        for attempt in (1, 2):
            pool = self._idle.setdefault(key, [])
            reused = bool(pool)
            conn = pool.pop() if pool else None
            try:
                if conn is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(*key), timeout)
                    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn = _Conn(reader, writer)
                conn.writer.write(raw)
                response, keep = await asyncio.wait_for(self._read(conn.reader, method), timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                if conn is not None:
                    conn.close()
                if reused and attempt == 1 and not isinstance(exc, asyncio.TimeoutError):
                    continue  # the server closed an idle keep-alive connection: once more on a new one
                raise ConnectionError(f"{method} {url}: {type(exc).__name__} {exc}") from None
            if keep:
                self._idle[key].append(conn)
            else:
                conn.close()
            return response
        raise AssertionError("unreachable")

    @staticmethod
    async def _read(reader: asyncio.StreamReader, method: str) -> tuple[Response, bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        keep = headers.get("connection", "").lower() != "close" and not lines[0].startswith("HTTP/1.0")
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return Response(status, headers, b""), keep
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers expected
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(chunks)
        else:
            body, keep = await reader.read(), False
        return Response(status, headers, body), keep

    def close(self) -> None:
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()


async def wait_until(check, timeout: float = 60.0, what: str = "the servers", processes: Iterable[Process] = ()):
    """Call the async ``check`` until it returns something true (connection errors count as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        for process in processes:
            process.check()
        try:
            value = await check()
            if value:
                return value
        except (ConnectionError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def healthy(http: Http, url: str) -> bool:
    return (await http.request("GET", url + "/health", timeout=5)).status == 200


async def scheduler_sees(http: Http, url: str, workers: int) -> bool:
    """The scheduler is healthy, every worker is up in it and its feed is followed."""
    response = await http.request("GET", url + "/workers", timeout=5)
    if response.status != 200:
        return False
    states = response.json().get("workers", [])
    return len(states) == workers and all(
        (w.get("feed") or {}).get("state") == "up" and w.get("routable")
        and (w.get("workflows") or {}).get("txt2img", {}).get("ready") for w in states)


# --------------------------------------------------------------------------- statistics

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def med_range(values: list[float], fmt: str = "{:.1f}") -> str:
    """``median [min–max]`` of repetitions (just the value for one)."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


async def fake_feed_page(worker: Any, handler: Any) -> dict[str, Any]:
    """``GET /jobs`` of a fake worker (``jobs``, ``seq``, ``epoch``, ``changed``), answered the way a
    t2i worker answers it: held while nothing changed, full or since a cursor, paged by version."""
    since = int(handler.get_argument("since", "0"))
    wait = float(handler.get_argument("wait", "0"))
    limit = handler.get_argument("limit", None)
    after = int(handler.get_argument("after", "0"))
    if wait > 0 and since == worker.seq:
        try:
            await asyncio.wait_for(worker.changed.wait(), wait)
        except asyncio.TimeoutError:
            pass
    full = since <= 0 or since > worker.seq
    jobs = [job for job in worker.jobs.values() if full or job["version"] > since]
    page: dict[str, Any] = {"epoch": worker.epoch, "seq": worker.seq, "full": full}
    if limit is not None:
        jobs = sorted((job for job in jobs if job["version"] > after), key=lambda job: job["version"])
        more = len(jobs) > int(limit)
        jobs = jobs[:int(limit)]
        page.update(more=more, cursor=jobs[-1]["version"] if more else None)
    page.update(jobs=jobs, removed=[])
    return page


def run_in_temp_dir(run: Any, args: Any, prefix: str) -> None:
    """``asyncio.run(run(args, directory))`` in a new temp dir (kept with ``args.keep``); exits with its code."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        code = asyncio.run(run(args, directory))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    sys.exit(code)
