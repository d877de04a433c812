"""The ComfyUI test double's control port: its fault knobs over HTTP (t2i/comfy_sim/control.py).

Each route maps to a ComfySim knob; the effects of the knobs themselves are tested in
test_comfy_sim.py. Here: the mapping, the answers (JSON, errors included), and the
command line (``--control-port``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient

from t2i.comfy_sim import ComfySim
from t2i.comfy_sim.control import ControlServer
from test_comfy_sim import Client, sd_workflow, slow_noise, submit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def control(io_loop, tmp_path):
    sim = ComfySim(step_time=0.01, output_dir=str(tmp_path / "output"))
    control = ControlServer(sim)
    io_loop.run_sync(lambda: sim.start(port=0, address="127.0.0.1"))
    io_loop.run_sync(lambda: control.start(0))
    yield control
    io_loop.run_sync(control.stop)
    io_loop.run_sync(sim.stop)


async def ask(control: ControlServer, method: str, path: str, body=None, raw: bytes | None = None):
    """(status, headers, parsed JSON body) of one request to the control port."""
    if method == "POST" and raw is None:
        raw = json.dumps(body if body is not None else {}).encode()
    response = await AsyncHTTPClient().fetch(control.url + path, method=method, body=raw, raise_error=False,
                                             headers={"Content-Type": "application/json"})
    assert response.headers["Content-Type"].startswith("application/json"), response.body
    return response.code, response.headers, json.loads(response.body)


@pytest.mark.gen_test(timeout=30)
async def test_state_shows_knobs_and_queue(control):
    sim = control.sim
    client = await Client.connect(sim)
    running = await submit(sim, slow_noise(steps=200))
    pending = await submit(sim, slow_noise(steps=2, seed=4))
    await client.wait(lambda m: m[0] == "progress" and m[1]["prompt_id"] == running)
    code, _, state = await ask(control, "GET", "/control/state")
    assert code == 200
    assert state["url"] == sim.url and state["running"] is True and state["stall"] is False
    assert state["queue_running"] == [running] and state["queue_pending"] == [pending]
    assert state["websockets"] == 1 and state["submitted"] == 2 and state["number"] == 2
    assert state["pending_failures"] == [] and state["restarts"] == 0


@pytest.mark.gen_test(timeout=30)
async def test_stall_on_and_off(control):
    code, _, state = await ask(control, "POST", "/control/stall", {"on": True})
    assert code == 200 and state["stall"] is True and control.sim.stall is True
    code, _, state = await ask(control, "POST", "/control/stall", {"on": False})
    assert code == 200 and state["stall"] is False and control.sim.stall is False
    for bad in ({}, {"on": "yes"}, {"on": 1}, [True]):
        code, _, answer = await ask(control, "POST", "/control/stall", bad)
        assert code == 400 and answer["error"]
    assert control.sim.stall is False


@pytest.mark.gen_test(timeout=30)
async def test_drop_websockets_aborts_them_and_prompts_go_on(control):
    sim = control.sim
    client = await Client.connect(sim)
    prompt_id = await submit(sim, slow_noise(steps=20))
    await client.wait(lambda m: m[0] == "progress")
    code, _, state = await ask(control, "POST", "/control/drop-websockets")
    assert code == 200 and state["dropped"] == 1 and state["dropped_websockets"] == 1
    await client.task  # the socket ended ...
    assert client.ws.close_code is None  # ... without a close frame
    again = await Client.connect(sim)
    await again.finished(prompt_id)
    assert sim.history[prompt_id]["status"]["status_str"] == "success"


@pytest.mark.gen_test(timeout=30)
async def test_restart_loses_the_queue_on_the_same_port(control):
    sim = control.sim
    client = await Client.connect(sim)
    prompt_id = await submit(sim, slow_noise(steps=200))
    await client.wait(lambda m: m[0] == "progress")
    port = sim.port
    code, _, state = await ask(control, "POST", "/control/restart")
    assert code == 200 and state["restarts"] == 1 and state["running"] is True
    assert sim.port == port and state["queue_running"] == [] and state["history"] == 0 and state["number"] == 0
    await client.task
    assert prompt_id not in sim.history


@pytest.mark.gen_test(timeout=30)
async def test_stop_refuses_connections_until_start(control):
    sim = control.sim
    url = sim.url
    code, _, state = await ask(control, "POST", "/control/stop")
    assert code == 200 and state["running"] is False
    with pytest.raises(ConnectionRefusedError):
        await AsyncHTTPClient().fetch(url + "/queue")
    code, _, state = await ask(control, "POST", "/control/start")
    assert code == 200 and state["running"] is True and state["url"] == url
    code, _, answer = await ask(control, "POST", "/control/start")
    assert code == 409 and "already running" in answer["error"]
    assert (await AsyncHTTPClient().fetch(url + "/queue")).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_fail_next_makes_the_next_node_raise(control):
    sim = control.sim
    code, _, state = await ask(control, "POST", "/control/fail-next",
                               {"message": "CUDA out of memory", "after_steps": 1})
    assert code == 200 and state["pending_failures"] == [
        {"node_type": "KSampler", "message": "CUDA out of memory", "exception_type": "RuntimeError",
         "after_steps": 1}]
    client = await Client.connect(sim)
    prompt_id = await submit(sim, sd_workflow(steps=3))
    await client.finished(prompt_id)
    assert client.of("execution_error")[0]["exception_message"] == "CUDA out of memory\n"
    assert (await ask(control, "GET", "/control/state"))[2]["pending_failures"] == []
    for bad in ({"node": "KSampler"}, {"after_steps": -1}, {"after_steps": True}, {"message": 3}):
        code, _, answer = await ask(control, "POST", "/control/fail-next", bad)
        assert code == 400 and answer["error"], bad
    assert sim.pending_failures == []


@pytest.mark.gen_test(timeout=30)
async def test_errors_are_json(control):
    code, _, answer = await ask(control, "POST", "/control/stall", raw=b"{nope")
    assert code == 400 and "JSON" in answer["error"]
    code, _, answer = await ask(control, "POST", "/control/stall", raw=b"[" * 5000)
    assert code == 400
    code, _, answer = await ask(control, "GET", "/control/nothing")
    assert code == 404 and answer["error"]
    code, _, answer = await ask(control, "GET", "/prompt")  # ComfyUI's routes are not on this port
    assert code == 404
    code, headers, answer = await ask(control, "GET", "/control/restart")
    assert code == 405 and headers["Allow"] == "POST" and answer["error"]
    code, headers, answer = await ask(control, "POST", "/control/state")
    assert code == 405 and headers["Allow"] == "GET"


def test_command_line_control_port(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(tmp_path / "log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "t2i.comfy_sim", "--port", "0", "--control-port", "0",
                                    "--step-time", "0.01", "--output-dir", str(tmp_path / "output")],
                                   env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        first, second = process.stdout.readline(), process.stdout.readline()
        assert "ComfyUI test double at http://127.0.0.1:" in first, (tmp_path / "log").read_text()
        assert "control API at http://127.0.0.1:" in second, second
        control = second.split(" at ", 1)[1].split()[0].rsplit("/control/", 1)[0]

        def post(path: str, body: dict) -> dict:
            request = urllib.request.Request(control + path, data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(request, timeout=10).read())

        assert post("/control/stall", {"on": True})["stall"] is True
        assert post("/control/restart", {})["restarts"] == 1
        state = json.loads(urllib.request.urlopen(control + "/control/state", timeout=10).read())
        assert state["stall"] is True and state["running"] is True  # a restart keeps the knobs
        with pytest.raises(urllib.error.HTTPError) as refused:
            post("/control/fail-next", {"after_steps": "two"})
        assert refused.value.code == 400
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
