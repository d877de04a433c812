"""The one module that knows ComfyUI's protocol: HTTP calls and the websocket.

Written against ComfyUI 0.3.64 (see ``shared/comfyui/PROTOCOL.md``). The
:class:`ComfyUIClient` keeps one websocket open with a fresh ``clientId`` per
connection (a reused id can go silently dead, PROTOCOL §7.1), reconnects with
capped exponential backoff and jitter, and hands every decoded message to a
listener. It knows nothing about jobs; ``t2i.worker.runner`` does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse
from tornado.iostream import StreamClosedError
from tornado.util import TimeoutError as TornadoTimeoutError
from tornado.websocket import WebSocketClientConnection, websocket_connect

from t2i.backoff import Backoff
from t2i.httpclient import fetch, json_request
from t2i.waiters import done_within

log = logging.getLogger(__name__)

# Binary websocket frames (PROTOCOL §7.4).
PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
PREVIEW_FORMATS = {1: "image/jpeg", 2: "image/png"}

SUBMIT_TIMEOUT = 10.0  # seconds for POST /prompt (validation runs inside it)
VIEW_RETRY = Backoff(first=0.2, maximum=2.0, jitter=0.5)  # /view right after a run: the file may lag

FEATURE_FLAGS = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
# ``progress_state`` (a snapshot of every node, several per step) says nothing ``executing`` and
# ``progress`` do not: dropped before it is parsed. ComfyUI writes ``{"type": ...`` first (aiohttp
# ``send_json``); any other spelling is parsed and then ignored as before.
UNUSED_MESSAGES = ('{"type": "progress_state"', '{"type":"progress_state"')


class ComfyUIError(Exception):
    """Something went wrong talking to ComfyUI; ``str()`` is a sentence."""


class ComfyUIUnavailable(ComfyUIError):
    """ComfyUI could not be reached (refused, timed out, reset, websocket down)."""


class ComfyUITimeout(ComfyUIUnavailable):
    """A request was sent but not answered in time: ComfyUI may still have acted on it."""


class ComfyUIIncompatible(ComfyUIUnavailable):
    """This ComfyUI cannot serve t2i (it ignores client-chosen prompt ids): a worker fault,
    so callers should go elsewhere rather than blame the workflow."""

    def __init__(self, message: str, other_prompt_id: str | None = None):
        super().__init__(message)
        self.other_prompt_id = other_prompt_id


class PromptRejected(ComfyUIError):
    """ComfyUI refused a workflow (400 with ``node_errors``, or a 500 text)."""

    def __init__(self, message: str, node_errors: dict | None = None, comfyui_error: Any = None):
        super().__init__(message)
        self.message = message
        self.node_errors = node_errors or {}
        self.comfyui_error = comfyui_error


class UploadRejected(PromptRejected):
    """ComfyUI refused an input image (``POST /upload/image`` not 200, or an answer without a usable name)."""


@dataclass(frozen=True)
class ImageRef:
    """An output file as ComfyUI names it in ``executed`` or history ``outputs``."""

    filename: str
    subfolder: str = ""
    type: str = "output"


@dataclass(frozen=True)
class QueueState:
    """``GET /queue``: prompt ids running, and pending in the order they will run."""

    running: list[str]
    pending: list[str]

    def position(self, prompt_id: str) -> int | None:
        """Prompts ComfyUI runs before this pending one, the running one included."""
        try:
            return len(self.running) + self.pending.index(prompt_id)
        except ValueError:
            return None


@dataclass(frozen=True)
class Outcome:
    """How a finished prompt ended, read from a history entry."""

    status: str  # "success", "error" or "interrupted"
    images: list[ImageRef]
    error: str | None = None


class ComfyUIListener(Protocol):
    def on_connected(self, client_id: str, reconnect: bool) -> None: ...

    def on_disconnected(self, reason: str) -> None: ...

    def on_message(self, msg_type: str, data: dict[str, Any]) -> None: ...

    def on_preview(self, prompt_id: str | None, image: bytes, content_type: str) -> None: ...

    def on_unreachable(self, reason: str) -> None: ...


# --- reading ComfyUI's shapes ----------------------------------------------------

def error_sentence(data: dict[str, Any]) -> str:
    """``execution_error`` data -> "KSampler failed: CUDA out of memory"."""
    message = str(data.get("exception_message") or data.get("exception_type") or "unknown error").strip()
    node_type = data.get("node_type") or "A node"
    return f"{node_type} failed: {message}"


def images_of(outputs: Any) -> list[ImageRef]:
    """The image files in a history entry's ``outputs`` (or one ``executed`` output), node by node.

    Saved files (``type: output``) are preferred; temp previews only when nothing was saved.
    """
    found: list[ImageRef] = []
    if not isinstance(outputs, dict):
        return found
    # An `executed` message carries one node's output: {"images": [...]}.
    nodes = [outputs] if isinstance(outputs.get("images"), list) else [
        outputs[key] for key in sorted(outputs, key=_node_order) if isinstance(outputs[key], dict)]
    for node in nodes:
        for item in node.get("images") or ():
            if isinstance(item, dict) and isinstance(item.get("filename"), str):
                found.append(ImageRef(item["filename"], str(item.get("subfolder") or ""),
                                      str(item.get("type") or "output")))
    saved = [ref for ref in found if ref.type == "output"]
    return saved or found


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if str(node_id).isdigit() else (1 << 62, str(node_id))


def outcome_of(entry: dict[str, Any]) -> Outcome:
    """How a history entry says the prompt ended (PROTOCOL §5, pitfall 12)."""
    status = entry.get("status") or {}
    images = images_of(entry.get("outputs"))
    messages = status.get("messages") or []
    last_type, last_data = None, {}
    for message in messages:
        if isinstance(message, (list, tuple)) and len(message) == 2 and message[0] in (
                "execution_error", "execution_interrupted", "execution_success"):
            last_type, last_data = message[0], message[1] if isinstance(message[1], dict) else {}
    if last_type == "execution_interrupted":
        return Outcome("interrupted", images)
    if last_type == "execution_error":
        return Outcome("error", images, error_sentence(last_data))
    if status.get("status_str") == "error":
        return Outcome("error", images, "ComfyUI reported an error without details")
    return Outcome("success", images)


def parse_queue(body: Any) -> QueueState:
    """``GET /queue`` -> ids; pending sorted by ``number`` (it comes in heap order)."""
    if not isinstance(body, dict):
        raise ComfyUIError("ComfyUI's /queue answer is not a JSON object")

    def items(key: str) -> list[list]:
        return [item for item in body.get(key) or () if isinstance(item, list) and len(item) >= 2]

    running = [str(item[1]) for item in items("queue_running")]
    pending = sorted(items("queue_pending"), key=lambda item: item[0] if isinstance(item[0], (int, float)) else 0)
    return QueueState(running, [str(item[1]) for item in pending])


def rejection_from(code: int, body: bytes) -> PromptRejected:
    """A non-200 answer to ``POST /prompt`` as a sentence plus ComfyUI's details."""
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        text = body.decode("utf-8", "replace").strip() or f"HTTP {code}"
        return PromptRejected(f"ComfyUI could not take the workflow (HTTP {code}): {' '.join(text.split())}")
    error = parsed.get("error")
    node_errors = parsed.get("node_errors") if isinstance(parsed.get("node_errors"), dict) else {}
    return PromptRejected(describe_rejection(error, node_errors), node_errors, error)


