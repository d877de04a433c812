"""The ComfyUI test double replays the real ComfyUI 0.3.64 recordings message for message.

Each recording in tests/recordings/ is replayed against a fresh ``ComfySim``: the
same websocket connections, sends and closes, the same HTTP requests with the same
bodies (``step_seconds`` scaled by SCALE to keep the run short), in the same order.
Before each client action the replay waits until every connection has received
as many messages as it had in the recording at that point, and the recorded
(scaled) time has passed since the latest earlier event. From a query or control
request until the replay next waits for messages, the sim is stalled
(``sim.stall``), so what the recording saw "while running" (queue contents,
unfinished history, the order of statuses and progress) does not depend on CPU speed.

Then, per connection, the received messages must have the recorded types in the
recorded order, and the same data: prompt ids are mapped to the sim's, timestamps
only need to be ints, everything else (queue_remaining, node ids, progress
values, execution_cached nodes, filenames, error types and messages, traceback
frames, binary frame layouts) must be equal. Each HTTP answer must have the
recorded status, Content-Type, Content-Disposition and JSON body (same mapping).

Filenames match exactly because the output folder is seeded with one file per
prefix just below the recording's first counter (ComfyUI continues from the
files on disk), and ``sim.number`` starts where the recording's did.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from t2i.comfy_sim import ComfySim
from t2i.comfy_sim.imaging import png_chunks

RECORDINGS = Path(__file__).resolve().parent / "recordings"
SCALE = 0.25  # step_seconds and the gaps between client actions are scaled by this
MAX_GAP = 0.3  # never wait longer than this between two actions (restart pauses, final reads)
WAIT = 10.0  # how long a connection may take to receive what the recording received
PROGRESSISH = {"progress", "progress_state", "binary1", "binary3", "binary4"}
FILENAME = re.compile(r"^(.*)_(\d{5})_\.png$")


def load(name: str) -> dict:
    return json.loads((RECORDINGS / f"{name}.json").read_text())


def scaled(obj: Any) -> Any:
    """A copy of recorded JSON with every ``step_seconds`` value scaled like the replayed requests."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key == "step_seconds" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = value * SCALE
            elif key == "step_seconds" and isinstance(value, list) and all(
                    isinstance(v, float) for v in value):  # current_inputs of an execution_error
                out[key] = [v * SCALE for v in value]
            else:
                out[key] = scaled(value)
        return out
    if isinstance(obj, list):
        return [scaled(v) for v in obj]
    return obj


def token(message: Any) -> str:
    """A message's kind: its JSON ``type``, or ``binaryN`` for a binary frame of event type N."""
    if isinstance(message, (bytes, bytearray)):
        return f"binary{struct.unpack('>I', message[:4])[0]}"
    return json.loads(message)["type"]


def expected_token(event: dict) -> str:
    return event["json"]["type"] if event["kind"] == "ws_text" else f"binary{event['event_type']}"


def collapse(tokens: list[str]) -> list[str]:
    """Runs of progress-like messages become one token (for timing-dependent scenarios)."""
    out: list[str] = []
    for t in tokens:
        t = "progress*" if t in PROGRESSISH else t
        if not (t == "progress*" and out and out[-1] == t):
            out.append(t)
    return out


class Mismatch(AssertionError):
    pass


class Conn:
    def __init__(self, label: str, ws):
        self.label, self.ws = label, ws
        self.received: list[Any] = []
        self.times: list[float] = []  # monotonic arrival time of each received message
        self.closed_by_client = False
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.ws.read_message()
            if message is None:
                return
            self.received.append(message)
            self.times.append(time.monotonic())


