"""One streamed ``GET /jobs?stream=1`` answer read over a plain asyncio connection.

The scheduler follows every worker's change feed as one long chunked answer. Tornado's client reads it
through its general HTTP/1 machinery (a coroutine per chunk, iostream buffers, a gzip wrapper that does
nothing here), which cost more scheduler CPU per job than applying the lines did. This reader speaks only
the little HTTP/1.1 a feed needs: one GET with ``Connection: close``, a status line and headers, then a
chunked body (or one with a Content-Length, or one that ends with the connection), each piece handed to
a sink as it arrives. The connection is closed at once when the follower is done with it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from typing import Protocol
from urllib.parse import urlsplit

from t2i.waiters import done_within

MAX_HEAD = 65536            # bytes of status line and headers
MAX_SIZE_LINE = 1024        # bytes of a chunk's size line (with extensions)
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")

_default_tls: ssl.SSLContext | None = None


def default_tls() -> ssl.SSLContext:
    """The system's certificates, as Tornado's client checks them (built once: loading them is slow)."""
    global _default_tls
    if _default_tls is None:
        _default_tls = ssl.create_default_context()
    return _default_tls


class Sink(Protocol):
    def head(self, code: int, content_type: str) -> None:
        """The answer's status and Content-Type, before any of its body."""

    def data(self, chunk: bytes) -> None:
        """The next bytes of the body (chunk boundaries are the network's, not the lines')."""


async def read_feed(url: str, headers: dict[str, str], sink: Sink, *, connect_timeout: float,
                    request_timeout: float, until: asyncio.Future | None = None,
                    tls: ssl.SSLContext | None = None) -> str | None:
    """GET ``url`` and hand its answer to ``sink``; None when the answer was read to its end or ``until``
    was done first, else what went wrong (refused, reset, timed out, not HTTP). The connection is closed
    when this returns or is cancelled. ``request_timeout`` counts from the start, connecting included."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"cannot read {url!r}: not an http(s) URL"
    try:
        port = parts.port or (443 if https else 80)
    except ValueError as exc:
        return f"cannot read {url!r}: {exc}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc.rpartition('@')[2]}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    loop = asyncio.get_running_loop()
    deadline = loop.time() + request_timeout
    reader = FeedProtocol(sink, request, loop.create_future())
    try:
        # An IP literal is used as it is (asyncio's fast path): no resolver thread per stream.
        connecting = await done_within(loop.create_connection(lambda: reader, parts.hostname, port,
                                                              ssl=(tls or default_tls()) if https else None),
                                       min(connect_timeout, request_timeout))
    except asyncio.CancelledError:
        if reader.transport is not None:  # connected just as the follower was told to stop
            reader.transport.abort()
        raise
    if not connecting.done():
        return f"Timeout while connecting to {parts.hostname}:{port}"
    exc = connecting.exception()
    if isinstance(exc, (OSError, ValueError)):  # refused, unreachable, unresolvable, a TLS handshake refused
        return f"cannot connect to {parts.hostname}:{port}: {exc or type(exc).__name__}"
    transport, _ = connecting.result()
    try:
        waits = {reader.done} if until is None else {reader.done, until}
        await asyncio.wait(waits, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
        if reader.done.done():
            return reader.done.result()  # raises what the sink raised: a bug, not the network's
        if until is not None and until.done():
            return None
        return "Timeout during request"
    finally:
        transport.abort()


class FeedProtocol(asyncio.Protocol):
    """The HTTP/1.1 client side of one request: ``done`` is set with None once the answer ended, or with
    what went wrong; what the sink raises is set as ``done``'s exception."""

    def __init__(self, sink: Sink, request: bytes, done: asyncio.Future):
        self.sink = sink
        self.request = request
        self.done = done
        self.transport: asyncio.Transport | None = None
        self._buffer = b""         # bytes not parsed yet (a head or a size line cut by the network)
        self._in_head = True
        self._chunked = False
        self._left = -1            # body bytes still to come: of this chunk (chunked) or of the body; -1: to the close
        self._crlf = False         # a chunk's data was read, its CRLF not yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        try:
            if self._in_head:
                data = self._head(data)
            if data and not self.done.done():
                if self._chunked:
                    self._chunks(data)
                else:
                    self._body(data)
        except Exception as exc:  # the sink's: raised where the follower awaits the answer
            self._end(exc)

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost says whether the answer was whole

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self._left == -1 and not self._in_head and not self._chunked and exc is None:
            self._end(None)  # a body that lasts until the close
        elif exc is not None:
            self._end(f"connection lost: {exc}")
        else:
            self._end("the connection closed before the answer ended")

    def _end(self, outcome: str | Exception | None) -> None:
        if not self.done.done():
            if isinstance(outcome, Exception):
                self.done.set_exception(outcome)
            else:
                self.done.set_result(outcome)
        if self.transport is not None:
            self.transport.abort()

    def _head(self, data: bytes) -> bytes:
        """Parse the status line and headers; the bytes after them (b"" until they are whole)."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD:
                self._end("the answer's headers are too long")
            else:
                self._buffer = data
            return b""
        head, data = data[:end].decode("latin-1").split("\r\n"), data[end + 4:]
        status = head[0].split(" ", 2)
        if len(status) < 2 or not status[0].startswith("HTTP/1.") or not status[1].isdigit():
            self._end(f"not an HTTP/1 answer: {head[0][:80]!r}")
            return b""
        code = int(status[1])
        if 100 <= code < 200:  # an interim answer: the real one follows
            return self._head(data) if data else b""
        content_type, length, chunked = "", None, False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-type":
                content_type = value.strip()
            elif name == "content-length":
                length = value.strip()
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
        self._in_head = False
        self.sink.head(code, content_type)
        if chunked:
            self._chunked, self._left = True, 0
        elif code in (204, 304):
            self._end(None)
        elif length is not None:
            if not length.isdigit():
                self._end(f"the answer's Content-Length is not a number: {length[:40]!r}")
                return b""
            self._left = int(length)
            if self._left == 0:
                self._end(None)
        return data

    def _body(self, data: bytes) -> None:
        if self._left == -1:
            self.sink.data(data)
            return
        if len(data) >= self._left:
            data = data[:self._left]
            self._left = 0
            self.sink.data(data)
            self._end(None)
        else:
            self._left -= len(data)
            self.sink.data(data)

    def _chunks(self, data: bytes) -> None:
        """Chunked framing: ``<hex size>[;ext]\\r\\n<data>\\r\\n`` ... ``0\\r\\n`` (trailers not read)."""
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                self._left -= take
                self._crlf = not self._left
                self.sink.data(data if take == end else data[pos:pos + take])
                pos += take
                continue
            if self._crlf:
                if end - pos < 2:
                    self._buffer = data[pos:]
                    return
                if data[pos:pos + 2] != b"\r\n":
                    self._end("malformed chunked answer: no CRLF after a chunk")
                    return
                pos += 2
                self._crlf = False
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                if end - pos > MAX_SIZE_LINE:
                    self._end("malformed chunked answer: a chunk size line too long")
                else:
                    self._buffer = data[pos:]
                return
            size = data[pos:newline].rstrip(b"\r").split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size):
                self._end(f"malformed chunked answer: chunk size {size[:20]!r}")
                return
            pos = newline + 1
            self._left = int(size, 16)
            if not self._left:
                self._end(None)  # the last chunk: the answer is whole (Connection: close, trailers unread)
                return
