"""Reading ComfyUI's shapes (t2i.comfyui), with bodies as recorded from ComfyUI 0.3.64."""

import json
import struct

from t2i.comfyui import (ImageRef, describe_rejection, error_sentence, images_of, outcome_of, parse_binary,
                         parse_queue, rejection_from)

PID = "ddfbed00-5cc2-45a6-b1af-59acf0c9a258"


def test_execution_error_sentence_strips_and_names_the_node():
    data = {"prompt_id": PID, "node_id": "1", "node_type": "SlowNoiseImage",
            "exception_message": "SlowNoiseImage asked to fail (fail=true) at step 3/5\n",
            "exception_type": "/opt/ComfyUI/custom_nodes/t2i_test_nodes.T2ITestFailure"}
    assert error_sentence(data) == "SlowNoiseImage failed: SlowNoiseImage asked to fail (fail=true) at step 3/5"
    assert error_sentence({"node_type": "KSampler", "exception_message": "CUDA out of memory\n"}) == \
        "KSampler failed: CUDA out of memory"


def test_outcome_of_history_entries():
    success = {"outputs": {"9": {"images": [{"filename": "t2i_00001_.png", "subfolder": "", "type": "output"}]},
                           "10": {"images": [{"filename": "prev.png", "subfolder": "", "type": "temp"}]}},
               "status": {"status_str": "success", "completed": True,
                          "messages": [["execution_start", {}], ["execution_cached", {"nodes": []}],
                                       ["execution_success", {}]]}}
    outcome = outcome_of(success)
    assert outcome.status == "success" and outcome.images == [ImageRef("t2i_00001_.png", "", "output")]
    failed = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {}],
        ["execution_error", {"node_type": "SlowNoiseImage", "exception_message": "asked to fail\n"}]]}}
    assert outcome_of(failed).status == "error" and outcome_of(failed).error == "SlowNoiseImage failed: asked to fail"
    interrupted = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {}], ["execution_interrupted", {"node_type": "SlowNoiseImage"}]]}}
    assert outcome_of(interrupted).status == "interrupted"


def test_images_of_an_executed_output_and_node_order():
    assert images_of({"images": [{"filename": "a.png", "subfolder": "s", "type": "output"}]}) == [
        ImageRef("a.png", "s", "output")]
    outputs = {"10": {"images": [{"filename": "b.png"}]}, "9": {"images": [{"filename": "a.png"}]},
               "11": {"text": ["hello"]}}
    assert [ref.filename for ref in images_of(outputs)] == ["a.png", "b.png"]
    assert images_of(None) == [] and images_of({}) == []


def test_queue_pending_is_sorted_by_number_not_heap_order():
    body = {"queue_running": [[18, "run", {}, {}, ["9"]]],
            "queue_pending": [[21, "c", {}, {}, []], [19, "a", {}, {}, []], [20, "b", {}, {}, []]]}
    queue = parse_queue(body)
    assert queue.running == ["run"] and queue.pending == ["a", "b", "c"]
    assert [queue.position(x) for x in ("a", "b", "c", "run", "zzz")] == [1, 2, 3, None, None]
    assert parse_queue({"queue_running": [], "queue_pending": [[-5, "front", {}, {}, []], [0, "x", {}, {}, []]]}
                       ).position("front") == 0


def test_rejections_as_recorded():
    unknown = {"error": {"type": "invalid_prompt", "message": "Cannot execute because node NoSuchNodeClass does not "
                                                              "exist.", "details": "Node ID '#1'", "extra_info": {}},
               "node_errors": {}}
    exc = rejection_from(400, json.dumps(unknown).encode())
    assert exc.message == ("ComfyUI rejected the workflow: Cannot execute because node NoSuchNodeClass does not "
                           "exist. (Node ID '#1')")
    assert exc.node_errors == {} and exc.comfyui_error["type"] == "invalid_prompt"
    out_of_range = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed "
                              "validation", "details": "", "extra_info": {}},
                    "node_errors": {"1": {"errors": [{"type": "value_bigger_than_max",
                                                      "message": "Value 100000 bigger than max of 4096",
                                                      "details": "width"}],
                                          "dependent_outputs": ["2"], "class_type": "SlowNoiseImage"}}}
    exc = rejection_from(400, json.dumps(out_of_range).encode())
    assert exc.message == ("ComfyUI rejected the workflow: Prompt outputs failed validation; node 1 "
                           "(SlowNoiseImage): Value 100000 bigger than max of 4096 (width)")
    assert exc.node_errors == out_of_range["node_errors"]
    text = rejection_from(500, b"500 Internal Server Error\n\nServer got itself in trouble")
    assert text.message == ("ComfyUI could not take the workflow (HTTP 500): 500 Internal Server Error Server got "
                            "itself in trouble")
    assert describe_rejection(None, {}) == "ComfyUI rejected the workflow: no reason given"


