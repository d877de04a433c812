"""A control port for the ComfyUI test double: its fault knobs over HTTP, for tests and benches
that run it as a process (``python -m t2i.comfy_sim --control-port N``).

Not part of ComfyUI's protocol, and on its own port so that ComfyUI's routes stay exactly
ComfyUI's. It listens on 127.0.0.1 only. Every answer is JSON; every POST answers with the
state after the change:

    GET  /control/state              the knobs and the queue (ids), history size, counters
    POST /control/stall              {"on": true|false}    running prompts freeze / go on
    POST /control/drop-websockets    {}                    abort every websocket now ("dropped": n)
    POST /control/restart            {}                    like a ComfyUI restart: queue and history lost
    POST /control/stop               {}                    like SIGTERM; the port refuses connections
    POST /control/start              {}                    listen again on the same port (409 when up)
    POST /control/fail-next          {"node_type": "KSampler", "message": "...",
                                      "exception_type": "RuntimeError", "after_steps": 0}   (all optional)
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from tornado import httpserver, netutil, web
from tornado.httputil import responses

if TYPE_CHECKING:
    from .server import ComfySim

log = logging.getLogger("t2i.comfy_sim.control")

ADDRESS = "127.0.0.1"
FAIL_NEXT_FIELDS = {"node_type": str, "message": str, "exception_type": str, "after_steps": int}
MAX_BODY = 64 * 1024


class ControlError(web.HTTPError):
    def __init__(self, status: int, message: str):
        super().__init__(status)
        self.message = message


def state_of(sim: "ComfySim", control: "ControlServer") -> dict[str, Any]:
    return {
        "url": sim.url if sim.port else None,
        "running": sim.running,
        "stall": sim.stall,
        "pending_failures": [dict(f) for f in sim.pending_failures],
        "queue_running": [item[1] for item in sim.queue_running],
        "queue_pending": [item[1] for item in sim.queue_pending],
        "history": len(sim.history),
        "number": sim.number,
        "websockets": len(sim.sockets),
        "submitted": len(sim.submitted),
        "interrupts": len(sim.interrupts),
        "restarts": control.restarts,
        "dropped_websockets": control.dropped,
    }


class ControlHandler(web.RequestHandler):
    """Base: JSON answers and errors, and a JSON object body for POSTs."""

    allow = "POST"

    def initialize(self, sim: "ComfySim", control: "ControlServer") -> None:
        self.sim = sim
        self.control = control

    def answer(self, extra: dict[str, Any] | None = None) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({**state_of(self.sim, self.control), **(extra or {})}))

    def body(self) -> dict[str, Any]:
        raw = self.request.body
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            raise ControlError(400, "The request body is not valid JSON.") from None
        if not isinstance(value, dict):
            raise ControlError(400, "The request body must be a JSON object.")
        return value

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "message", None) or f"{responses.get(status_code, 'Error')}."
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        if status_code == 405:
            self.set_header("Allow", self.allow)
        self.finish(json.dumps({"error": message}))

    def log_exception(self, typ, value, tb) -> None:
        if not isinstance(value, ControlError):
            super().log_exception(typ, value, tb)


class StateHandler(ControlHandler):
    allow = "GET"

    def get(self) -> None:
        """The knobs and the queue."""
        self.answer()


class StallHandler(ControlHandler):
    def post(self) -> None:
        """``{"on": bool}``: running prompts freeze before their next step (silently), or go on."""
        on = self.body().get("on")
        if not isinstance(on, bool):
            raise ControlError(400, "Send {\"on\": true} or {\"on\": false}.")
        self.sim.stall = on
        log.info("control: stall %s", "on" if on else "off")
        self.answer()


class DropWebsocketsHandler(ControlHandler):
    def post(self) -> None:
        """Abort every websocket now, without a close frame; prompts carry on."""
        self.body()
        dropped = len(self.sim.sockets)
        self.sim.drop_websockets()
        self.control.dropped += dropped
        log.info("control: dropped %d websocket(s)", dropped)
        self.answer({"dropped": dropped})


class RestartHandler(ControlHandler):
    async def post(self) -> None:
        """Stop and start on the same port: queue and history lost, queue number back to 0."""
        self.body()
        await self.sim.restart()
        self.control.restarts += 1
        log.info("control: restarted")
        self.answer()


class StopHandler(ControlHandler):
    async def post(self) -> None:
        """Like SIGTERM: sockets end without a close frame; connections are refused until start."""
        self.body()
        await self.sim.stop()
        log.info("control: stopped")
        self.answer()


class StartHandler(ControlHandler):
    async def post(self) -> None:
        """Listen again on the port it had (queue and history empty)."""
        self.body()
        if self.sim.running:
            raise ControlError(409, "The test double is already running.")
        await self.sim.start(port=self.sim.port or 0, address=self.sim.address)
        self.control.restarts += 1
        log.info("control: started")
        self.answer()


class FailNextHandler(ControlHandler):
    def post(self) -> None:
        """The next execution of a node of ``node_type`` raises (see ComfySim.fail_next)."""
        body = self.body()
        for name, value in body.items():
            kind = FAIL_NEXT_FIELDS.get(name)
            if kind is None:
                raise ControlError(400, f"Unknown field {name!r}; allowed: {', '.join(FAIL_NEXT_FIELDS)}.")
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
                raise ControlError(400, f"`{name}` must be a {'non-negative integer' if kind is int else 'string'}.")
        self.sim.fail_next(**body)
        log.info("control: fail next %s", body or "KSampler")
        self.answer()


class NotFound(ControlHandler):
    def prepare(self) -> None:
        raise ControlError(404, "No such control route; see GET /control/state.")


def control_routes(sim: "ComfySim", control: "ControlServer") -> list:
    args = {"sim": sim, "control": control}
    return [(pattern, handler, args) for pattern, handler in [
        (r"/control/state", StateHandler),
        (r"/control/stall", StallHandler),
        (r"/control/drop-websockets", DropWebsocketsHandler),
        (r"/control/restart", RestartHandler),
        (r"/control/stop", StopHandler),
        (r"/control/start", StartHandler),
        (r"/control/fail-next", FailNextHandler),
    ]]


class ControlServer:
    """The control API of one ComfySim: ``await ControlServer(sim).start(port)`` (0: any), ``.url``, ``stop()``."""

    def __init__(self, sim: "ComfySim"):
        self.sim = sim
        self.port: int | None = None
        self.restarts = 0
        self.dropped = 0
        self._server: httpserver.HTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{ADDRESS}:{self.port}"

    async def start(self, port: int = 0) -> int:
        routes = control_routes(self.sim, self)
        app = web.Application(routes, default_handler_class=NotFound,
                              default_handler_args={"sim": self.sim, "control": self},
                              log_function=lambda handler: None)
        self._server = httpserver.HTTPServer(app, max_body_size=MAX_BODY)
        sockets = netutil.bind_sockets(port, ADDRESS)
        self._server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            await server.close_all_connections()
