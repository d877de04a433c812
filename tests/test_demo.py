"""The newcomer's path: `python -m t2i.demo` starts, makes an image, stops cleanly."""

import configparser
import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
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


# --- smaller things a newcomer or an operator trips over (issue 11) ---------------------------

@pytest.mark.gen_test(timeout=30)
async def test_images_are_readable_by_a_reverse_proxy(tmp_path):
    from t2i.worker.images import ImageStore

    store = ImageStore(tmp_path)
    name = await store.save(ImageStore.filename_for(str(uuid.uuid4()), 0), b"\x89PNG\r\n\x1a\n")
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


@pytest.mark.gen_test(timeout=30)
async def test_width_the_latent_would_round_is_refused_naming_the_field(tmp_path):
    from support.cluster import WorkerCluster

    async with WorkerCluster(tmp_path) as c:
        refused = await c.generate({"prompt": "a fox", "width": 100})
        assert refused.code == 400 and refused.json["field"] == "width", refused
        assert "multiple of 8" in refused.json["error"] and "96" in refused.json["error"]
        refused = await c.generate({"prompt": "a fox", "height": 516})
        assert refused.code == 400 and refused.json["field"] == "height", refused
        assert (await c.generate({"prompt": "a fox", "width": 104, "height": 64, "steps": 1})).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_the_scheduler_logs_each_placement_with_job_and_worker(tmp_path, caplog):
    from support.cluster import SchedulerCluster, call

    caplog.set_level(logging.INFO, logger="t2i.scheduler")
    async with SchedulerCluster(tmp_path, n=1) as c:
        placed = await call("POST", c.scheduler.url + "/generate", {"prompt": "a fox", "steps": 1})
        assert placed.code == 200, placed
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"placed job {placed.json['prompt_id']} on worker gpu-0 for client anon:127.0.0.1" in lines, lines


def test_the_comfyui_double_removes_the_temp_folder_it_made():
    from t2i.comfy_sim import ComfySim

    sim = ComfySim()
    made = Path(sim.output_dir).parent
    assert made.is_dir() and made.name.startswith("comfy-sim-")
    del sim
    gc.collect()
    assert not made.exists()
    # The standalone double, stopped as systemd or Ctrl-C stops it.
    process = subprocess.Popen([sys.executable, "-m", "t2i.comfy_sim", "--port", "0", "--log-level", "warning"],
                               stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        output = Path(re.search(r"\(output (\S+)\)", line).group(1))
        assert output.is_dir(), line
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        process.stdout.close()
    assert not output.parent.exists()
