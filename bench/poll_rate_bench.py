"""``/status`` polls against a minimal in-memory Tornado handler: saturated rate, rate at p99 <= 50 ms,
bytes per parked long-poll. Extends ``bench/poll_bench.py`` (whose worker and schedulers it starts).

    python bench/poll_rate_bench.py [--runs 3] [--clients 32] [--seconds 3] [--step 4] [--parked 1000]
                                    [--load auto|wrk|python|both] [--wrk-connections 1,2,...,256]

Servers, each its own process on 127.0.0.1, side by side in one run:

* ``minimal``: a minimal in-memory Tornado handler, the baseline: ``GET /status/{id}`` answers
  ``json.dumps`` of a dict it holds (the very status object the mirror answers, so the bodies are the
  same size), and with ``?wait=S&since=V`` parks on a future until S passes;
* ``mirror``: a t2i scheduler answering from its job mirror (poll_bench's ``mirror``);
* ``forward``: a scheduler whose feed the worker refuses, so each poll is forwarded one hop to the
  worker (poll_bench's ``forward-simple``: the naive proxy);
* ``worker``: the worker's own ``/status`` (saturated rate only, for reference).

The rate at p99 <= 50 ms comes from ``wrk`` when it is installed (``apt-get install wrk``; bench only,
never needed by the tests): one wrk thread, a ladder of connection counts (``--wrk-connections``), each
point a closed loop whose latency counts from each request's send; the highest rate of a point with
p99 <= 50 ms. On 2 cores wrk costs the server far less CPU than the Python generator, which tops out near
4,000/s and so cannot show a server more than ~1.3x the minimal handler. ``--load python`` (the default
without wrk) keeps the Python open loop described below; ``--load both`` runs both.

Measured per run: (1) polls/s saturated: ``--clients`` keep-alive connections, each sending its next
request when the last answer came (poll_bench's loop); (2) open loop: requests sent on a fixed schedule
at rising rates (``--rates``, ``--step`` s each, over 64 keep-alive connections, latency counted from
the scheduled send time, so a server that falls behind is not flattered; each rate tried on every server
in turn, so they share the box's good and bad moments; a server leaves after two rates in a row over
50 ms), the highest rate whose p99 is <= 50 ms, per run and from the runs' median p99 at each rate; (3) once per run on fresh servers: RSS growth per parked long-poll (``--parked`` connections
each holding ``/status?wait=30&since=<version>``, connection included; VmRSS of the process before and
after). Load comes from this process (on 2 cores its open loop tops out near the servers' saturated rates: a
ladder that ends because the rate was not achieved, at about the same rate for every server, measured
the load generator). poll_bench's worker is started here with job_timeout and stall_timeout long enough
that its held job never changes during the run. Prints each run, then medians [ranges] and the ratios. Targets
(issue 15): mirror >= 1.4x minimal at p99 <= 50 ms, >= 3x the forward; a long-poll <= 14 KB. Asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import poll_bench  # noqa: E402  (its worker, its schedulers, its closed-loop measure)
from harness import code_version, machine_line, med_range, percentile  # noqa: E402

DEFAULT_RATES = "250,500,750,1000,1500,2000,3000,4000,5000,6000"
P99_LIMIT = 0.050


# --- the worker side (child process) -----------------------------------------------------------------

async def serve_worker(directory: Path, port_file: Path) -> None:
    """poll_bench's worker (a ComfyUI double that never moves, one job held unfinished), with
    ``job_timeout`` and ``comfyui.stall_timeout`` long enough that the job stays unfinished all along."""
    from support.cluster import start_sim, start_worker
    from t2i.httpclient import configure_http_client

    configure_http_client(prefer_curl=False)
    sim = await start_sim(step_time=0.01)
    sim.stall = True
    worker = await start_worker(directory, sim.url, name="gpu-a", auth_token=poll_bench.TOKEN, job_timeout=7200,
                                comfyui={"stall_timeout": 7200})
    port_file.write_text(str(worker.port))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await worker.stop()
    await sim.stop()


# --- the minimal in-memory handler (child process) ---------------------------------------------------

def serve_minimal(port_file: Path, body_file: Path) -> None:
    from tornado import web

    state = json.loads(body_file.read_text())

    class Status(web.RequestHandler):
        async def get(self, prompt_id: str) -> None:
            wait = float(self.get_query_argument("wait", "0"))
            since = self.get_query_argument("since", None)
            if wait > 0 and since is not None and state["version"] <= int(since):
                try:
                    await asyncio.wait_for(asyncio.get_running_loop().create_future(), wait)
                except asyncio.TimeoutError:
                    pass
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(state))

    async def main() -> None:
        from tornado.httpserver import HTTPServer
        from tornado.netutil import bind_sockets

        sockets = bind_sockets(0, "127.0.0.1")  # Tornado's defaults, as a minimal app gets them
        HTTPServer(web.Application([(r"/status/([^/]+)", Status)])).add_sockets(sockets)
        port_file.write_text(str(sockets[0].getsockname()[1]))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    asyncio.run(main())


def start_minimal(directory: Path, body_file: Path) -> tuple[subprocess.Popen, int]:
    directory.mkdir(parents=True, exist_ok=True)
    port_file = directory / "minimal.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--serve-minimal", str(port_file), str(body_file)],
                            cwd=poll_bench.ROOT, stderr=subprocess.DEVNULL)
    return proc, int(poll_bench.wait_until(lambda: port_file.exists() and port_file.read_text()))


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- load ---------------------------------------------------------------------------------------------

async def open_loop(port: int, path: str, rate: float, seconds: float, connections: int = 64) -> tuple[float, float]:
    """Requests at ``rate``/s on a fixed schedule for ``seconds``: (p99 latency from the scheduled send
    time, answers per second achieved)."""
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    total = int(rate * seconds)
    latencies: list[float] = []
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    start = loop.time() + 0.05

    async def lane(k: int) -> None:
        reader, writer = streams[k]
        for i in range(k, total, connections):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if head[9:12] != b"200":
                raise RuntimeError(f"{path} answered {head[9:12].decode()}")
            latencies.append(loop.time() - due)

    try:
        await asyncio.gather(*(lane(k) for k in range(connections)))
    finally:
        for _, writer in streams:
            writer.close()
    elapsed = loop.time() - start
    return percentile(latencies, 99), len(latencies) / elapsed


async def ladder(ports: dict[str, int], path: str, rates: list[float], seconds: float,
                 offset: int) -> dict[str, dict[float, float]]:
    """The open-loop ladder for every server at once: each rate is tried on each server in turn (the order
    rotating with ``offset``), so the servers share the box's good and bad moments. A server leaves the
    ladder after two rates in a row with p99 over 50 ms or not achieved. Returns server -> rate -> p99
    (inf: not achieved; None: not tried)."""
    names = list(ports)
    p99s: dict[str, dict[float, float | None]] = {name: {rate: None for rate in rates} for name in names}
    misses = {name: 0 for name in names}
    for step, rate in enumerate(rates):
        order = names[(offset + step) % len(names):] + names[:(offset + step) % len(names)]
        for name in order:
            if misses[name] >= 2:
                continue
            p99, achieved = await open_loop(ports[name], path, rate, seconds)
            p99s[name][rate] = p99 if achieved >= 0.9 * rate else float("inf")
            misses[name] = misses[name] + 1 if p99s[name][rate] > P99_LIMIT else 0
            await asyncio.sleep(0.2)
        if all(miss >= 2 for miss in misses.values()):
            break
    return p99s


def best_rate(p99_by_rate: dict[float, float | None]) -> float:
    """The highest rate with p99 <= 50 ms (0 when none)."""
    return max((rate for rate, p99 in p99_by_rate.items() if p99 is not None and p99 <= P99_LIMIT), default=0.0)


def ladder_text(p99_by_rate: dict[float, float | None]) -> str:
    """``rate:p99`` in ms of each rate tried (``x``: the rate was not achieved)."""
    return " ".join(f"{rate:g}:{'x' if p99 == float('inf') else f'{p99 * 1000:.0f}'}"
                    for rate, p99 in p99_by_rate.items() if p99 is not None)


# --- wrk (a C load generator: a faster server than the Python generator can drive still shows) --------

WRK_CONNECTIONS = "1,2,4,8,16,32,64,128,256"
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk_point(port: int, path: str, connections: int, seconds: float) -> tuple[float, float]:
    """``wrk -t1 -c<connections> --latency``: (answers per second, p99 latency in seconds). Closed loop
    over ``connections`` keep-alive connections: each sends its next request when its answer came, so
    the latency of a request counts from its send (a stall shows in the requests in flight then)."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "5s",
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=seconds + 30).stdout
    rate = p99 = None
    for line in out.splitlines():
        words = line.split()
        if words[:1] == ["Requests/sec:"]:
            rate = float(words[1])
        elif words[:1] == ["99%"]:
            number = words[1].rstrip("usm")
            p99 = float(number) * _UNITS[words[1][len(number):]]
        elif line.strip().startswith(("Non-2xx", "Socket errors")):
            raise RuntimeError(f"wrk against {path}: {line.strip()}")
    if rate is None or p99 is None:
        raise RuntimeError(f"wrk printed no rate or p99:\n{out}")
    return rate, p99