class Replay:
    """Drives a ComfySim with a recording's client actions and compares what comes back."""

    def __init__(self, sim: ComfySim, recording: dict, flex: bool = False):
        self.sim, self.recording, self.flex = sim, recording, flex
        self.events = recording["events"]
        self.http = AsyncHTTPClient()
        self.conns: dict[str, Conn] = {}
        self.ids: dict[str, str] = {}  # recorded prompt_id -> the sim's
        self.responses = {e["req"]: e for e in self.events if e["kind"] in ("http_response", "http_error")}
        self.polls_empty = 0
        self.performed: dict[int, float] = {}  # event index -> when the replay performed that action
        self.position: dict[int, int] = {}  # ws message event index -> its index on its connection
        counts: dict[str, int] = {}
        for index, event in enumerate(self.events):
            if event["kind"] in ("ws_text", "ws_binary"):
                self.position[index] = counts.get(event["conn"], 0)
                counts[event["conn"]] = self.position[index] + 1

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def first_number(recording: dict) -> int:
        """The sim's ``number`` before the recording's first POST /prompt."""
        counted = 0
        for e in recording["events"]:
            if e["kind"] == "http_request" and e["method"] == "POST" and e["path"] in ("/prompt", "/api/prompt"):
                body = e.get("json")
                response = next(r for r in recording["events"] if r.get("req") == e["req"]
                                and r["kind"] == "http_response")
                if isinstance(response.get("json"), dict) and "number" in response["json"] and \
                        not (isinstance(body, dict) and "number" in body):
                    number = response["json"]["number"]
                    return (abs(number) if number < 0 else number) - counted
                if body is not None and not (isinstance(body, dict) and "number" in body):
                    counted += 1
        return 0

    @staticmethod
    def seed_outputs(recording: dict, output_dir: Path) -> None:
        """One placeholder file per prefix just below the recording's lowest counter."""
        lowest: dict[str, int] = {}
        for name in re.findall(r'"filename": "([^"]+)"', json.dumps(recording)):
            match = FILENAME.match(name)
            if match:
                prefix, counter = match.group(1), int(match.group(2))
                lowest[prefix] = min(lowest.get(prefix, counter), counter)
        for prefix, counter in lowest.items():
            if counter > 1:
                (output_dir / f"{prefix}_{counter - 1:05}_.png").write_bytes(b"placeholder")

    # ------------------------------------------------------------------ mapping
    def map_ids(self, obj: Any) -> Any:
        if isinstance(obj, str):
            return self.ids.get(obj, obj)
        if isinstance(obj, list):
            return [self.map_ids(v) for v in obj]
        if isinstance(obj, dict):
            return {self.map_ids(k): self.map_ids(v) for k, v in obj.items()}
        return obj

    def map_path(self, path: str) -> str:
        for old, new in self.ids.items():
            path = path.replace(old, new)
        return path

    # ------------------------------------------------------------------ waiting
    def expected_for(self, label: str, before: int | None = None) -> list[dict]:
        events = self.events if before is None else self.events[:before]
        return [e for e in events if e["kind"] in ("ws_text", "ws_binary") and e["conn"] == label]

    def _count(self, tokens: list[str]) -> int:
        return len(collapse(tokens)) if self.flex else len(tokens)

    async def wait_received(self, before: int | None = None) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            missing = []
            for label, conn in self.conns.items():
                want = self._count([expected_token(e) for e in self.expected_for(label, before)])
                have = self._count([token(m) for m in conn.received])
                if have < want and not conn.reader.done():
                    missing.append(f"{label}: {have}/{want}")
            if not missing:
                return
            self.sim.stall = False  # messages are due: let the sim run again
            if time.monotonic() > deadline:
                raise Mismatch(f"timed out waiting for messages before event {before}: {missing}\n"
                               + "\n".join(f"{l}: {[token(m) for m in c.received]}" for l, c in self.conns.items()))
            await asyncio.sleep(0.005)

    def observed(self, index: int) -> float | None:
        """When the replay saw (or did) recorded event ``index``, if it can tell."""
        if index in self.performed:
            return self.performed[index]
        event = self.events[index]
        conn = self.conns.get(event.get("conn", ""))
        if index in self.position and conn is not None and not self.flex and self.position[index] < len(conn.times):
            return conn.times[self.position[index]]
        return None

    async def pace(self, index: int) -> None:
        """Keep the recorded (scaled) delay after the latest earlier event: an action that followed a
        given message in the recording follows it here too, however fast or slow the machine is."""
        for previous in range(index - 1, -1, -1):
            seen = self.observed(previous)
            if seen is not None:
                gap = min(MAX_GAP, max(0.0, (self.events[index]["t"] - self.events[previous]["t"]) * SCALE))
                delay = seen + gap - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                break
        self.performed[index] = time.monotonic()

    # ------------------------------------------------------------------ actions
    async def run(self) -> None:
        for index, event in enumerate(self.events):
            kind = event["kind"]
            if kind in ("ws_text", "ws_binary", "http_response", "http_error", "ws_open_error"):
                continue
            if kind != "http_request":
                self.sim.stall = False
            if kind == "ws_close" and event["by"] != "client":
                await self.expect_dropped(event["conn"])
                continue
            await self.wait_received(index)
            if kind == "note":
                await self.on_note(event.get("text") or event.get("note") or "")
                continue
            await self.pace(index)
            if kind == "ws_open":
                ws = await websocket_connect(self.ws_url(event["url"]))
                self.conns[event["conn"]] = Conn(event["conn"], ws)
            elif kind == "ws_send":
                await self.conns[event["conn"]].ws.write_message(json.dumps(event["json"]))
            elif kind == "ws_close":
                conn = self.conns[event["conn"]]
                conn.closed_by_client = True
                conn.ws.close(1000)
                await asyncio.wait_for(conn.reader, WAIT)
            elif kind == "ws_connect_error":
                with pytest.raises(ConnectionRefusedError):
                    await websocket_connect(self.ws_url("/ws"))
            elif kind == "http_request":
                await self.request(index)
            else:
                raise AssertionError(f"unknown event kind {kind}")
        self.sim.stall = False
        await self.wait_received(None)
        await asyncio.sleep(0.1)  # anything extra would arrive now
        self.compare_messages()

    def ws_url(self, path: str) -> str:
        return self.sim.url.replace("http://", "ws://") + path

    async def on_note(self, text: str) -> None:
        if re.search(r"stopping ComfyUI|stopped with SIGINT", text):
            await self.sim.stop()
        elif re.search(r"starting ComfyUI again|start-comfy\.sh finished", text) and not self.sim.running:
            await self.sim.start(port=self.sim.port)

    async def expect_dropped(self, label: str) -> None:
        conn = self.conns[label]
        await asyncio.wait_for(conn.reader, WAIT)
        assert conn.ws.close_code is None, f"{label}: the server sent a close frame ({conn.ws.close_code})"

    def may_hold(self, index: int) -> bool:
        """Whether to stall the sim for request ``index``: always for queries and control requests; for a
        submission only when the running prompt is mid-node in the recording (holding a prompt that has
        not reached its first node would delay its first messages behind this submission's status)."""
        event = self.events[index]
        if not (event["method"] == "POST" and event["path"].endswith("/prompt")):
            return True
        for earlier in reversed(self.events[:index]):
            if earlier["kind"] == "ws_text" and earlier["json"]["type"] != "status":
                kind, data = earlier["json"]["type"], earlier["json"]["data"]
                return kind in ("progress", "progress_state") or (kind == "executing" and data.get("node"))
        return False

    async def request(self, index: int) -> None:
        event = self.events[index]
        body = None
        if "json" in event:
            body = json.dumps(self.map_ids(scaled(event["json"])))
        elif "raw_body" in event:
            body = event["raw_body"]
        elif event["method"] == "POST":
            body = ""
        request = HTTPRequest(self.sim.url + self.map_path(event["path"]), method=event["method"], body=body,
                              headers=event.get("headers") or None, request_timeout=10)
        expected = self.responses[event["req"]]
        polling = "polling" in (event.get("note") or "")
        if self.may_hold(index):
            self.sim.stall = True
        while True:
            try:
                response = await self.http.fetch(request, raise_error=False)
            except ConnectionRefusedError:
                assert expected["kind"] == "http_error" and "ConnectionRefused" in expected["error"], event
                return
            assert expected["kind"] == "http_response", f"req {event['req']}: expected {expected['error']}"
            if polling and response.code == 200:
                answer = json.loads(response.body)
                if expected["json"] == {}:
                    # Timing decides whether a poll lands before completion; both answers are legitimate.
                    self.polls_empty += answer == {}
                    return
                if answer == {}:
                    self.sim.stall = False
                    await asyncio.sleep(0.02)  # poll again, as a client would, until the entry appears
                    continue
            break
        self.check_response(event, expected, response)

    # ------------------------------------------------------------------ comparisons
    def check_response(self, request: dict, expected: dict, response) -> None:
        where = f"req {request['req']} {request['method']} {request['path']}"
        assert response.code == expected["status"], f"{where}: status {response.code}, want {expected['status']}"
        want_type = expected["headers"].get("Content-Type")
        got_type = response.headers.get("Content-Type")
        if want_type is None:
            assert got_type is None, f"{where}: unexpected Content-Type {got_type}"
        else:
            assert got_type is not None and got_type.split(";")[0] == want_type.split(";")[0], \
                f"{where}: Content-Type {got_type}, want {want_type}"
        if "Content-Disposition" in expected["headers"]:
            assert response.headers.get("Content-Disposition") == expected["headers"]["Content-Disposition"]
        if request["method"] == "POST" and request["path"].endswith("/prompt") and response.code == 200:
            self.ids[expected["json"]["prompt_id"]] = json.loads(response.body)["prompt_id"]
        if "json" in expected:
            actual = json.loads(response.body)
            if request["path"].endswith("/system_stats"):
                self.compare(expected["json"], actual, where, shape_only=True)
            else:
                self.compare(scaled(expected["json"]), actual, where)
        elif "text" in expected:
            assert response.body.decode() == expected["text"], f"{where}: body {response.body!r}"
        elif "binary" in expected:
            self.compare_binary_body(expected["binary"], response.body, where)

    def compare_binary_body(self, expected: dict, body: bytes, where: str) -> None:
        if "png" in expected:
            chunks = png_chunks(body)
            assert all(ok for _, _, ok in chunks), f"{where}: bad CRC"
            header = next(p for k, p, _ in chunks if k == b"IHDR")
            assert list(struct.unpack(">II", header[:8])) == expected["png"]["width_height"], where
            assert [k.decode() for k, _, _ in chunks] == expected["png"]["chunks"], where
            keywords = [p.split(b"\0")[0].decode() for k, p, _ in chunks if k == b"tEXt"]
            assert keywords == expected["png"]["tEXt_keywords"], where
        else:
            assert body[:4].hex() == expected["first16_hex"][:8], f"{where}: starts {body[:16].hex()}"

    def compare(self, expected: Any, actual: Any, where: str, key: str = "", shape_only: bool = False) -> None:
        if key == "timestamp":
            assert isinstance(actual, int) and not isinstance(actual, bool), f"{where}: timestamp {actual!r}"
            return
        if isinstance(expected, dict):
            assert isinstance(actual, dict), f"{where}: {actual!r} is not an object"
            keys = [self.map_ids(k) for k in expected]
            assert keys == list(actual), f"{where}: keys {list(actual)}, want {keys}"
            for k, v in expected.items():
                self.compare(v, actual[self.map_ids(k)], f"{where}.{k}", k, shape_only)
            return
        if shape_only:
            assert type(actual) is type(expected) or (isinstance(expected, (int, float)) and
                                                      isinstance(actual, (int, float))), f"{where}: {actual!r}"
            return
        if isinstance(expected, list):
            assert isinstance(actual, list), f"{where}: {actual!r} is not a list"
            assert len(actual) == len(expected), f"{where}: {len(actual)} items, want {len(expected)}: {actual!r}"
            for i, (e, a) in enumerate(zip(expected, actual)):
                self.compare(e, a, f"{where}[{i}]", key, shape_only)
            return
        if key == "sid" and isinstance(expected, str) and re.fullmatch(r"[0-9a-f]{32}", expected):
            assert isinstance(actual, str) and re.fullmatch(r"[0-9a-f]{32}", actual), f"{where}: sid {actual!r}"
            return
        want = self.map_ids(expected)
        assert actual == want and type(actual) is type(want), f"{where}: {actual!r}, want {want!r}"

    def compare_binary_frame(self, expected: dict, frame: bytes, where: str) -> None:
        event_type = struct.unpack(">I", frame[:4])[0]
        assert event_type == expected["event_type"], f"{where}: binary type {event_type}"
        decoded = expected["decoded"]
        if event_type == 3:
            (length,) = struct.unpack(">I", frame[4:8])
            assert length == decoded["node_id_length"]
            assert frame[8:8 + length].decode() == decoded["node_id"], where
            assert frame[8 + length:].decode() == decoded["text"], where
        elif event_type == 4:
            (length,) = struct.unpack(">I", frame[4:8])
            assert length == decoded["metadata_length"], f"{where}: metadata length {length}"
            self.compare(decoded["metadata"], json.loads(frame[8:8 + length]), where)
            assert frame[8 + length:8 + length + 3].hex() == decoded["image_first8_hex"][:6], where
        elif event_type == 1:
            assert struct.unpack(">I", frame[4:8])[0] == decoded["image_format_int"], where
            assert frame[8:11].hex() == decoded["image_first8_hex"][:6], where

    def compare_messages(self) -> None:
        for label, conn in self.conns.items():
            expected = self.expected_for(label)
            want = [expected_token(e) for e in expected]
            got = [token(m) for m in conn.received]
            if self.flex:
                assert collapse(got) == collapse(want), f"{label}: got {collapse(got)}\nwant {collapse(want)}"
                expected = [e for e in expected if expected_token(e) not in PROGRESSISH]
                received = [m for m in conn.received if token(m) not in PROGRESSISH]
            else:
                assert got == want, f"{label}: message types differ\ngot  {got}\nwant {want}"
                received = conn.received
            for i, (e, m) in enumerate(zip(expected, received)):
                where = f"{label} message {i} ({expected_token(e)})"
                if e["kind"] == "ws_text":
                    self.compare(scaled(e["json"]), json.loads(m), where)
                else:
                    self.compare_binary_frame(e, m, where)

    async def close(self) -> None:
        for conn in self.conns.values():
            conn.ws.close()
            conn.reader.cancel()


