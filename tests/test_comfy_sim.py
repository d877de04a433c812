"""The ComfyUI test double's own knobs and its SD1.5 node set (the recordings cover the protocol).

stop/restart, drop_websockets, fail_next, stall, previews, PNG files, the
CheckpointLoaderSimple -> KSampler -> SaveImage template t2i ships, the CSRF
rule, and the standalone command.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from t2i.comfy_sim import ComfySim
from t2i.comfy_sim.imaging import png_chunks

ROOT = Path(__file__).resolve().parent.parent
RECORDINGS = Path(__file__).resolve().parent / "recordings"
TEMPLATE = ROOT / "t2i" / "workflows" / "txt2img.json"


def sd_workflow(text="a red fox in the snow", seed=42, steps=4, width=64, height=48, batch=1, prefix="t2i",
                negative="blurry", ckpt="v1-5-pruned-emaonly.safetensors"):
    workflow = json.loads(TEMPLATE.read_text())
    workflow["3"]["inputs"].update(seed=seed, steps=steps)
    workflow["4"]["inputs"]["ckpt_name"] = ckpt
    workflow["5"]["inputs"].update(width=width, height=height, batch_size=batch)
    workflow["6"]["inputs"]["text"] = text
    workflow["7"]["inputs"]["text"] = negative
    workflow["9"]["inputs"]["filename_prefix"] = prefix
    return workflow


def slow_noise(steps=40, step_seconds=0.02, seed=3, **extra):
    workflow = json.loads((RECORDINGS / "workflow_slow_noise.json").read_text())
    workflow["1"]["inputs"].update(steps=steps, step_seconds=step_seconds, seed=seed, **extra)
    return workflow


class Client:
    """A websocket client that records every frame: (type, data) for text, ("binary", bytes) for binary."""

    def __init__(self, ws):
        self.ws, self.messages = ws, []
        self.task = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, sim: ComfySim, client_id: str | None = "t", flags: bool = False) -> "Client":
        query = f"?clientId={client_id}" if client_id else ""
        client = cls(await websocket_connect(sim.url.replace("http", "ws") + "/ws" + query))
        if flags:
            await client.ws.write_message(json.dumps({"type": "feature_flags",
                                                      "data": {"supports_preview_metadata": True}}))
        await client.wait(lambda m: m[0] == "status")
        return client

    async def _read(self):
        while True:
            message = await self.ws.read_message()
            if message is None:
                return
            if isinstance(message, bytes):
                self.messages.append(("binary", message))
            else:
                parsed = json.loads(message)
                self.messages.append((parsed["type"], parsed["data"]))

    def types(self) -> list[str]:
        return [t if t != "binary" else f"binary{struct.unpack('>I', d[:4])[0]}" for t, d in self.messages]

    def of(self, kind: str) -> list:
        return [d for t, d in self.messages if t == kind]

    async def wait(self, predicate, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if predicate(message):
                    return message
            if self.task.done() or time.monotonic() > deadline:
                raise AssertionError(f"not received; got {self.types()}")
            await asyncio.sleep(0.005)

    async def finished(self, prompt_id: str, timeout: float = 10.0):
        return await self.wait(lambda m: m[0] == "executing" and m[1].get("node") is None
                               and m[1].get("prompt_id") == prompt_id, timeout)


async def post(sim: ComfySim, path: str, body, expect: int = 200):
    response = await AsyncHTTPClient().fetch(sim.url + path, method="POST", raise_error=False,
                                             body=body if isinstance(body, str) else json.dumps(body))
    assert response.code == expect, (response.code, response.body)
    return json.loads(response.body) if response.body and response.headers.get(
        "Content-Type", "").startswith("application/json") else response.body


async def get(sim: ComfySim, path: str, expect: int = 200):
    response = await AsyncHTTPClient().fetch(sim.url + path, raise_error=False)
    assert response.code == expect, (response.code, response.body)
    return response


async def submit(sim: ComfySim, workflow: dict, client_id: str | None = "t", **extra) -> str:
    body = {"prompt": workflow, **extra}
    if client_id:
        body["client_id"] = client_id
    return (await post(sim, "/prompt", body))["prompt_id"]


@pytest.fixture
def sim(io_loop, tmp_path):
    sim = ComfySim(step_time=0.01, output_dir=str(tmp_path / "output"))
    io_loop.run_sync(lambda: sim.start(port=0, address="127.0.0.1"))
    yield sim
    io_loop.run_sync(sim.stop)


# --------------------------------------------------------------------------- stop / restart

@pytest.mark.gen_test(timeout=30)
async def test_stop_drops_sockets_without_close_frame_and_refuses_connections(sim):
    client = await Client.connect(sim)
    await submit(sim, slow_noise())
    await client.wait(lambda m: m[0] == "progress")
    url, port = sim.url, sim.port
    await sim.stop()
    await asyncio.wait_for(client.task, 5)
    assert client.ws.close_code is None  # no close frame, like a killed ComfyUI
    with pytest.raises(ConnectionRefusedError):
        await AsyncHTTPClient().fetch(url + "/queue")
    with pytest.raises(ConnectionRefusedError):
        await websocket_connect(url.replace("http", "ws") + "/ws")
    await sim.start(port=port)  # the same port again
    assert sim.url == url
    assert json.loads((await get(sim, "/queue")).body) == {"queue_running": [], "queue_pending": []}


@pytest.mark.gen_test(timeout=30)
async def test_restart_loses_queue_and_history_resets_number_keeps_file_counter(sim):
    client = await Client.connect(sim)
    first = await submit(sim, slow_noise(steps=2, step_seconds=0.01))
    await client.finished(first)
    assert sim.history[first]["outputs"]["2"]["images"][0]["filename"] == "t2i_00001_.png"
    running = await submit(sim, slow_noise(steps=200, seed=9))
    pending = await submit(sim, slow_noise(steps=5, seed=10))
    await client.wait(lambda m: m[0] == "progress" and m[1]["prompt_id"] == running)
    assert sim.number == 3 and len(sim.queue_pending) == 1 and len(sim.queue_running) == 1
    port = sim.port
    await sim.restart()
    assert sim.port == port
    await asyncio.wait_for(client.task, 5)
    assert client.ws.close_code is None
    assert json.loads((await get(sim, "/history")).body) == {}
    for prompt_id in (first, running, pending):
        assert json.loads((await get(sim, f"/history/{prompt_id}")).body) == {}
    assert sim.history == {} and sim.queue_pending == [] and sim.queue_running == []

    client = await Client.connect(sim)
    answer = await post(sim, "/prompt", {"prompt": slow_noise(steps=2, step_seconds=0.01), "client_id": "t"})
    assert answer["number"] == 0
    await client.finished(answer["prompt_id"])
    assert client.of("execution_cached")[-1]["nodes"] == []  # the cache is cold after a restart
    assert sim.history[answer["prompt_id"]]["outputs"]["2"]["images"][0]["filename"] == "t2i_00002_.png"


@pytest.mark.gen_test(timeout=30)
async def test_drop_websockets_mid_run_prompt_still_completes(sim):
    client = await Client.connect(sim)
    prompt_id = await submit(sim, slow_noise(steps=30))
    await client.wait(lambda m: m[0] == "progress")
    sim.drop_websockets()
    await asyncio.wait_for(client.task, 5)
    assert client.ws.close_code is None
    again = await Client.connect(sim)  # the server kept running; the resync executing has no prompt_id
    assert again.messages[1] == ("executing", {"node": "1"})
    await again.finished(prompt_id)
    assert sim.history[prompt_id]["status"]["status_str"] == "success"
    values = [d["value"] for d in again.of("progress")]
    assert values and values[0] > 1 and values[-1] == 30


# --------------------------------------------------------------------------- fail_next, stall, interrupt

@pytest.mark.gen_test(timeout=30)
async def test_fail_next_reports_execution_error_once(sim):
    client = await Client.connect(sim)
    sim.fail_next(node_type="KSampler", message="CUDA out of memory")
    prompt_id = await submit(sim, sd_workflow())
    await client.finished(prompt_id)
    error = client.of("execution_error")[0]
    assert error["node_id"] == "3" and error["node_type"] == "KSampler"
    assert error["exception_message"] == "CUDA out of memory\n"
    assert error["exception_type"] == "RuntimeError"
    assert error["traceback"] and all(isinstance(line, str) for line in error["traceback"])
    assert error["executed"] == ["4", "5", "7", "6"] and error["current_outputs"] == list(sd_workflow())
    assert error["current_inputs"]["seed"] == [42] and error["current_inputs"]["model"][0].startswith("<comfy.")
    assert client.of("progress") == [] and "execution_success" not in client.types()
    entry = sim.history[prompt_id]
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_error" and entry["outputs"] == {}

    again = await submit(sim, sd_workflow())  # one-shot; the failed KSampler was not cached
    await client.finished(again)
    assert client.of("execution_cached")[-1]["nodes"] == ["4", "5", "6", "7"]
    assert sim.history[again]["status"]["status_str"] == "success"
    assert [d["value"] for d in client.of("progress")] == [1, 2, 3, 4]


@pytest.mark.gen_test(timeout=30)
async def test_fail_next_after_steps(sim):
    client = await Client.connect(sim)
    sim.fail_next(node_type="KSampler", message="boom", exception_type="torch.OutOfMemoryError", after_steps=2)
    prompt_id = await submit(sim, sd_workflow(steps=5))
    await client.finished(prompt_id)
    assert [d["value"] for d in client.of("progress")] == [1, 2]
    assert client.of("execution_error")[0]["exception_type"] == "torch.OutOfMemoryError"


@pytest.mark.gen_test(timeout=30)
async def test_stall_freezes_silently_until_released(sim):
    client = await Client.connect(sim)
    prompt_id = await submit(sim, sd_workflow(steps=6))
    await client.wait(lambda m: m[0] == "progress" and m[1]["value"] == 2)
    sim.stall = True
    count = -1
    while count != len(client.messages):  # the step already under way may still finish
        count = len(client.messages)
        await asyncio.sleep(0.1)
    assert len(client.of("progress")) <= 3
    await asyncio.sleep(0.4)
    assert len(client.messages) == count  # then nothing at all while stalled
    assert sim.queue_running[0][1] == prompt_id
    sim.stall = False
    await client.finished(prompt_id)
    assert sim.history[prompt_id]["status"]["completed"] is True


@pytest.mark.gen_test(timeout=30)
async def test_interrupts_and_submissions_are_recorded(sim):
    client = await Client.connect(sim)
    prompt_id = await submit(sim, sd_workflow(steps=50))
    await client.wait(lambda m: m[0] == "progress")
    await post(sim, "/interrupt", {"prompt_id": "not-running"})
    await post(sim, "/interrupt", {"prompt_id": prompt_id})
    await client.finished(prompt_id)
    await post(sim, "/interrupt", "")
    assert sim.interrupts == [{"prompt_id": "not-running"}, {"prompt_id": prompt_id}, None]
    assert client.of("execution_interrupted")[0]["node_id"] == "3"
    assert sim.submitted == [(prompt_id, sd_workflow(steps=50), {"client_id": "t"})]


# --------------------------------------------------------------------------- previews

@pytest.mark.gen_test(timeout=30)
async def test_sampler_previews_only_when_enabled(tmp_path):
    sim = ComfySim(step_time=0.01, output_dir=str(tmp_path), previews=True)
    await sim.start()
    try:
        for seed, (name, flags) in enumerate((("modern", True), ("legacy", False))):
            client = await Client.connect(sim, name, flags=flags)
            prompt_id = await submit(sim, sd_workflow(steps=3, seed=seed), client_id=name)
            await client.finished(prompt_id)
            sampling = [t for t in client.types() if t in ("progress", "binary1", "binary4")]
            frame = client.of("binary")[0]
            if flags:
                assert sampling == ["binary4", "progress"] * 3  # metadata previews come before progress
                (length,) = struct.unpack(">I", frame[4:8])
                meta = json.loads(frame[8:8 + length])
                assert meta == {"node_id": "3", "prompt_id": prompt_id, "display_node_id": "3",
                                "parent_node_id": None, "real_node_id": "3", "image_type": "image/jpeg"}
                jpeg = frame[8 + length:]
            else:
                assert sampling == ["progress", "binary1"] * 3  # legacy previews come after progress
                assert struct.unpack(">II", frame[:8]) == (1, 1)
                jpeg = frame[8:]
            assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
            sof = jpeg.index(b"\xff\xc0")  # latent-sized preview: 64x48 image -> 8x6
            assert struct.unpack(">HH", jpeg[sof + 5:sof + 9]) == (6, 8)
    finally:
        await sim.stop()


@pytest.mark.gen_test(timeout=30)
async def test_no_previews_by_default(sim):
    client = await Client.connect(sim, flags=True)
    prompt_id = await submit(sim, sd_workflow(steps=3))
    await client.finished(prompt_id)
    assert not [t for t in client.types() if t.startswith("binary")]


# --------------------------------------------------------------------------- SD1.5 template and PNGs

def parse_png(data: bytes) -> dict:
    chunks = png_chunks(data)
    assert chunks and all(ok for _, _, ok in chunks), "bad PNG CRC"
    assert [k for k, _, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    raw = zlib.decompress(b"".join(p for k, p, _ in chunks if k == b"IDAT"))
    assert depth == 8 and color == 2 and len(raw) == height * (1 + 3 * width)
    text = dict(p.split(b"\0", 1) for k, p, _ in chunks if k == b"tEXt")
    return {"size": (width, height), "raw": raw, "text": {k.decode(): v.decode() for k, v in text.items()},
            "chunks": [k.decode() for k, _, _ in chunks]}


@pytest.mark.gen_test(timeout=30)
async def test_sd15_template_runs_like_comfyui(sim):
    client = await Client.connect(sim)
    workflow = sd_workflow(steps=5, width=96, height=64)
    prompt_id = await submit(sim, workflow)
    await client.finished(prompt_id)
    # ExecutionList order (output-first heuristics of comfy_execution/graph.py), one progress per step.
    assert [d["node"] for d in client.of("executing")][:-1] == ["4", "5", "7", "6", "3", "8", "9"]
    assert [(d["value"], d["max"], d["node"]) for d in client.of("progress")] == [(i, 5, "3") for i in range(1, 6)]
    image = client.of("executed")[0]["output"]["images"][0]
    assert image == {"filename": "t2i_00001_.png", "subfolder": "", "type": "output"}
    response = await get(sim, "/view?filename=t2i_00001_.png&subfolder=&type=output")
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["Content-Disposition"] == 'filename="t2i_00001_.png"'
    png = parse_png(response.body)
    assert png["size"] == (96, 64) and png["chunks"] == ["IHDR", "tEXt", "IDAT", "IEND"]
    assert json.loads(png["text"]["prompt"]) == workflow
    assert (Path(sim.output_dir) / "t2i_00001_.png").read_bytes() == response.body
    preview = await get(sim, "/view?filename=t2i_00001_.png&type=output&preview=jpeg;80")
    assert preview.headers["Content-Type"] == "image/jpeg" and preview.body[:4] == b"\xff\xd8\xff\xe0"

    # Identical again: everything cached, the old file reported, nothing written.
    again = await submit(sim, workflow)
    await client.finished(again)
    assert client.of("execution_cached")[-1]["nodes"] == ["3", "4", "5", "6", "7", "8", "9"]
    assert client.of("executed")[-1]["output"]["images"][0]["filename"] == "t2i_00001_.png"
    assert sorted(os.listdir(sim.output_dir)) == ["t2i_00001_.png"]


@pytest.mark.gen_test(timeout=30)
async def test_pictures_depend_on_prompt_and_seed(sim):
    client = await Client.connect(sim)
    raws = {}
    for key, (text, seed) in {"fox": ("a fox", 1), "fox again": ("a fox", 1), "cat": ("a cat", 1),
                              "fox seed 2": ("a fox", 2)}.items():
        prompt_id = await submit(sim, sd_workflow(text=text, seed=seed, steps=1, prefix=f"t2i_{len(raws)}"))
        await client.finished(prompt_id)
        name = sim.history[prompt_id]["outputs"]["9"]["images"][0]["filename"]
        raws[key] = parse_png((Path(sim.output_dir) / name).read_bytes())["raw"]
    assert raws["fox"] == raws["fox again"]
    assert len({raws["fox"], raws["cat"], raws["fox seed 2"]}) == 3


@pytest.mark.gen_test(timeout=30)
async def test_batch_and_subfolder(sim):
    client = await Client.connect(sim)
    prompt_id = await submit(sim, sd_workflow(steps=1, batch=2, prefix="jobs/run_a/img"))
    await client.finished(prompt_id)
    images = sim.history[prompt_id]["outputs"]["9"]["images"]
    assert images == [{"filename": "img_00001_.png", "subfolder": "jobs/run_a", "type": "output"},
                      {"filename": "img_00002_.png", "subfolder": "jobs/run_a", "type": "output"}]
    await get(sim, "/view?filename=img_00002_.png&subfolder=jobs/run_a&type=output")
    await get(sim, "/view?filename=img_00002_.png&subfolder=../..&type=output", expect=403)
    await get(sim, "/view?filename=/etc/passwd&type=output", expect=400)
    await get(sim, "/api/view?filename=img_00002_.png&subfolder=jobs/run_a&type=temp", expect=404)


@pytest.mark.gen_test(timeout=30)
async def test_large_image_is_rendered_off_the_event_loop(tmp_path, monkeypatch):
    import threading

    from t2i.comfy_sim import imaging, nodes

    threads = []

    def spy(original):
        def wrapper(*args, **kwargs):
            threads.append(threading.current_thread())
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(nodes, "encode_png", spy(imaging.encode_png))
    monkeypatch.setattr(nodes, "encode_jpeg", spy(imaging.encode_jpeg))
    sim = ComfySim(step_time=0, output_dir=str(tmp_path), previews=True)
    await sim.start()
    try:
        client = await Client.connect(sim)
        started = time.monotonic()
        prompt_id = await submit(sim, sd_workflow(steps=2, width=1024, height=1024))
        await client.finished(prompt_id)
        assert time.monotonic() - started < 10
        assert parse_png((Path(sim.output_dir) / "t2i_00001_.png").read_bytes())["size"] == (1024, 1024)
    finally:
        await sim.stop()
    assert len(threads) == 3 and threading.main_thread() not in threads  # 2 previews + the PNG, all off the loop


# --------------------------------------------------------------------------- validation of the SD nodes

@pytest.mark.gen_test(timeout=30)
async def test_sd15_validation_errors(sim):
    answer = await post(sim, "/prompt", {"prompt": sd_workflow(ckpt="sdxl.safetensors")}, expect=400)
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    assert answer["node_errors"] == {"4": {"errors": [{
        "type": "value_not_in_list", "message": "Value not in list",
        "details": "ckpt_name: 'sdxl.safetensors' not in ['v1-5-pruned-emaonly.safetensors']",
        "extra_info": {"input_name": "ckpt_name", "received_value": "sdxl.safetensors", "input_config": [
            ["v1-5-pruned-emaonly.safetensors"], {"tooltip": "The name of the checkpoint (model) to load."}]}}],
        "dependent_outputs": ["9"], "class_type": "CheckpointLoaderSimple"}}

    def errors_of(answer):
        return [(node, e["type"], e["details"]) for node, v in answer["node_errors"].items() for e in v["errors"]]

    workflow = sd_workflow()
    workflow["3"]["inputs"].update(steps=0, sampler_name="nope")
    workflow["5"]["inputs"]["width"] = 20000
    answer = await post(sim, "/prompt", {"prompt": workflow}, expect=400)
    assert sorted(errors_of(answer)) == [("3", "value_not_in_list", "sampler_name: 'nope' not in (list of length 42)"),
                                         ("3", "value_smaller_than_min", "steps"),
                                         ("5", "value_bigger_than_max", "width")]

    workflow = sd_workflow()
    workflow["9"]["inputs"]["images"] = ["6", 0]
    answer = await post(sim, "/prompt", {"prompt": workflow}, expect=400)
    assert errors_of(answer) == [("9", "return_type_mismatch",
                                  "images, received_type(CONDITIONING) mismatch input_type(IMAGE)")]
    workflow["9"]["inputs"]["images"] = ["8"]
    answer = await post(sim, "/prompt", {"prompt": workflow}, expect=400)
    assert errors_of(answer) == [("9", "bad_linked_input", "images")]
    workflow = sd_workflow()
    del workflow["6"]["inputs"]["clip"]
    answer = await post(sim, "/prompt", {"prompt": workflow}, expect=400)
    assert errors_of(answer) == [("6", "required_input_missing", "clip")]
    assert answer["error"]["details"] == ""  # the fault is upstream of the output node
    assert sim.number == 5 and sim.submitted == []


@pytest.mark.gen_test(timeout=30)
async def test_object_info_and_api_prefix(sim):
    everything = json.loads((await get(sim, "/api/object_info")).body)
    assert {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage",
            "EmptyImage", "SlowNoiseImage"} <= set(everything)
    ksampler = json.loads((await get(sim, "/object_info/KSampler")).body)["KSampler"]
    assert ksampler["input_order"]["required"][:3] == ["model", "seed", "steps"]
    assert ksampler["output"] == ["LATENT"] and ksampler["output_node"] is False
    ws = await websocket_connect(sim.url.replace("http", "ws") + "/api/ws?clientId=x")
    assert json.loads(await ws.read_message())["data"]["sid"] == "x"
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_csrf_rule(sim):
    host = f"127.0.0.1:{sim.port}"
    for origin, code in (("http://evil.example", 403), (f"http://{host}", 200)):
        request = HTTPRequest(sim.url + "/queue", headers={"Host": host, "Origin": origin})
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        assert response.code == code


@pytest.mark.gen_test(timeout=30)
async def test_free_memory_empties_the_cache(sim):
    client = await Client.connect(sim)
    first = await submit(sim, sd_workflow(steps=1))
    await client.finished(first)
    await post(sim, "/free", {"free_memory": True})
    second = await submit(sim, sd_workflow(steps=1))
    await client.finished(second)
    assert client.of("execution_cached")[-1]["nodes"] == []


# --------------------------------------------------------------------------- standalone

def test_standalone_command_serves_until_sigterm(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "t2i.comfy_sim", "--port", str(port), "--step-time", "0.01",
                                "--output-dir", str(tmp_path)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        line = process.stdout.readline().decode()
        assert f"http://127.0.0.1:{port}" in line, line
        import urllib.request

        stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=5).read())
        assert stats["system"]["comfyui_version"] == "0.3.64"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    help_text = subprocess.run([sys.executable, "-m", "t2i.comfy_sim", "--help"], env=env, capture_output=True,
                               text=True, timeout=30).stdout
    assert "--step-time" in help_text and "--port" in help_text


def test_a_run_of_steps_lasts_what_step_time_says_when_timers_fire_late(monkeypatch):
    """Each sleep ends 2 ms late (a busy loop): the lateness is taken off the next step, so ten
    20 ms steps take 200 ms (+ the last step's lateness), not 220 ms: the double runs at the speed
    it is given, as a GPU does, and a bench's lower bound means what it says."""
    from types import SimpleNamespace

    from t2i.comfy_sim import engine

    clock = SimpleNamespace(now=0.0)
    fake_loop = SimpleNamespace(time=lambda: clock.now)

    async def late_sleep(seconds):
        clock.now += seconds + (0.002 if seconds > 0 else 0.0)

    async def unstalled():
        return None

    monkeypatch.setattr(engine, "asyncio", SimpleNamespace(sleep=late_sleep, get_running_loop=lambda: fake_loop))
    ctx = object.__new__(engine.NodeContext)
    ctx.executor = SimpleNamespace(wait_unstalled=unstalled)
    ctx._late = 0.0

    async def ten_steps():
        for _ in range(10):
            await ctx.step(0.02)

    asyncio.run(ten_steps())
    assert clock.now == pytest.approx(0.202)