def test_binary_frames():
    meta = json.dumps({"node_id": "1", "prompt_id": PID, "display_node_id": "1", "parent_node_id": None,
                       "real_node_id": "1", "image_type": "image/jpeg"}).encode()
    jpeg = b"\xff\xd8\xff\xe0 jpeg bytes"
    frame = struct.pack(">II", 4, len(meta)) + meta + jpeg
    assert parse_binary(frame) == (4, PID, jpeg, "image/jpeg")
    assert parse_binary(struct.pack(">II", 1, 1) + jpeg) == (1, None, jpeg, "image/jpeg")
    assert parse_binary(struct.pack(">II", 1, 2) + b"png") == (1, None, b"png", "image/png")
    text = struct.pack(">II", 3, 1) + b"1" + b"step 1/4"
    assert parse_binary(text) is None
    assert parse_binary(b"\x00\x00") is None
    assert parse_binary(struct.pack(">II", 4, 50) + b"{not json") is None
    assert parse_binary(struct.pack(">II", 99, 0)) is None


# --- the client against a scripted stand-in on a real socket ---------------------------

import asyncio  # noqa: E402

import pytest  # noqa: E402
from tornado import web, websocket  # noqa: E402
from tornado.httpserver import HTTPServer  # noqa: E402
from tornado.netutil import bind_sockets  # noqa: E402

from support.timing import until  # noqa: E402
from t2i.comfyui import ComfyUIClient, ComfyUIIncompatible, ComfyUIUnavailable, PromptRejected  # noqa: E402


class Script:
    """What the stand-in answers, and what it saw."""

    def __init__(self):
        self.prompt_answers: list[tuple[int, bytes]] = []
        self.client_ids: list[str] = []
        self.first_messages: list[str] = []
        self.sockets: list[websocket.WebSocketHandler] = []
        self.frames: list = []  # sent to each new socket after its first message
        self.slow_prompt_ids: list[str] = []
        self.withdrawals: list = []  # bodies of POST /queue and /interrupt


class StubPrompt(web.RequestHandler):
    def initialize(self, script):
        self.script = script

    async def post(self):
        code, body = self.script.prompt_answers.pop(0)
        if body == b"slow":  # queued, but the answer comes too late
            self.script.slow_prompt_ids.append(json.loads(self.request.body)["prompt_id"])
            await asyncio.sleep(1.0)
            body = b"echo"
        if code == 200 and body == b"echo-other":
            body = json.dumps({"prompt_id": "not-yours", "number": 0, "node_errors": {}}).encode()
        elif code == 200 and body == b"echo":
            body = json.dumps({"prompt_id": json.loads(self.request.body)["prompt_id"], "number": 0,
                               "node_errors": {}}).encode()
        self.set_status(code)
        self.finish(body)


class StubBroken(web.RequestHandler):
    def initialize(self, script=None):
        self.script = script

    def post(self):
        if self.script is not None:
            self.script.withdrawals.append((self.request.path, json.loads(self.request.body or b"null")))
        self.set_status(500)
        self.finish(b"500 Internal Server Error\n\nServer got itself in trouble")


class StubSocket(websocket.WebSocketHandler):
    def initialize(self, script):
        self.script = script

    def open(self):
        self.script.client_ids.append(self.get_query_argument("clientId"))
        self.script.sockets.append(self)
        self.write_message(json.dumps({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                                                  "sid": self.get_query_argument("clientId")}}))

    def on_message(self, message):
        self.script.first_messages.append(message)
        for frame in self.script.frames:
            self.write_message(frame, binary=isinstance(frame, bytes))


class Recorder:
    def __init__(self):
        self.events = []

    def on_connected(self, client_id, reconnect):
        self.events.append(("connected", client_id, reconnect))

    def on_disconnected(self, reason):
        self.events.append(("disconnected",))

    def on_message(self, msg_type, data):
        self.events.append(("message", msg_type, data))

    def on_preview(self, prompt_id, image, content_type):
        self.events.append(("preview", prompt_id, image, content_type))


async def start_stub(script):
    app = web.Application([(r"/prompt", StubPrompt, {"script": script}), (r"/ws", StubSocket, {"script": script}),
                           (r"/(?:queue|interrupt)", StubBroken, {"script": script})])
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(app)
    server.add_sockets(sockets)
    return server, f"http://127.0.0.1:{sockets[0].getsockname()[1]}"


