"""``python -m t2i.scheduler`` as ops run it: config errors, SIGHUP reload, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from support.cluster import start_sim, start_worker
from support.net import free_port
from support.timing import until
from t2i.httpclient import UpstreamUnavailable, fetch_json

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2i.scheduler", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def write_config(tmp_path: Path, workers: list[dict], **overrides) -> tuple[Path, int]:
    port = free_port()
    (tmp_path / "workers.yaml").write_text(yaml.safe_dump({"workers": workers}))
    config = {"listen": f"127.0.0.1:{port}", "workers_file": "workers.yaml", "reload_interval": 60,
              "health_interval": 60, **overrides}
    path = tmp_path / "scheduler.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [oops\n")
    result = run("--config", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml:" in lines[0], result.stderr
    path, _ = write_config(tmp_path, [{"name": "a", "url": "http://127.0.0.1:1"},
                                      {"name": "a", "url": "http://127.0.0.1:2"}])
    result = run("--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "workers.yaml:" in lines[0] and "duplicate" in lines[0], result.stderr


@pytest.mark.parametrize("http_client", ["simple", "curl"])
@pytest.mark.gen_test(timeout=45)
async def test_sighup_reloads_at_once_and_sigterm_exits_0(tmp_path, http_client):
    """With a live worker, so SIGTERM lands while the job feed's long-poll is in flight
    (and a health check of an unreachable worker), with either HTTP client."""
    if http_client == "curl":
        pytest.importorskip("pycurl")
    sim = await start_sim(step_time=0.01)
    worker = await start_worker(tmp_path / "w", sim.url, name="gpu-a")
    path, port = write_config(tmp_path, [{"name": "gpu-a", "url": worker.url}])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "t2i.scheduler", "--config", str(path), "--http-client", http_client, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        async def workers():
            try:
                response = await fetch_json(base + "/workers", connect_timeout=1, request_timeout=2)
            except UpstreamUnavailable:
                return None
            return response.body["workers"]

        await until(lambda: _feed_up(workers), 20, what="feed up")  # a loaded 2-core box starts Python slowly
        (tmp_path / "workers.yaml").write_text(yaml.safe_dump({"workers": [
            {"name": "gpu-a", "url": worker.url}, {"name": "b", "url": "http://127.0.0.1:2"}]}))
        proc.send_signal(signal.SIGHUP)  # reload_interval is 60 s: only the signal can explain a reload

        async def two():
            return len(await workers() or ()) == 2

        await until(two, 5, what="two workers after the reload")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
        assert time.monotonic() - started < 5
        assert b"Traceback" not in stderr and b"ERROR" not in stderr, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await worker.stop()
        await sim.stop()


async def _feed_up(workers) -> bool:
    listed = await workers()
    return bool(listed) and listed[0]["feed"]["state"] == "up"


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_while_starting_with_a_thousand_silent_workers_exits_0(tmp_path):
    """A thousand workers that take connections and never answer: start-up waits for them a bounded
    time, and SIGTERM meanwhile stops the scheduler at once, with no traceback."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader, writer):
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0, backlog=2048)
    port = server.sockets[0].getsockname()[1]
    workers = [{"name": f"w{i:04d}", "url": f"http://127.0.0.1:{port}"} for i in range(1000)]
    path, _ = write_config(tmp_path, workers)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "t2i.scheduler", "--config", str(path), "--log-level", "info", cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        lines = []
        while not any(b"starting with 1000 workers" in line for line in lines):
            line = await proc.stderr.readline()
            assert line, b"".join(lines).decode()
            lines.append(line)
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
        stderr = (b"".join(lines) + rest).decode()
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
        assert "shutting down while starting" in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for writer in held:
            writer.close()
        server.close()