def wrk_ladder(ports: dict[str, int], path: str, connections: list[int], seconds: float,
               offset: int) -> dict[str, dict[int, tuple[float, float]]]:
    """wrk at each connection count on each server in turn (the order rotating with ``offset``); a server
    leaves after two counts in a row with p99 over 50 ms. Returns server -> connections -> (rate, p99)."""
    names = list(ports)
    points: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in names}
    misses = {name: 0 for name in names}
    for step, count in enumerate(connections):
        order = names[(offset + step) % len(names):] + names[:(offset + step) % len(names)]
        for name in order:
            if misses[name] >= 2:
                continue
            points[name][count] = wrk_point(ports[name], path, count, seconds)
            misses[name] = misses[name] + 1 if points[name][count][1] > P99_LIMIT else 0
            time.sleep(0.2)
        if all(miss >= 2 for miss in misses.values()):
            break
    return points


def wrk_best(points: dict[int, tuple[float, float]]) -> float:
    """The highest rate of a point with p99 <= 50 ms (0 when none)."""
    return max((rate for rate, p99 in points.values() if p99 <= P99_LIMIT), default=0.0)


def wrk_text(points: dict[int, tuple[float, float]]) -> str:
    return " ".join(f"{count}:{rate:.0f}/{'x' if p99 == float('inf') else f'{p99 * 1000:.0f}'}"
                    for count, (rate, p99) in points.items())


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def parked_bytes(pid: int, port: int, path: str, count: int) -> float:
    """RSS growth of ``pid`` per parked long-poll (the connection included), in bytes."""
    before = rss_kb(pid)
    streams = []
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    try:
        for i in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            streams.append((reader, writer))
            if i % 100 == 99:
                await asyncio.sleep(0.05)  # the server accepts as we go (its listen backlog is not the question)
        await asyncio.sleep(2.0)
        after = rss_kb(pid)
        answered = sum(1 for reader, _ in streams if reader._buffer)  # none should have been answered
    finally:
        for _, writer in streams:
            writer.close()
    if answered:
        print(f"  ({answered} of {count} long-polls were answered early: the job changed)")
    return (after - before) * 1024 / count