@pytest.mark.gen_test(timeout=20)
async def test_websocket_handshake_fresh_client_id_per_connection_and_frames():
    script = Script()
    meta = json.dumps({"node_id": "3", "prompt_id": PID, "image_type": "image/jpeg"}).encode()
    script.frames = [
        json.dumps({"type": "progress", "data": {"value": 1, "max": 4, "prompt_id": PID, "node": "3"}}),
        json.dumps({"type": "some_custom_node_type", "data": {}}),
        "not json",
        "[" * 100_000,  # too deep for the JSON parser (RecursionError): dropped, the socket lives on
        struct.pack(">II", 3, 1) + b"3" + b"step 1/4",
        struct.pack(">II", 4, len(meta)) + meta + b"jpeg-4",
        struct.pack(">II", 1, 1) + b"jpeg-1",
    ]
    server, url = await start_stub(script)
    recorder = Recorder()
    client = ComfyUIClient(url, connect_timeout=2, request_timeout=2, listener=recorder, backoff_min=0.05)
    client.start()
    try:
        assert await client.wait_connected(5)
        await until(lambda: len([e for e in recorder.events if e[0] == "preview"]) == 2, timeout=5.0)
        assert json.loads(script.first_messages[0]) == {"type": "feature_flags",
                                                        "data": {"supports_preview_metadata": True}}
        first_id = script.client_ids[0]
        assert len(first_id) == 32 and client.client_id == first_id
        kinds = [e[1] if e[0] == "message" else e[0] for e in recorder.events]
        assert kinds == ["connected", "status", "progress", "some_custom_node_type", "preview", "preview"]
        assert client.connected and client.connections == 1
        assert recorder.events[-2][1:] == (PID, b"jpeg-4", "image/jpeg")
        assert recorder.events[-1][1:] == (None, b"jpeg-1", "image/jpeg")

        # The server drops the socket (no close frame): the client comes back under a new clientId.
        script.sockets[0].ws_connection.stream.close()  # an abort, like a kill
        await until(lambda: len(script.client_ids) == 2 and client.connected, timeout=5.0)
        assert script.client_ids[1] != first_id and client.client_id == script.client_ids[1]
        assert ("disconnected",) in recorder.events
        connects = [e for e in recorder.events if e[0] == "connected"]
        assert [(e[1], e[2]) for e in connects] == [(first_id, False), (script.client_ids[1], True)]
        assert client.connections == 2
    finally:
        await client.stop()
        server.stop()
    assert not client.connected


@pytest.mark.gen_test(timeout=20)
async def test_submit_answers_that_are_not_acceptance():
    script = Script()
    server, url = await start_stub(script)
    client = ComfyUIClient(url, connect_timeout=2, request_timeout=2)
    try:
        script.prompt_answers.append((500, b"500 Internal Server Error\n\nServer got itself in trouble"))
        with pytest.raises(PromptRejected) as info:
            await client.submit(PID, {"1": {"class_type": "SaveImage", "inputs": {}}}, "cid")
        assert "HTTP 500" in info.value.message and "Server got itself in trouble" in info.value.message

        # An older ComfyUI ignores our prompt_id: we adopt nothing and say why. It is this
        # worker's fault, not the workflow's (a 503 the scheduler routes around, not a 502).
        script.prompt_answers.append((200, b"echo-other"))
        with pytest.raises(ComfyUIIncompatible) as info:
            await client.submit(PID, {}, "cid")
        assert "instead of" in str(info.value) and "upgrade" in str(info.value)
        assert info.value.other_prompt_id == "not-yours"
    finally:
        server.stop()
    with pytest.raises(ComfyUIUnavailable, match="is not reachable"):
        await client.submit(PID, {}, "cid")


@pytest.mark.gen_test(timeout=20)
async def test_worker_answers_502_with_comfyuis_500_text(tmp_path, monkeypatch):
    from support.cluster import call, start_worker
    from t2i import comfyui

    script = Script()
    server, url = await start_stub(script)
    worker = await start_worker(tmp_path, url)
    try:
        assert await worker.runner.comfy.wait_connected(5)
        script.prompt_answers.append((500, b"500 Internal Server Error\n\nServer got itself in trouble"))
        reply = await call("POST", f"{worker.url}/generate", {"prompt": "x"})
        assert reply.code == 502 and "Server got itself in trouble" in reply.json["error"]
        assert reply.json["node_errors"] == {}
        assert len(worker.store) == 0

        # A ComfyUI that ignores our prompt_id: 503 (the scheduler tries another worker), nothing kept.
        script.prompt_answers.append((200, b"echo-other"))
        reply = await call("POST", f"{worker.url}/generate", {"prompt": "x"})
        assert reply.code == 503 and "upgrade" in reply.json["error"] and reply.headers["Retry-After"]
        assert len(worker.store) == 0

        # POST /prompt unanswered in time: 503, and the prompt (which ComfyUI may have queued
        # anyway) is withdrawn, so no job runs without an owner.
        monkeypatch.setattr(comfyui, "SUBMIT_TIMEOUT", 0.3)
        script.prompt_answers.append((200, b"slow"))
        reply = await call("POST", f"{worker.url}/generate", {"prompt": "x"})
        assert reply.code == 503 and len(worker.store) == 0
        slow_id = script.slow_prompt_ids[-1]
        await until(lambda: ("/interrupt", {"prompt_id": slow_id}) in script.withdrawals, timeout=5.0)
        assert ("/queue", {"delete": [slow_id]}) in script.withdrawals
        monkeypatch.undo()

        # ComfyUI takes the job but fails the cancel: 502, and the job is left as it was.
        script.prompt_answers.append((200, b"echo"))
        prompt_id = (await call("POST", f"{worker.url}/generate", {"prompt": "x"})).json["prompt_id"]
        reply = await call("POST", f"{worker.url}/cancel/{prompt_id}")
        assert reply.code == 502 and "HTTP 500" in reply.json["error"]
        assert worker.store.get(prompt_id).status == "pending"
    finally:
        await worker.stop()
        server.stop()