def describe_rejection(error: Any, node_errors: dict[str, Any]) -> str:
    parts = []
    if isinstance(error, dict):
        message = str(error.get("message") or "the workflow is invalid").strip()
        details = str(error.get("details") or "").strip()
        parts.append(f"{message} ({details})" if details and details != message else message)
    elif error:
        parts.append(str(error).strip())
    for node_id, node in (node_errors or {}).items():
        if not isinstance(node, dict):
            continue
        for err in node.get("errors") or ():
            if isinstance(err, dict):
                detail = f" ({err['details']})" if err.get("details") else ""
                parts.append(f"node {node_id} ({node.get('class_type', '?')}): {err.get('message', 'invalid')}{detail}")
    return "ComfyUI rejected the workflow: " + ("; ".join(parts) or "no reason given")


def parse_binary(frame: bytes) -> tuple[int, str | None, bytes, str] | None:
    """A binary frame -> (event type, prompt_id, image, content type); None for non-images."""
    if len(frame) < 8:
        return None
    (event,) = struct.unpack(">I", frame[:4])
    if event == PREVIEW_IMAGE:
        (fmt,) = struct.unpack(">I", frame[4:8])
        return event, None, frame[8:], PREVIEW_FORMATS.get(fmt, "image/jpeg")
    if event == PREVIEW_IMAGE_WITH_METADATA:
        (length,) = struct.unpack(">I", frame[4:8])
        try:
            meta = json.loads(frame[8:8 + length])
        except ValueError:
            return None
        if not isinstance(meta, dict):
            return None
        prompt_id = meta.get("prompt_id")
        return (event, str(prompt_id) if prompt_id else None, frame[8 + length:],
                str(meta.get("image_type") or "image/jpeg"))
    return None  # TEXT (3) and anything newer: not ours to show