# --- orchestration --------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32, help="closed-loop connections (saturated rate)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per saturated measurement")
    parser.add_argument("--rates", default=DEFAULT_RATES, help="open-loop ladder, polls/s")
    parser.add_argument("--step", type=float, default=4.0,
                        help="seconds per open-loop rate (longer: one stall of the shared box weighs less in p99)")
    parser.add_argument("--parked", type=int, default=1000, help="long-polls parked for the memory measure")
    parser.add_argument("--load", choices=["auto", "wrk", "python", "both"], default="auto",
                        help="the rate at p99 <= 50 ms from wrk's closed loop over --wrk-connections, from the "
                             "Python open loop over --rates, or both (auto: wrk when installed)")
    parser.add_argument("--wrk-connections", default=WRK_CONNECTIONS, help="wrk's ladder of connection counts")
    parser.add_argument("--wrk-seconds", type=float, default=4.0, help="seconds per wrk point")
    parser.add_argument("--serve-minimal", nargs=2, metavar=("PORT_FILE", "BODY_FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-worker", nargs=2, metavar=("DIR", "PORT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_worker:
        asyncio.run(serve_worker(Path(args.serve_worker[0]), Path(args.serve_worker[1])))
        return 0
    if args.serve_minimal:
        serve_minimal(Path(args.serve_minimal[0]), Path(args.serve_minimal[1]))
        return 0
    rates = [float(rate) for rate in args.rates.split(",")]
    use_wrk = args.load in ("wrk", "both") or (args.load == "auto" and shutil.which("wrk") is not None)
    use_python = args.load in ("python", "both") or (args.load == "auto" and not use_wrk)
    if use_wrk and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk), use --load python")
    wrk_counts = [int(count) for count in args.wrk_connections.split(",")]
    print(f"poll rate bench: {args.runs} run(s); saturated {args.clients} clients x {args.seconds:g} s; open loop "
          f"{args.step:g} s per rate; {args.parked} parked long-polls")
    print(f"  code {code_version()}; {machine_line()}; rate at p99 <= 50 ms from "
          + " and ".join(name for name, used in (("wrk's closed loop", use_wrk), ("the Python open loop", use_python))
                         if used), flush=True)

    saturated: dict[str, list[float]] = {name: [] for name in ("minimal", "mirror", "forward", "worker")}
    at_p99: dict[str, list[float]] = {name: [] for name in ("minimal", "mirror", "forward")}
    ladders: dict[str, list[dict[float, float | None]]] = {name: [] for name in at_p99}
    wrk_at_p99: dict[str, list[float]] = {name: [] for name in at_p99}
    wrk_points: dict[str, list[dict[int, tuple[float, float]]]] = {name: [] for name in at_p99}
    parked: dict[str, list[float]] = {name: [] for name in ("minimal", "mirror")}
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        port_file = tmp_path / "worker.port"
        procs.append(subprocess.Popen([sys.executable, __file__, "--serve-worker", str(tmp_path / "w"),
                                       str(port_file)], cwd=poll_bench.ROOT, stderr=subprocess.DEVNULL))
        try:
            worker_port = int(poll_bench.wait_until(lambda: port_file.exists() and port_file.read_text()))
            mirror, mirror_port = poll_bench.start_scheduler(tmp_path / "s-mirror", worker_port, poll_bench.TOKEN,
                                                             "simple")
            procs.append(mirror)
            forward, forward_port = poll_bench.start_scheduler(tmp_path / "s-forward", worker_port, "wrong", "simple")
            procs.append(forward)
            job = poll_bench.http_json(f"http://127.0.0.1:{mirror_port}/generate", {"prompt": "bench"})
            path = f"/status/{job['prompt_id']}"
            poll_bench.wait_until(lambda: any(w["feed"]["state"] == "up" for w in poll_bench.http_json(
                f"http://127.0.0.1:{mirror_port}/workers")["workers"]))
            state = poll_bench.wait_until(lambda: poll_bench.http_json(f"http://127.0.0.1:{mirror_port}{path}"))
            body_file = tmp_path / "status.json"
            body_file.write_text(json.dumps(state))
            minimal, minimal_port = start_minimal(tmp_path, body_file)
            procs.append(minimal)
            print(f"  status body {len(json.dumps(state))} bytes (status {state['status']}, version {state['version']})")
            ports = {"minimal": minimal_port, "mirror": mirror_port, "forward": forward_port, "worker": worker_port}
            for run in range(args.runs):
                # (3) fresh servers: a parked long-poll's bytes
                fresh_mirror, fresh_mirror_port = poll_bench.start_scheduler(tmp_path / f"s-fresh-{run}", worker_port,
                                                                              poll_bench.TOKEN, "simple")
                fresh_minimal, fresh_minimal_port = start_minimal(tmp_path / f"m-fresh-{run}", body_file)
                try:
                    poll_bench.wait_until(lambda: any(w["feed"]["state"] == "up" for w in poll_bench.http_json(
                        f"http://127.0.0.1:{fresh_mirror_port}/workers")["workers"]))
                    now = poll_bench.http_json(f"http://127.0.0.1:{fresh_mirror_port}{path}")
                    if (now["status"], now["version"]) != (state["status"], state["version"]):
                        print(f"  (the job changed: {now['status']} v{now['version']}; the minimal handler "
                              f"answers {state['status']} v{state['version']})")
                    long_path = f"{path}?wait=30&since={now['version']}"
                    asyncio.run(open_loop(fresh_mirror_port, path, 200, 0.5))   # warm both up alike
                    asyncio.run(open_loop(fresh_minimal_port, path, 200, 0.5))
                    for name, proc, port in (("minimal", fresh_minimal, fresh_minimal_port),
                                             ("mirror", fresh_mirror, fresh_mirror_port)):
                        parked[name].append(asyncio.run(parked_bytes(proc.pid, port, long_path, args.parked)))
                finally:
                    stop([fresh_mirror, fresh_minimal])
                print(f"run {run + 1} parked long-poll: minimal {parked['minimal'][-1] / 1024:.1f} KB, "
                      f"mirror {parked['mirror'][-1] / 1024:.1f} KB", flush=True)
                # (1) saturated, (2) open loop
                for name, port in ports.items():
                    rate = asyncio.run(poll_bench.measure(port, path, args.clients, args.seconds))
                    saturated[name].append(rate)
                    print(f"run {run + 1} saturated {name:8s} {rate:7.0f} polls/s", flush=True)
                if use_python:
                    p99s = asyncio.run(ladder({name: ports[name] for name in at_p99}, path, rates, args.step, run))
                    for name in at_p99:
                        ladders[name].append(p99s[name])
                        at_p99[name].append(best_rate(p99s[name]))
                        print(f"run {run + 1} p99<=50ms {name:8s} {at_p99[name][-1]:7.0f} polls/s   "
                              f"(rate:p99 ms {ladder_text(p99s[name])})", flush=True)
                if use_wrk:
                    points = wrk_ladder({name: ports[name] for name in at_p99}, path, wrk_counts, args.wrk_seconds, run)
                    for name in at_p99:
                        wrk_points[name].append(points[name])
                        wrk_at_p99[name].append(wrk_best(points[name]))
                        print(f"run {run + 1} wrk p99<=50ms {name:8s} {wrk_at_p99[name][-1]:7.0f} polls/s   "
                              f"(connections:rate/p99 ms {wrk_text(points[name])})", flush=True)
        finally:
            stop(procs)

    print(f"\n/status polls, median [range] of {args.runs} run(s):")
    for name, rates_ in saturated.items():
        print(f"  saturated     {name:8s} {med_range(rates_, '{:.0f}')} polls/s")
    if use_wrk:
        for name, rates_ in wrk_at_p99.items():
            print(f"  p99 <= 50 ms  {name:8s} {med_range(rates_, '{:.0f}')} polls/s  (wrk)")
        ratio = [m / b for m, b in zip(wrk_at_p99["mirror"], wrk_at_p99["minimal"]) if b] or [float("nan")]
        ratio_fwd = [m / f for m, f in zip(wrk_at_p99["mirror"], wrk_at_p99["forward"]) if f] or [float("nan")]
        print(f"  mirror / minimal at p99 <= 50 ms, wrk, per run  {med_range(ratio, '{:.2f}')}x  (target >= 1.4x)")
        print(f"  mirror / forward at p99 <= 50 ms, wrk, per run  {med_range(ratio_fwd, '{:.2f}')}x  (target >= 3x)")
        # Robust to one bad run on a shared box: each count's rate and p99 are the medians over the runs.
        pooled = {name: {count: (statistics.median(run.get(count, (0.0, 0.0))[0] for run in wrk_points[name]),
                                 statistics.median(run.get(count, (0.0, float("inf")))[1] for run in wrk_points[name]))
                         for count in wrk_counts} for name in at_p99}
        for name in at_p99:
            print(f"  p99 <= 50 ms  {name:8s} {wrk_best(pooled[name]):5.0f} polls/s from the runs' medians per "
                  f"connection count (wrk; connections:rate/p99 ms {wrk_text(pooled[name])})")
        best = {name: wrk_best(pooled[name]) for name in at_p99}
        for other, target in (("minimal", 1.4), ("forward", 3)):
            value = best["mirror"] / best[other] if best[other] else float("nan")
            print(f"  mirror / {other} at p99 <= 50 ms, wrk, runs' medians per count  {value:.2f}x  (target >= {target:g}x)")
    if use_python:
        python_summary(rates, at_p99, ladders)
    sat_ratio = [m / b for m, b in zip(saturated["mirror"], saturated["minimal"])]
    sat_fwd = [m / f for m, f in zip(saturated["mirror"], saturated["forward"])]
    print(f"  mirror / minimal saturated        {med_range(sat_ratio, '{:.2f}')}x")
    print(f"  mirror / forward saturated        {med_range(sat_fwd, '{:.2f}')}x")
    print(f"  parked long-poll: minimal {med_range([b / 1024 for b in parked['minimal']])} KB, mirror "
          f"{med_range([b / 1024 for b in parked['mirror']])} KB  (target <= 14 KB)")
    return 0


def python_summary(rates: list[float], at_p99: dict[str, list[float]],
                   ladders: dict[str, list[dict[float, float | None]]]) -> None:
    """The Python open loop's rates at p99 <= 50 ms: per run, and from the runs' median p99 per rate."""
    for name, rates_ in at_p99.items():
        print(f"  p99 <= 50 ms  {name:8s} {med_range(rates_, '{:.0f}')} polls/s  (Python open loop)")
    # Robust to one bad run on a shared box: each rate's p99 is the median of the runs' p99 at that rate.
    pooled = {name: {rate: statistics.median(float("inf") if run[rate] is None else run[rate]
                                             for run in ladders[name]) for rate in rates}
              for name in at_p99}
    for name in at_p99:
        print(f"  p99 <= 50 ms  {name:8s} {best_rate(pooled[name]):5.0f} polls/s from the runs' median p99 per rate "
              f"(rate:p99 ms {ladder_text(pooled[name])})")
    pooled_best = {name: best_rate(pooled[name]) for name in at_p99}
    print(f"  mirror / minimal at p99 <= 50 ms, median p99 per rate  "
          f"{pooled_best['mirror'] / pooled_best['minimal'] if pooled_best['minimal'] else float('nan'):.2f}x  "
          f"(target >= 1.4x)")
    print(f"  mirror / forward at p99 <= 50 ms, median p99 per rate  "
          f"{pooled_best['mirror'] / pooled_best['forward'] if pooled_best['forward'] else float('nan'):.2f}x  "
          f"(target >= 3x)")
    ratio = [m / b for m, b in zip(at_p99["mirror"], at_p99["minimal"]) if b] or [float("nan")]
    ratio_fwd = [m / f for m, f in zip(at_p99["mirror"], at_p99["forward"]) if f] or [float("nan")]
    print(f"  mirror / minimal at p99 <= 50 ms, per run  {med_range(ratio, '{:.2f}')}x  (runs where minimal reached "
          f"none left out)")
    print(f"  mirror / forward at p99 <= 50 ms, per run  {med_range(ratio_fwd, '{:.2f}')}x  (runs where forward reached "
          f"none left out)")


if __name__ == "__main__":
    sys.exit(main())
