"""The newcomer's path: `python -m t2i.demo` starts, makes an image, stops cleanly."""

import configparser
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support.net import free_port


def _get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def _post_json(url, body, timeout=5):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# --host: another loopback address than the default, so the test sees it is used everywhere.
HOST = "127.0.0.2"


@pytest.fixture
def demo(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "t2i.demo", "--host", HOST, "--port", str(port), "--step-time", "0.02",
         "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert f"http://{HOST}:{port}/" in line, (line, process.stderr.read() if process.poll() else "")
        yield f"http://{HOST}:{port}", process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_demo_generates_an_image_and_stops_on_ctrl_c(demo):
    base, process = demo
    # The page is served.
    status, headers, body = _get(base + "/")
    assert status == 200 and b"<html" in body.lower()
    # Workers register with the scheduler within a health interval or two.
    deadline = time.monotonic() + 15
    while True:
        status, submitted = _post_json(base + "/generate", {"prompt": "a red fox in snow", "steps": 5})
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200, submitted
    assert submitted["worker"].startswith("sim-gpu-")
    deadline = time.monotonic() + 20
    while True:
        _, _, body = _get(base + submitted["status_url"])
        state = json.loads(body)
        if state["status"] in ("completed", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state["status"] == "completed", state
    assert state["image_url"].startswith(f"http://{HOST}:"), state  # the workers listen on --host too
    status, headers, image = _get(state["image_url"])
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert image.startswith(b"\x89PNG\r\n\x1a\n")
    status, _, body = _get(base + "/result/" + submitted["prompt_id"])
    assert status == 200 and json.loads(body)["image_url"] == state["image_url"]
    # The page's banner: the demo says its backend is simulated.
    _, _, body = _get(base + "/health")
    assert json.loads(body)["simulated"] is True
    # Metrics and the API description on the scheduler.
    status, _, body = _get(base + "/metrics")
    assert status == 200 and b"t2i_scheduler_routed_total" in body
    status, _, body = _get(base + "/openapi.json")
    assert status == 200 and json.loads(body)["openapi"].startswith("3.")

    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=10) == 0


def test_demo_help_explains_every_flag():
    output = subprocess.run([sys.executable, "-m", "t2i.demo", "--help"], capture_output=True, text=True,
                            check=True).stdout
    for flag in ("--workers", "--step-time", "--port", "--host", "--log-level", "--version", "--data-dir"):
        assert flag in output


def test_a_port_in_use_is_named_before_anything_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "t2i.demo", "--port", str(port), "--data-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    assert f"port {port}" in result.stderr and "--port" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was started or written


def test_pytest_says_why_tests_are_skipped():
    ini = configparser.ConfigParser()
    ini.read(Path(__file__).resolve().parents[1] / "pytest.ini")
    assert "-rs" in ini["pytest"]["addopts"].split()
