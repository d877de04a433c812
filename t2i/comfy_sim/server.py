"""``ComfySim``: a Tornado server that speaks ComfyUI 0.3.64's HTTP + websocket protocol.

This module holds the server's state and lifecycle (start, stop, restart, the
websocket registry and message routing); handlers.py has the routes, engine.py
the queue and executor.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import struct
import tempfile
import weakref
from typing import Any

from tornado import httpserver, netutil, web

from .engine import Executor
from .handlers import NotFoundHandler, WebSocketHandler, routes

log = logging.getLogger("t2i.comfy_sim")


class ComfySim:
    """A ComfyUI 0.3.64 test double on a real socket. See t2i/comfy_sim/__init__.py for the knobs."""

    def __init__(self, step_time: float = 0.05, output_dir: str | None = None, previews: bool = False,
                 checkpoints=("v1-5-pruned-emaonly.safetensors",), input_dir: str | None = None):
        self.step_time = float(step_time)
        if output_dir is None:
            # One temp folder of our own (output/ and the .input beside it), removed with the sim or at exit.
            owned = tempfile.mkdtemp(prefix="comfy-sim-")
            weakref.finalize(self, shutil.rmtree, owned, True)
            output_dir = os.path.join(owned, "output")
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = os.path.abspath(output_dir)
        # POST /upload/image writes to input/ (LoadImage reads it); nothing writes temp/ (no PreviewImage).
        self.input_dir = os.path.abspath(input_dir or self.output_dir + ".input")
        os.makedirs(self.input_dir, exist_ok=True)
        self.directories = {"output": self.output_dir, "input": self.input_dir, "temp": self.output_dir + ".temp"}
        self.rename_uploads = False  # True: every upload is stored as "<name> (1).png", as if that name were taken
        self.uploads: list[dict] = []  # what POST /upload/image answered, in order
        self.previews = bool(previews)
        self.checkpoints = tuple(checkpoints)
        self.stall = False
        self.pending_failures: list[dict] = []
        self.submitted: list[tuple[str, dict, dict]] = []
        self.interrupts: list[Any] = []
        self.sockets: dict[str, "WebSocketHandler"] = {}
        self.sockets_metadata: dict[str, dict] = {}
        self.port: int | None = None
        self.address = "127.0.0.1"
        self._server: httpserver.HTTPServer | None = None
        self._handlers: set["WebSocketHandler"] = set()
        self._generation = 0
        self._executor = Executor(self)

    # ------------------------------------------------------------- public knobs and state
    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.address in ("", "0.0.0.0", "::") else self.address
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def history(self) -> dict:
        return self._executor.history

    @property
    def queue_running(self) -> list:
        return self._executor.running_items()

    @property
    def queue_pending(self) -> list:
        return self._executor.pending_items()

    @property
    def number(self) -> int:
        """The next queue number POST /prompt hands out (settable, e.g. to mirror a long-running server)."""
        return self._executor.number

    @number.setter
    def number(self, value: int) -> None:
        self._executor.number = value

    def fail_next(self, node_type: str = "KSampler", message: str = "CUDA out of memory",
                  exception_type: str = "RuntimeError", after_steps: int = 0) -> None:
        """The next execution of a ``node_type`` node raises: at its start, or before progress step
        ``after_steps + 1`` when ``after_steps`` > 0 (nodes with a progress bar only)."""
        self.pending_failures.append({"node_type": node_type, "message": message,
                                      "exception_type": exception_type, "after_steps": int(after_steps)})

    def drop_websockets(self) -> None:
        """Abort every websocket now (no close frame). The server and the running prompt carry on."""
        for handler in list(self._handlers):
            handler.abort()

    # ------------------------------------------------------------- lifecycle
    async def start(self, port: int = 0, address: str = "127.0.0.1") -> int:
        if self._server is not None:
            raise RuntimeError("ComfySim is already running")
        sockets = await self._bind(port, address)
        app = web.Application(routes(self), default_handler_class=NotFoundHandler,
                              default_handler_args={"sim": self}, log_function=_log_request)
        self._server = httpserver.HTTPServer(app, max_buffer_size=200 * 1024 * 1024)
        self._server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self.address = address
        self._generation += 1
        self._executor.start()
        log.info("comfy_sim listening on %s (output %s)", self.url, self.output_dir)
        return self.port

    @staticmethod
    async def _bind(port: int, address: str):
        for attempt in range(50):
            try:
                return netutil.bind_sockets(port, address)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or port == 0 or attempt == 49:
                    raise
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Like SIGTERM: sockets end without a close frame, the queue and history are gone."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        self._generation += 1
        for handler in list(self._handlers):
            handler.abort()
        self._handlers.clear()
        self.sockets.clear()
        self.sockets_metadata.clear()
        executor, self._executor = self._executor, Executor(self)
        await executor.kill()
        try:
            await asyncio.wait_for(server.close_all_connections(), 2)
        except asyncio.TimeoutError:
            pass

    async def restart(self) -> int:
        """stop(), then start() on the same port: number 0, empty queue and history, cold cache."""
        port, address = self.port or 0, self.address
        await self.stop()
        return await self.start(port=port, address=address)

    # ------------------------------------------------------------- messaging (server.py send_*)
    def queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": self._executor.tasks_remaining()}}

    def queue_updated(self) -> None:
        self.send_json("status", {"status": self.queue_info()}, None)

    def _targets(self, sid: str | None) -> list:
        if sid is None:
            return list(self.sockets.values())
        handler = self.sockets.get(sid)
        return [handler] if handler is not None else []

    def send_json(self, event: str, data: dict, sid: str | None = None) -> None:
        message = json.dumps({"type": event, "data": data})
        for handler in self._targets(sid):
            handler.send(message, binary=False)

    def send_bytes(self, event_type: int, payload: bytes, sid: str | None = None) -> None:
        message = struct.pack(">I", event_type) + payload
        for handler in self._targets(sid):
            handler.send(message, binary=True)

    def supports_preview_metadata(self, sid: str | None) -> bool:
        meta = self.sockets_metadata.get(sid) if sid is not None else None
        return bool(meta) and meta["feature_flags"].get("supports_preview_metadata", False) is True

    def _ws_opened(self, handler: "WebSocketHandler", sid: str) -> None:
        self._handlers.add(handler)
        self.sockets[sid] = handler
        self.sockets_metadata[sid] = {"feature_flags": {}}

    def _ws_closed(self, handler: "WebSocketHandler") -> None:
        self._handlers.discard(handler)
        if handler.generation == self._generation and handler.sid is not None:
            # ComfyUI pops by clientId, even when a newer socket took that id over.
            self.sockets.pop(handler.sid, None)
            self.sockets_metadata.pop(handler.sid, None)


def _log_request(handler: web.RequestHandler) -> None:
    log.debug("%d %s %.1fms", handler.get_status(), handler._request_summary(), 1000 * handler.request.request_time())
