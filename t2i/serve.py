"""The HTTP server both t2i servers run: timeouts, a cap on connections, an accept loop that survives EMFILE.

Browsers reach both servers (the page on the scheduler, images on the workers), so
either may face clients that open sockets and send nothing, or half a request:

* ``idle_connection_timeout``: a connection that sends no (complete) request head
  for this long is closed (Tornado's default is an hour);
* ``body_timeout``: a request body must arrive within this;
* a cap on open connections, below the process's open-file limit (RLIMIT_NOFILE), so
  descriptors stay free for ComfyUI, the image store, the journal and the workers. At
  the cap a new connection closes the connection idle longest (one between requests or
  still sending its head); when none is idle it gets a 503 and is closed;
* accept errors (EMFILE when the limit is reached anyway) pause accepting for a moment
  and are logged at most once a minute, instead of a traceback per loop iteration.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import time
from typing import Any, Awaitable, Callable

from tornado import httputil
from tornado.http1connection import HTTP1ServerConnection
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

log = logging.getLogger(__name__)

IDLE_CONNECTION_TIMEOUT = 60.0   # seconds without a complete request head, between or before requests
BODY_TIMEOUT = 60.0              # seconds to receive a request body (bodies are capped at max_body_bytes)
FD_RESERVE = 256                 # descriptors kept for everything but inbound connections (at least)
UNLIMITED_FILES = 65536          # what RLIM_INFINITY counts as
# listen(2)'s queue of connections not yet accepted: thousands of browsers polling may connect within one
# turn of the event loop (Tornado's default of 128 overflowed at 1,000 polls/s; the kernel caps it at
# net.core.somaxconn, 4096 on current Linux).
LISTEN_BACKLOG = 4096
ACCEPT_BATCH = 128               # connections accepted per readiness event (Tornado's own figure)
ACCEPT_PAUSE = 0.5               # seconds without accepting after an accept error (asyncio pauses 1 s)
LOG_EVERY = 60.0                 # seconds between two log lines about the same trouble
# Resource errors of accept(2): transient, the listening socket stays readable, so retrying at once spins.
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
BUSY_BODY = b'{"error": "The server has too many open connections; try again in a moment."}'
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=UTF-8\r\n"
                 b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(BUSY_BODY)) + BUSY_BODY


def open_file_limit() -> int:
    """The process's soft RLIMIT_NOFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNLIMITED_FILES if soft == resource.RLIM_INFINITY else soft