async def replay(name: str, tmp_path: Path, flex: bool = False, warmup=None) -> Replay:
    recording = load(name)
    output = tmp_path / "output"
    output.mkdir()
    sim = ComfySim(output_dir=str(output))
    await sim.start(port=0, address="127.0.0.1")
    runner = Replay(sim, recording, flex=flex)
    try:
        if warmup is not None:
            await warmup(sim)
        Replay.seed_outputs(recording, output)
        sim.number = Replay.first_number(recording)
        await runner.run()
    finally:
        await runner.close()
        await sim.stop()
    return runner


async def run_prompt(sim: ComfySim, body: dict) -> str:
    response = await AsyncHTTPClient().fetch(sim.url + "/prompt", method="POST", body=json.dumps(body))
    prompt_id = json.loads(response.body)["prompt_id"]
    deadline = time.monotonic() + WAIT
    while prompt_id not in sim.history:
        assert time.monotonic() < deadline, "warm-up prompt did not finish"
        await asyncio.sleep(0.01)
    return prompt_id


def first_prompt_body(name: str) -> dict:
    event = next(e for e in load(name)["events"] if e["kind"] == "http_request" and e["path"] == "/prompt")
    return scaled(event["json"])


# Every scenario recorded against one server run; "flex" where the recording's own timing decides how
# many progress messages land before a client action (a mid-run disconnect or a kill).
PLAIN = ["00_basics", "a_success", "b2_cache_alternation", "c_failure", "d_invalid", "e_interrupt",
         "e2_targeted_interrupt_and_delete", "f_back_to_back", "g_prompt_id", "i_previews_and_text",
         "j_no_client_id", "l_same_client_id_twice", "n_builtin_only", "h2_stop_sigint"]


