"""``/status`` polls per second: scheduler mirror vs worker direct vs a one-hop forward.

    python bench/poll_bench.py [--clients 32] [--seconds 3] [--runs 3]

Starts, each in its own process: a ComfyUI double + a worker (auth token set,
one job held pending), and schedulers over that worker:

* ``mirror``: a normal scheduler; ``/status`` is answered from its job mirror.
* ``forward-simple`` / ``forward-curl``: schedulers whose token the worker
  refuses, so their ``/jobs`` feed never comes up and every ``/status`` is
  forwarded to the worker (one hop), with the simple or the curl HTTP client.

and ``worker`` (the worker's own ``/status``) as the baseline. Load comes from
this process: ``--clients`` keep-alive connections, each sending the next
request when the last answer arrived. Prints the median of ``--runs`` runs of
each, and ratios. Target: mirror >= 2x the forward. Exit 1 when missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TOKEN = "bench-token"


# --- the worker side (child process) ------------------------------------------------

async def serve_worker(directory: Path, port_file: Path) -> None:
    from support.cluster import start_sim, start_worker  # noqa: E402
    from t2i.httpclient import configure_http_client

    configure_http_client(prefer_curl=False)
    sim = await start_sim(step_time=0.01)
    sim.stall = True  # jobs stay pending: their status is "fresh" only while the feed is up
    worker = await start_worker(directory, sim.url, name="gpu-a", auth_token=TOKEN)
    port_file.write_text(str(worker.port))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await worker.stop()
    await sim.stop()


# --- load ----------------------------------------------------------------------------

async def client_loop(host: str, port: int, path: str, deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    done = 0
    try:
        while time.monotonic() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if status != 200:
                raise RuntimeError(f"{path} answered {status}")
            done += 1
    finally:
        counts.append(done)
        writer.close()


async def measure(port: int, path: str, clients: int, seconds: float) -> float:
    counts: list[int] = []
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(*(client_loop("127.0.0.1", port, path, deadline, counts) for _ in range(clients)))
    return sum(counts) / (time.monotonic() - started)


# --- orchestration ---------------------------------------------------------------------

def wait_until(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("bench: timed out starting the servers")


def http_json(url: str, body=None, token: str | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def free_port() -> int:
    from support.net import free_port as free

    return free()


def start_scheduler(directory: Path, worker_port: int, token: str, client: str) -> tuple[subprocess.Popen, int]:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (directory / "workers.yaml").write_text(yaml.safe_dump({"workers": [
        {"name": "gpu-a", "url": f"http://127.0.0.1:{worker_port}"}]}))
    (directory / "scheduler.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "workers_file": "workers.yaml", "auth_token": token,
        "reload_interval": 5, "health_interval": 5}))
    proc = subprocess.Popen([sys.executable, "-m", "t2i.scheduler", "--config", str(directory / "scheduler.yaml"),
                             "--log-level", "warning", "--http-client", client], cwd=ROOT,
                            stderr=subprocess.DEVNULL)
    wait_until(lambda: http_json(f"http://127.0.0.1:{port}/workers"))
    return proc, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve-worker", nargs=2, metavar=("DIR", "PORT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_worker:
        asyncio.run(serve_worker(Path(args.serve_worker[0]), Path(args.serve_worker[1])))
        return 0

    try:
        import pycurl  # noqa: F401
        have_curl = True
    except ImportError:
        have_curl = False

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        port_file = tmp_path / "worker.port"
        procs.append(subprocess.Popen([sys.executable, __file__, "--serve-worker", str(tmp_path / "w"),
                                       str(port_file)], cwd=ROOT, stderr=subprocess.DEVNULL))
        try:
            worker_port = int(wait_until(lambda: port_file.exists() and port_file.read_text()))
            targets = {"worker": worker_port}
            proc, targets["mirror"] = start_scheduler(tmp_path / "s-mirror", worker_port, TOKEN, "simple")
            procs.append(proc)
            proc, targets["forward-simple"] = start_scheduler(tmp_path / "s-simple", worker_port, "wrong", "simple")
            procs.append(proc)
            if have_curl:
                proc, targets["forward-curl"] = start_scheduler(tmp_path / "s-curl", worker_port, "wrong", "curl")
                procs.append(proc)
            job = http_json(f"http://127.0.0.1:{targets['mirror']}/generate", {"prompt": "bench"})
            path = f"/status/{job['prompt_id']}"
            wait_until(lambda: any(w["feed"]["state"] == "up" for w in
                                   http_json(f"http://127.0.0.1:{targets['mirror']}/workers")["workers"]))
            results: dict[str, list[float]] = {name: [] for name in targets}
            for run in range(args.runs):
                for name, port in targets.items():
                    rate = asyncio.run(measure(port, path, args.clients, args.seconds))
                    results[name].append(rate)
                    print(f"run {run + 1} {name:15s} {rate:8.0f} polls/s", flush=True)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    medians = {name: statistics.median(rates) for name, rates in results.items()}
    print(f"\n/status polls/s, {args.clients} keep-alive clients, median of {args.runs} x {args.seconds:g}s "
          f"({os.cpu_count()} CPUs):")
    for name, rate in medians.items():
        print(f"  {name:15s} {rate:8.0f}")
    ratio = medians["mirror"] / medians["forward-simple"]
    print(f"  mirror / forward-simple   {ratio:5.2f}x  (target >= 2x)")
    print(f"  mirror / worker direct    {medians['mirror'] / medians['worker']:5.2f}x")
    if "forward-curl" in medians:
        print(f"  forward-curl / forward-simple {medians['forward-curl'] / medians['forward-simple']:5.2f}x")
    else:
        print("  forward-curl: pycurl not installed (pip install pycurl)")
    return 0 if ratio >= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