def connection_cap(limit: int | None = None) -> int:
    """How many inbound connections to hold at most: the open-file limit less a reserve
    (FD_RESERVE, or an eighth of the limit when that is more)."""
    limit = open_file_limit() if limit is None else limit
    return max(16, limit - max(FD_RESERVE, limit // 8))


class Throttled:
    """A log line at most once per ``interval`` seconds; the ones held back are counted in the next."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_EVERY,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: float | None = None
        self.suppressed = 0

    def __call__(self, level: int, message: str, *args: Any) -> bool:
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            message += f" ({self.suppressed} more like it since the last such line)"
            self.suppressed = 0
        self._last = now
        self.logger.log(level, message, *args)
        return True


class Server(HTTPServer):
    """Tornado's HTTPServer with the limits above; ``serve()`` builds one."""

    def initialize(self, *args: Any, max_connections: int | None = None, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.max_connections = max_connections or connection_cap()
        # Connections waiting for a request head, oldest first (dicts keep insertion order).
        self._idle: dict[HTTP1ServerConnection, None] = {}
        self._log_accept = Throttled(log)
        self._log_full = Throttled(log)

    # --- accepting ---------------------------------------------------------------------

    def add_sockets(self, sockets: Any) -> None:
        # TCPServer.add_sockets with our accept loop; stop() uses the same two tables.
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = self._accept_loop(sock)

    def _accept_loop(self, sock: socket.socket) -> Callable[[], None]:
        """Accept on ``sock``; returns the function that stops it (as netutil.add_accept_handler)."""
        io_loop = IOLoop.current()
        state: dict[str, Any] = {"stopped": False, "paused": None}

        def on_readable(fd: Any, events: int) -> None:
            for _ in range(ACCEPT_BATCH):
                if state["stopped"]:
                    return
                try:
                    connection, address = sock.accept()
                except BlockingIOError:
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as exc:
                    self._accept_failed(exc)
                    io_loop.remove_handler(sock)
                    state["paused"] = io_loop.call_later(ACCEPT_PAUSE, resume)
                    return
                if not self._room_for_one():
                    _refuse(connection)
                    continue
                self._handle_connection(connection, address)  # logs its own errors

        def resume() -> None:
            state["paused"] = None
            if not state["stopped"]:
                io_loop.add_handler(sock, on_readable, IOLoop.READ)

        def stop() -> None:
            state["stopped"] = True
            if state["paused"] is not None:
                io_loop.remove_timeout(state["paused"])
            else:
                io_loop.remove_handler(sock)

        io_loop.add_handler(sock, on_readable, IOLoop.READ)
        return stop

    def _accept_failed(self, exc: OSError) -> None:
        if exc.errno in RESOURCE_ERRORS:
            self._log_accept(logging.ERROR, "cannot accept connections: %s (open-file limit %d, %d connections "
                             "open); pausing %.1f s", exc.strerror or exc, open_file_limit(),
                             len(self._connections), ACCEPT_PAUSE)
        else:
            self._log_accept(logging.ERROR, "accept failed: %s; pausing %.1f s", exc, ACCEPT_PAUSE)

    def _room_for_one(self) -> bool:
        """Below the cap, or made so by closing the longest-idle connection."""
        if len(self._connections) < self.max_connections:
            return True
        if not self._idle:
            self._log_full(logging.WARNING, "%d connections open (the cap) and none idle: refusing new ones "
                           "with 503", len(self._connections))
            return False
        oldest = next(iter(self._idle))
        del self._idle[oldest]
        # Counted out now: its serving loop notices the closed stream (and calls on_close) a little later.
        self._connections.discard(oldest)
        oldest.stream.close()
        self._log_full(logging.WARNING, "%d connections open (the cap, from an open-file limit of %d): "
                       "closing the longest-idle ones for new ones", self.max_connections, open_file_limit())
        return True

    # --- which connections are idle ------------------------------------------------------

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection
                      ) -> httputil.HTTPMessageDelegate:
        # Called when a connection starts waiting for its next request head.
        self._idle.pop(server_conn, None)  # type: ignore[call-overload]
        self._idle[server_conn] = None  # type: ignore[index]
        return _Busy(super().start_request(server_conn, request_conn), self._idle, server_conn)

    def on_close(self, server_conn: object) -> None:
        self._idle.pop(server_conn, None)  # type: ignore[call-overload]
        self._connections.discard(server_conn)  # type: ignore[arg-type]


class _Busy(httputil.HTTPMessageDelegate):
    """Passes a request through; once its head is in, its connection is no longer idle."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate, idle: dict, server_conn: object):
        self.delegate = delegate
        self.idle = idle
        self.server_conn = server_conn

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        self.idle.pop(self.server_conn, None)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()


def _refuse(connection: socket.socket) -> None:
    """A short 503 and close, without waiting for the client (best effort)."""
    try:
        connection.setblocking(False)
        connection.send(BUSY_RESPONSE)
    except OSError:
        pass
    finally:
        connection.close()


def serve(app: Any, sockets: list[socket.socket], *, max_body_size: int,
          max_connections: int | None = None) -> Server:
    """Serve ``app`` on ``sockets`` with t2i's limits; returns the server (``stop()``,
    ``close_all_connections()``)."""
    server = Server(app, max_body_size=max_body_size, idle_connection_timeout=IDLE_CONNECTION_TIMEOUT,
                    body_timeout=BODY_TIMEOUT, max_connections=max_connections)
    server.add_sockets(sockets)
    log.debug("serving on %s: at most %d connections (open-file limit %d), idle timeout %.0f s, "
              "body timeout %.0f s", ", ".join(str(s.getsockname()[:2]) for s in sockets),
              server.max_connections, open_file_limit(), IDLE_CONNECTION_TIMEOUT, BODY_TIMEOUT)
    return server