# --- the client ---------------------------------------------------------------------

class ComfyUIClient:
    """HTTP calls to one ComfyUI plus its websocket, feeding a listener."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, request_timeout: float = 30.0,
                 listener: ComfyUIListener | None = None, ping_interval: float = 10.0,
                 backoff_min: float = 0.5, backoff_max: float = 10.0):
        self.url = url.rstrip("/")
        self.ws_url = "ws" + self.url[len("http"):] + "/ws"
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.listener = listener
        self.ping_interval = ping_interval
        # Jitter keeps a fleet of workers from reconnecting in lockstep.
        self.backoff = Backoff(first=backoff_min, maximum=backoff_max)
        self.client_id: str | None = None
        self.connections = 0
        self.last_error: str | None = None
        self._ws: WebSocketClientConnection | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- websocket ----------------------------------------------------------------

    def start(self) -> None:
        self._closing = False
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._closing = True
        if self._ws is not None:
            self._ws.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._connected.clear()

    async def wait_connected(self, timeout: float) -> bool:
        if self._connected.is_set():
            return True
        return (await done_within(self._connected.wait(), timeout)).done()

    async def _run(self) -> None:
        retries = 0      # reconnects in a row without a connection that lasted (drives the backoff)
        failures = 0     # connect attempts that failed in a row (drives the logging)
        while not self._closing:
            client_id = uuid.uuid4().hex
            inbox = _Inbox(self._dispatch)
            try:
                ws = await websocket_connect(
                    HTTPRequest(f"{self.ws_url}?clientId={client_id}", connect_timeout=self.connect_timeout,
                                request_timeout=self.connect_timeout),
                    ping_interval=self.ping_interval, on_message_callback=inbox.received)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, timed out, bad handshake: all mean "not now"
                failures += 1
                retries += 1
                self.last_error = f"cannot open ComfyUI's websocket at {self.ws_url}: {_describe(exc)}"
                # One line when it goes away, then quietly until it is back.
                (log.warning if failures == 1 else log.debug)("%s; retrying", self.last_error)
                if failures == 1:
                    self._notify("on_unreachable", self.last_error)
                await asyncio.sleep(self.backoff.delay(retries))
                continue
            failures = 0
            connected_at = time.monotonic()
            await self._serve(ws, client_id, inbox)
            if time.monotonic() - connected_at > self.backoff.maximum:
                retries = 0  # it was up a good while: start the backoff over
            if not self._closing:
                retries += 1
                await asyncio.sleep(self.backoff.delay(retries))

    async def _serve(self, ws: WebSocketClientConnection, client_id: str, inbox: "_Inbox") -> None:
        self._ws = ws
        self.client_id = client_id
        self.connections += 1
        self.last_error = None
        try:
            await ws.write_message(json.dumps(FEATURE_FLAGS))
        except Exception as exc:
            log.warning("ComfyUI websocket closed during the handshake: %s", _describe(exc))
            self._ws = None
            return
        self._connected.set()
        log.info("connected to ComfyUI websocket %s (clientId %s)", self.ws_url, client_id)
        self._notify("on_connected", client_id, self.connections > 1)
        try:
            await inbox.open()  # messages are handled as they arrive from here on, until it closes
        finally:
            # However the reader ends, submit() must not believe a dead socket is listening.
            self._connected.clear()
            self._ws = None
        if not self._closing:
            reason = f"close code {ws.close_code}" if ws.close_code else "connection lost, no close frame"
            self.last_error = f"ComfyUI websocket dropped ({reason})"
            log.warning("%s; reconnecting", self.last_error)
            self._notify("on_disconnected", self.last_error)

    def _dispatch(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            parsed = parse_binary(message)
            if parsed is not None:
                _, prompt_id, image, content_type = parsed
                self._notify("on_preview", prompt_id, image, content_type)
            return
        if message.startswith(UNUSED_MESSAGES):
            return
        try:
            msg = json.loads(message)
        except ValueError:
            log.debug("ignoring a non-JSON websocket message from ComfyUI")
            return
        if isinstance(msg, dict) and isinstance(msg.get("type"), str):
            data = msg.get("data")
            self._notify("on_message", msg["type"], data if isinstance(data, dict) else {})

    def _notify(self, method: str, *args: Any) -> None:
        if self.listener is None:
            return
        try:
            getattr(self.listener, method)(*args)
        except Exception:
            log.exception("error handling ComfyUI event %s", method)

    # --- HTTP -------------------------------------------------------------------------

    async def _fetch(self, method: str, path: str, body: Any = None, *,
                     request_timeout: float | None = None) -> HTTPResponse:
        request = json_request(self.url + path, method, body, connect_timeout=self.connect_timeout,
                               request_timeout=request_timeout or self.request_timeout)
        try:
            response = await fetch(request)
        except (HTTPClientError, OSError, TornadoTimeoutError) as exc:  # StreamClosedError is an OSError
            raise _unavailable(self.url, exc) from None
        if response.code == 599:
            raise _unavailable(self.url, response.error)
        return response

    async def _get_json(self, path: str, *, request_timeout: float | None = None) -> Any:
        response = await self._fetch("GET", path, request_timeout=request_timeout)
        if response.code != 200:
            raise ComfyUIError(f"ComfyUI answered GET {path.split('?')[0]} with HTTP {response.code}")
        try:
            return json.loads(response.body)
        except ValueError:
            raise ComfyUIError(f"ComfyUI answered GET {path.split('?')[0]} with something not JSON") from None

    async def submit(self, prompt_id: str, workflow: dict[str, Any], client_id: str) -> dict[str, Any]:
        """``POST /prompt`` under our own ``prompt_id``; returns ComfyUI's reply.

        Raises :class:`PromptRejected` when ComfyUI refuses the workflow, and when it
        answers with a different prompt_id (an older ComfyUI that ignores ours).
        """
        body = {"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id,
                "extra_data": {"client_id": client_id}}
        # Bounded well below the scheduler's wait for our answer, so a slow ComfyUI
        # gives a clear 503 here rather than a timed-out hop (and a retry elsewhere).
        response = await self._fetch("POST", "/prompt", body,
                                     request_timeout=min(self.request_timeout, SUBMIT_TIMEOUT))
        if response.code != 200:
            raise rejection_from(response.code, response.body or b"")
        try:
            reply = json.loads(response.body)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise PromptRejected("ComfyUI answered POST /prompt with something that is not a JSON object")
        if str(reply.get("prompt_id")) != prompt_id:
            other = reply.get("prompt_id")
            raise ComfyUIIncompatible(
                f"This worker's ComfyUI queued the workflow as {other!r} instead of {prompt_id!r}: it ignores "
                "client-chosen prompt ids (a ComfyUI older than 0.3.4x?), which t2i needs; upgrade it",
                str(other) if other else None)
        return reply

    async def object_info(self, class_type: str) -> dict[str, Any]:
        """ComfyUI's description of one node class; ``{}`` when it has no such node."""
        body = await self._get_json(f"/object_info/{quote(class_type, safe='')}")
        info = body.get(class_type) if isinstance(body, dict) else None
        return info if isinstance(info, dict) else {}

    async def upload_image(self, name: str, data: bytes, content_type: str, subfolder: str = "t2i",
                           overwrite: bool = True) -> str:
        """``POST /upload/image`` into ComfyUI's input folder (PROTOCOL §12); returns how LoadImage
        names the file *ComfyUI stored*: ``"<subfolder>/<name>"`` from its answer (it may rename).

        Raises ComfyUIUnavailable when ComfyUI cannot be reached, UploadRejected when it refuses.
        """
        boundary = uuid.uuid4().hex
        body = _multipart(boundary, [("type", None, None, b"input"), ("subfolder", None, None, subfolder.encode()),
                                     ("overwrite", None, None, b"true" if overwrite else b"false"),
                                     ("image", name, content_type, data)])
        request = HTTPRequest(self.url + "/upload/image", method="POST", body=body,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                              connect_timeout=self.connect_timeout, request_timeout=self.request_timeout)
        try:
            response = await fetch(request)
        except (HTTPClientError, OSError, TornadoTimeoutError) as exc:
            raise _unavailable(self.url, exc) from None
        if response.code == 599:
            raise _unavailable(self.url, response.error)
        if response.code != 200:
            raise UploadRejected(f"ComfyUI refused the input image {name} (POST /upload/image: HTTP {response.code})")
        try:
            answer = json.loads(response.body)
        except ValueError:
            answer = None
        stored = answer.get("name") if isinstance(answer, dict) else None
        folder = answer.get("subfolder", "") if isinstance(answer, dict) else None
        if not isinstance(stored, str) or not stored or "/" in stored or "\\" in stored or stored in (".", "..") \
                or not isinstance(folder, str) or ".." in folder.split("/"):
            raise UploadRejected(f"ComfyUI answered the upload of {name} without a usable file name: "
                                 f"{(response.body or b'')[:200]!r}")
        return f"{folder.strip('/')}/{stored}" if folder.strip("/") else stored

    async def queue(self) -> QueueState:
        return parse_queue(await self._get_json("/queue"))

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of ``prompt_id``, or None when ComfyUI has none."""
        body = await self._get_json(f"/history/{prompt_id}")
        entry = body.get(prompt_id) if isinstance(body, dict) else None
        return entry if isinstance(entry, dict) else None

    async def withdraw(self, prompt_id: str) -> None:
        """Take a prompt out of ComfyUI wherever it is: delete it if pending, interrupt it if running.

        Delete first, then interrupt: whichever state it is in by then, one of them takes.
        Both are tried even when the first fails; the first failure is raised.
        """
        failures = []
        for step in (lambda: self.delete_queued([prompt_id]), lambda: self.interrupt(prompt_id)):
            try:
                await step()
            except ComfyUIError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    async def interrupt(self, prompt_id: str) -> None:
        """Targeted interrupt: stops ``prompt_id`` only if it is the one running."""
        await self._post_ok("/interrupt", {"prompt_id": prompt_id})

    async def delete_queued(self, prompt_ids: list[str]) -> None:
        """Remove pending prompts from the queue (no effect on the running one)."""
        await self._post_ok("/queue", {"delete": list(prompt_ids)})

    async def _post_ok(self, path: str, body: Any) -> None:
        response = await self._fetch("POST", path, body)
        if response.code != 200:
            raise ComfyUIError(f"ComfyUI answered POST {path} with HTTP {response.code}")

    async def view(self, ref: ImageRef, attempts: int = 3) -> tuple[bytes, str]:
        """Fetch an output file with its exact name, subfolder and type; (bytes, content type)."""
        query = urlencode({"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type})
        for attempt in range(1, attempts + 1):
            try:
                response = await self._fetch("GET", f"/view?{query}")
            except ComfyUIUnavailable:
                if attempt == attempts:
                    raise
            else:
                if response.code == 200:
                    content_type = response.headers.get("Content-Type", "image/png").split(";")[0].strip()
                    return response.body, content_type
                if response.code < 500 or attempt == attempts:
                    raise ComfyUIError(f"ComfyUI answered /view of {ref.filename} with HTTP {response.code}")
            await asyncio.sleep(VIEW_RETRY.delay(attempt))
        raise AssertionError("unreachable")

    async def probe(self, timeout: float = 2.0) -> tuple[dict[str, Any], QueueState]:
        """``/system_stats`` and ``/queue`` at once, each within ``timeout``: is ComfyUI there, how busy."""
        stats, queue = await asyncio.gather(self._get_json("/system_stats", request_timeout=timeout),
                                            self._get_json("/queue", request_timeout=timeout))
        return stats, parse_queue(queue)


class _Inbox:
    """One websocket's messages, handed to ``handle`` as Tornado reads them (its callback: no queue, no
    task wake-up per message; ComfyUI sends a dozen or more per job). Those that arrive before
    :meth:`open` (the connection is still being announced) wait, in order, until then."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.early: list[str | bytes] | None = []
        self.closed = asyncio.get_running_loop().create_future()

    def received(self, message: str | bytes | None) -> None:
        if message is None:
            if not self.closed.done():
                self.closed.set_result(None)
        elif self.early is not None:
            self.early.append(message)
        else:
            self._handle(message)

    async def open(self) -> None:
        """Handle what came early, then each message as it comes; returns when the connection closes."""
        early, self.early = self.early or [], None
        for message in early:
            self._handle(message)
        await self.closed

    def _handle(self, message: str | bytes) -> None:
        try:
            self.handle(message)
        except Exception:  # one odd message must not end the connection's reader
            log.exception("ignoring a ComfyUI websocket message that could not be handled")


def _multipart(boundary: str, parts: list[tuple[str, str | None, str | None, bytes]]) -> bytes:
    """A multipart/form-data body: (field, file name or None, content type or None, bytes) per part."""
    out = []
    for field_name, filename, content_type, data in parts:
        disposition = f'form-data; name="{field_name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n"
        out.append(head.encode() + b"\r\n" + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def _unavailable(url: str, exc: Any) -> ComfyUIUnavailable:
    timed_out = isinstance(exc, TornadoTimeoutError) or (
        isinstance(exc, HTTPClientError) and exc.code == 599 and "timeout" in str(exc).lower())
    kind = ComfyUITimeout if timed_out else ComfyUIUnavailable
    return kind(f"ComfyUI is not reachable at {url}: {_describe(exc)}")


def _describe(exc: Any) -> str:
    if isinstance(exc, StreamClosedError) and exc.real_error is not None:
        exc = exc.real_error
    text = str(exc) if exc is not None else ""
    return text or type(exc).__name__
