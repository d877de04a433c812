"""``GET /status/{id}`` and ``GET /result/{id}`` answered from the mirror before Tornado's Application sees them.

Browsers poll ``/status`` more than anything else. Through the Application each poll builds an
``HTTPServerRequest``, finds its route, makes a ``StatusHandler`` with its header tables, runs its
coroutine and logs; a parked long-poll keeps all that, a task and a timeout for up to a minute. Here a
poll the mirror can answer (``mirror.fresh``) is answered from the job's JSON bytes as the feed brought
them, with the headers ``StatusHandler`` sends (``tests/test_status_fastpath.py`` compares the two), and
a long-poll (``?wait=S&since=V``) waits as one small object with a callback and a timer.

``GET /result/{id}[?wait=S]`` (one request to the result: every API job asks it once) is answered the
same way as ``ResultHandler`` answers it (``tests/test_result_fastpath.py`` compares the two): the
result of a finished job, else the job's status (202) when the wait is over; a parked one is woken by
each change of its job and parks again until the job ends. ``?redirect=`` goes to the handler.

Everything else goes to the Application as it came, untouched: other routes and methods, an id or a
query this does not read plainly (escapes, other arguments, bad numbers: the handler's 400s), a
conditional request (``If-None-Match``: the handler's 304), a request with a body, a job the mirror
cannot answer (the handler asks its worker). A parked long-poll whose copy went stale is passed on
the same way with no wait left, as ``StatusHandler`` then asks the worker at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from email.utils import formatdate
from typing import Any, Awaitable

import tornado
from tornado import httputil

from t2i.jobstate import MAX_WAIT
from t2i.jobstate import result_of
from t2i.metrics import POLL_REQUESTS, REJECTIONS, REQUEST_DURATION
from t2i.scheduler.mirror import Entry, Mirror
from t2i.web import short_uri

log = logging.getLogger("t2i.access")   # the access log's lines, as t2i.web.log_request writes them

PREFIX = "/status/"
ROUTE = "/status/{prompt_id}"
RESULT_PREFIX = "/result/"
RESULT_ROUTE = "/result/{prompt_id}"
SHUTTING_DOWN = "The scheduler is shutting down; ask again."   # StatusHandler's 503 too
SHUTDOWN_BODY = json.dumps({"error": SHUTTING_DOWN}).encode()     # as t2i.web.JSONHandler.write_error writes it
_POLLS = POLL_REQUESTS.labels(server="scheduler")
# Metric children resolved once (labels() per answer costs a lock and a dict lookup): route -> code -> child.
_ANSWERED = {route: {code: REQUEST_DURATION.labels("scheduler", route, "GET", f"{code // 100}xx")
                     for code in (200, 202, 503)} for route in (ROUTE, RESULT_ROUTE)}
_SHUTDOWN = REJECTIONS.labels("scheduler", ROUTE, "503", "unavailable")
# What StatusHandler's answers carry (tornado.web.RequestHandler.clear, JSONHandler.set_default_headers).
_SERVER = "TornadoServer/" + tornado.version
_REASONS = {200: "OK", 202: "Accepted", 503: "Service Unavailable"}


class StatusFastPath(httputil.HTTPServerConnectionDelegate):
    """In front of the scheduler's Application: polls the mirror answers, answered here; the rest to it."""

    def __init__(self, app: Any, mirror: Mirror, router: Any):
        self.app = app
        self.mirror = mirror
        self.router = router   # its ``closing``: parked long-polls are answered 503 at shutdown
        self._date = (0, "")

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return _Request(self, server_conn, request_conn)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)

    def date(self) -> str:
        """The Date header, formatted once a second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def take(self, request: "_Request", start_line: httputil.RequestStartLine, headers: httputil.HTTPHeaders) -> bool:
        """Answer (or park) ``request`` when it is a plain poll of a job the mirror can answer."""
        uri = start_line.path
        if (start_line.method != "GET" or "If-None-Match" in headers
                or "Content-Length" in headers or "Transfer-Encoding" in headers):
            return False
        if uri.startswith(PREFIX):
            prefix = PREFIX
        elif uri.startswith(RESULT_PREFIX):
            prefix = RESULT_PREFIX
        else:
            return False
        path, _, query = uri.partition("?")
        prompt_id = path[len(prefix):]
        if not prompt_id or "/" in prompt_id or "%" in prompt_id:
            return False
        args = _wait_args(query)
        if args is None:
            return False
        entry = self.mirror.fresh(prompt_id)
        if entry is None:
            return False
        wait, since = args
        request.prompt_id = prompt_id
        if prefix is RESULT_PREFIX:
            if since is not None or "image/" in headers.get("Accept", ""):
                # `since` is not one of /result's arguments; an image asked for by `Accept` is the
                # worker's answer (openapi.yaml): both the handler's way, whatever it does with them.
                return False
            request.uri = uri
            if wait > 0 and not entry.final:
                request.park_result(wait, headers.get("Host", ""))
            else:
                request.ready = entry
            return True
        _POLLS.inc()
        if wait > 0 and since is not None and entry.version <= since:
            request.park(since, wait, headers.get("Host", ""))
        else:
            request.ready = entry  # answered once the request is read (an answer before that closes the connection)
        return True


def _wait_args(query: str) -> tuple[float, int | None] | None:
    """(wait, since) of a query of at most ``wait`` and ``since``, each once, as plain decimal numbers;
    None for anything else (the handler reads it and says what is wrong)."""
    wait, since = 0.0, None
    if not query:
        return wait, since
    seen = set()
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name in seen or not value.isascii():
            return None
        seen.add(name)
        if name == "wait" and value.replace(".", "", 1).isdigit():
            wait = min(float(value), MAX_WAIT)
        elif name == "since" and value.isdigit():
            since = int(value)
        else:
            return None
    return wait, since


class _Request(httputil.HTTPMessageDelegate):
    """One request: answered here, parked here, or passed to the Application (``delegate``)."""

    __slots__ = ("front", "conn", "server_conn", "delegate", "started", "prompt_id", "ready", "since", "host", "timer",
                 "uri", "waker")

    def __init__(self, front: StatusFastPath, server_conn: object, request_conn: httputil.HTTPConnection):
        self.front = front
        self.conn = request_conn
        self.server_conn = server_conn
        self.delegate: httputil.HTTPMessageDelegate | None = None
        self.prompt_id: str | None = None
        self.ready: Entry | None = None      # to answer with
        self.timer: asyncio.TimerHandle | None = None
        self.uri: str | None = None          # a /result request's (None: a /status poll)

    # --- tornado's HTTPMessageDelegate ----------------------------------------------------------

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        self.started = time.monotonic()
        assert isinstance(start_line, httputil.RequestStartLine)
        if self.front.take(self, start_line, headers):
            return None
        return self._pass_on(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk) if self.delegate is not None else None

    def finish(self) -> None:
        if self.delegate is not None:
            self.delegate.finish()
        elif self.ready is not None:
            self.answer(self.ready)
            self.ready = None

    def on_connection_close(self) -> None:
        if self.delegate is not None:
            self.delegate.on_connection_close()

    # --- answering ------------------------------------------------------------------------------

    def _pass_on(self, start_line: httputil.RequestStartLine, headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        self.delegate = self.front.app.start_request(self.server_conn, self.conn)
        return self.delegate.headers_received(start_line, headers)

    def answer(self, entry: Entry) -> None:
        if self.uri is not None:
            self.answer_result(entry)
            return
        body = entry.encoded()
        self._write(200, body, ("Etag", '"%s"' % hashlib.sha1(body).hexdigest()))

    def answer_result(self, entry: Entry) -> None:
        """ResultHandler's answer (t2i.web.JSONHandler.write_result): 200 with the result of a finished
        job (and Tornado's Etag), else 202 with its status, encoded as write_json encodes."""
        code, result = result_of(entry.status)
        body = json.dumps(result, separators=(",", ":")).encode()
        if code == 200:
            self._write(code, body, ("Etag", '"%s"' % hashlib.sha1(body).hexdigest()))
        else:
            self._write(code, body)

    def _write(self, code: int, body: bytes, *extra: tuple[str, str]) -> None:
        """The answer, with StatusHandler's headers in its order (tornado.web.RequestHandler.clear,
        JSONHandler.set_default_headers, then what the answer adds)."""
        headers = httputil.HTTPHeaders({"Server": _SERVER, "Content-Type": "application/json; charset=UTF-8",
                                        "Date": self.front.date(), "Cache-Control": "no-store"})
        for name, value in extra:
            headers.add(name, value)
        headers.add("Content-Length", str(len(body)))
        self.conn.write_headers(httputil.ResponseStartLine("", code, _REASONS[code]), headers, body)
        self.conn.finish()
        elapsed = time.monotonic() - self.started
        _ANSWERED[ROUTE if self.uri is None else RESULT_ROUTE][code].observe(elapsed)
        # t2i.web.log_request's levels: /status polls are quiet, /result answers are not.
        level = logging.DEBUG if code == 200 and self.uri is None else logging.INFO
        if log.isEnabledFor(level):
            context = getattr(self.conn, "context", None)
            uri = short_uri(self.uri) if self.uri is not None else f"{PREFIX}{self.prompt_id or ''}"
            log.log(level, "%d GET %s (%s) %.1fms", code, uri, getattr(context, "remote_ip", "-"), elapsed * 1000)

    # --- parked long-polls ----------------------------------------------------------------------

    def park(self, since: int, wait: float, host: str) -> None:
        """Wait for the job's next change (StatusHandler's ``mirror.wait``), at most ``wait`` seconds."""
        self.since, self.host, self.waker = since, host, self.wake   # waker: what the mirror calls
        self.front.mirror.park(self.prompt_id, self.wake)
        self.timer = asyncio.get_running_loop().call_later(wait, self.wake)
        self.conn.set_close_callback(self._unpark)   # the browser went away: stop waiting

    def park_result(self, wait: float, host: str) -> None:
        """Wait for the job's end (ResultHandler's loop of ``mirror.wait``), at most ``wait`` seconds."""
        self.host, self.waker = host, self.wake_result
        self.front.mirror.park(self.prompt_id, self.wake_result)
        self.timer = asyncio.get_running_loop().call_later(wait, self._result_timeout)
        self.conn.set_close_callback(self._unpark)

    def wake_result(self) -> None:
        """The job changed, left the mirror or went stale: answer when it ended, else wait on."""
        if self.timer is None:
            return
        entry = self.front.mirror.fresh(self.prompt_id)
        if entry is not None and not entry.final:
            self.front.mirror.park(self.prompt_id, self.wake_result)   # a wake is once: wait for the next change
            return
        self._end_result(entry)

    def _result_timeout(self) -> None:
        if self.timer is not None:
            self._end_result(self.front.mirror.fresh(self.prompt_id))

    def _end_result(self, entry: Entry | None) -> None:
        self._unpark()
        if entry is not None:
            self.answer_result(entry)
            return
        # The copy went stale or left the mirror: the handler asks the job's worker (no wait left).
        self._handler_asks(f"{RESULT_PREFIX}{self.prompt_id}")

    def _unpark(self) -> None:
        """Stop waiting: the timer (when it has not fired), the mirror's wake-up, the close callback."""
        self.conn.set_close_callback(None)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.front.mirror.unpark(self.prompt_id, self.waker)

    def _handler_asks(self, uri: str) -> None:
        """Pass a parked request on as a plain GET of ``uri``: the handler asks the job's worker now."""
        self._pass_on(httputil.RequestStartLine("GET", uri, "HTTP/1.1"), httputil.HTTPHeaders({"Host": self.host}))
        self.delegate.finish()

    def wake(self) -> None:
        """The job changed, left the mirror or went stale, or the wait is over: answer as StatusHandler does."""
        if self.timer is None:
            return   # answered already
        self._unpark()
        if self.front.router.closing:
            _SHUTDOWN.inc()
            self._write(503, SHUTDOWN_BODY, ("Retry-After", "1"))
            return
        entry = self.front.mirror.fresh(self.prompt_id)
        if entry is not None:
            self.answer(entry)
            return
        # The copy went stale while waiting: the handler asks the worker for the state now (no wait left).
        self._handler_asks(f"{PREFIX}{self.prompt_id}?since={self.since}")
