"""``python -m t2i.scheduler`` as ops run it: config errors, SIGHUP reload, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from support.net import free_port

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


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.load(response)


def wait_for(fn, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


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


def test_sighup_reloads_at_once_and_sigterm_exits_0(tmp_path):
    path, port = write_config(tmp_path, [{"name": "a", "url": "http://127.0.0.1:1"}])
    proc = subprocess.Popen([sys.executable, "-m", "t2i.scheduler", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: get_json(base + "/workers"))
        (tmp_path / "workers.yaml").write_text(yaml.safe_dump({"workers": [
            {"name": "a", "url": "http://127.0.0.1:1"}, {"name": "b", "url": "http://127.0.0.1:2"}]}))
        proc.send_signal(signal.SIGHUP)  # reload_interval is 60 s: only the signal can explain a reload
        wait_for(lambda: len(get_json(base + "/workers")["workers"]) == 2, timeout=3)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 4
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