@pytest.mark.parametrize("name", PLAIN)
@pytest.mark.gen_test(timeout=40)
async def test_scenario_replays_message_for_message(name, tmp_path):
    runner = await replay(name, tmp_path)
    if name in ("j_no_client_id", "l_same_client_id_twice"):
        assert runner.polls_empty >= 1, "no poll saw the prompt still unfinished"


@pytest.mark.gen_test(timeout=40)
async def test_cached_rerun_after_the_same_workflow(tmp_path):
    # b_cached_rerun was recorded right after a_success: its first prompt is a_success's workflow again.
    async def warm(sim):
        await run_prompt(sim, first_prompt_body("a_success"))

    await replay("b_cached_rerun", tmp_path, warmup=warm)


@pytest.mark.gen_test(timeout=40)
async def test_reconnect_midrun_gets_executing_and_no_replay(tmp_path):
    runner = await replay("k_reconnect_midrun", tmp_path, flex=True)
    before = [json.loads(m)["data"]["value"] for m in runner.conns["A"].received if token(m) == "progress"]
    after = [json.loads(m)["data"]["value"] for m in runner.conns["A_reconnected"].received
             if token(m) == "progress"]
    assert before and after and after[0] > before[-1] + 1, (before, after)  # missed steps are not replayed
    assert after == list(range(after[0], 17))
    first_two = [json.loads(m) for m in runner.conns["A_reconnected"].received[:2]]
    assert first_two[1] == {"type": "executing", "data": {"node": "1"}}


@pytest.mark.gen_test(timeout=40)
async def test_restart_while_running_loses_everything_silently(tmp_path):
    await replay("h_restart", tmp_path, flex=True)


@pytest.mark.gen_test(timeout=30)
async def test_history_api_like_m_history_api(tmp_path):
    """m_history_api needs the 27 entries of the recording session; rebuild a smaller history and
    check the same requests give the same answers relative to it."""
    recording = load("m_history_api")
    requests = [e for e in recording["events"] if e["kind"] == "http_request"]
    answers = {e["req"]: e for e in recording["events"] if e["kind"] == "http_response"}
    full = list(answers[3]["json"])  # GET /history: every id, oldest first
    assert list(answers[1]["json"]) == full[-3:] and list(answers[2]["json"]) == full[1:3]

    sim = ComfySim(output_dir=str(tmp_path))
    await sim.start(port=0, address="127.0.0.1")
    http = AsyncHTTPClient()
    try:
        ids = []
        for i in range(6):
            workflow = json.loads((RECORDINGS / "workflow_empty_image.json").read_text())
            workflow["1"]["inputs"]["color"] = i
            ids.append(await run_prompt(sim, {"prompt": workflow, "prompt_id": f"m-{i}"}))

        async def call(event: dict):
            body = json.dumps(event["json"]) if "json" in event else None
            response = await http.fetch(sim.url + event["path"].replace(full[0], ids[0]), method=event["method"],
                                        body=body.replace(full[0], ids[0]) if body else None, raise_error=False)
            expected = answers[event["req"]]
            assert response.code == expected["status"]
            if "Content-Type" not in expected["headers"]:
                assert "Content-Type" not in response.headers and response.body == b""
                return None
            return json.loads(response.body)

        assert list(await call(requests[0])) == ids[-3:]  # ?max_items=3: the newest three
        assert list(await call(requests[1])) == ids[1:3]  # ?max_items=2&offset=1: from the oldest
        everything = await call(requests[2])
        assert list(everything) == ids
        assert all(set(entry) == {"prompt", "outputs", "status", "meta"} for entry in everything.values())
        assert await call(requests[3]) is None  # POST {"delete": [oldest]}
        assert await call(requests[4]) == {}
        assert await call(requests[5]) is None  # POST {"clear": true}
        assert await call(requests[6]) == {}
        # A duplicate prompt_id overwrites the entry but keeps its place (g_prompt_id).
        await run_prompt(sim, {"prompt": json.loads((RECORDINGS / "workflow_empty_image.json").read_text()),
                               "prompt_id": "first"})
        await run_prompt(sim, {"prompt": json.loads((RECORDINGS / "workflow_empty_image.json").read_text()),
                               "prompt_id": "second"})
        number = sim.number
        await run_prompt(sim, {"prompt": json.loads((RECORDINGS / "workflow_empty_image.json").read_text()),
                               "prompt_id": "first"})
        assert list(sim.history) == ["first", "second"] and sim.history["first"]["prompt"][0] == number
    finally:
        await sim.stop()
