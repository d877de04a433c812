"""The scheduler's reader of a streamed feed answer (t2i.scheduler.feedreader) against real Tornado servers:
bodies chunked at any byte, plain pages, error pages, refused connections, a stalled answer, malformed
framing, a follower that stops mid-stream (the worker sees the connection close at once), and https."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from support.net import free_port
from support.timing import until
from t2i.scheduler.feedreader import FeedProtocol, read_feed
from t2i.scheduler import mirror as mirror_module
from t2i.scheduler.mirror import Feed, FeedStream, Mirror
from test_scheduler_feed import FakeFeed, served

NDJSON = "application/x-ndjson"
JOB = {"prompt_id": "job-1", "status": "running", "version": 7, "progress": {"value": 1, "max": 2}}
MARK = {"epoch": "e1", "seq": 7, "full": False, "jobs": [], "removed": []}
BODY = b"".join(json.dumps(item).encode() + b"\n" for item in (JOB, {**JOB, "status": "completed"}, MARK))
LINES = BODY.splitlines()
TIMEOUTS = {"connect_timeout": 2, "request_timeout": 10}


class Lines:
    """A mirror as FeedStream sees it: the lines it was given, whole."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def _take_line(self, feed: Any, reader: FeedStream, line: bytes) -> None:
        self.lines.append(line)


class serving:
    """``async with serving(handlers) as url:`` a Tornado app on a loopback port (https with ``tls``)."""

    def __init__(self, handlers: list, tls: ssl.SSLContext | None = None):
        self.app = web.Application(handlers)
        self.tls = tls

    async def __aenter__(self) -> str:
        sockets = bind_sockets(0, "127.0.0.1")
        self.server = HTTPServer(self.app, ssl_options=self.tls)
        self.server.add_sockets(sockets)
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: Any) -> None:
        self.server.stop()
        await self.server.close_all_connections()


class Pieces(web.RequestHandler):
    """BODY as ndjson, cut at the byte offsets ``at`` names: each piece its own chunk on the wire."""

    async def get(self) -> None:
        self.set_header("Content-Type", NDJSON)
        cuts = [0, *map(int, filter(None, self.get_argument("at", "").split(","))), len(BODY)]
        for start, end in zip(cuts, cuts[1:]):
            self.write(BODY[start:end])
            await self.flush()
        self.finish()


class Page(web.RequestHandler):
    """A plain JSON answer (Tornado sends it with a Content-Length) with the status its path names
    (``/500/jobs``); the request's headers kept."""

    seen: list[dict[str, str]] = []

    def get(self, code: str | None = None) -> None:
        Page.seen.append(dict(self.request.headers))
        self.set_status(int(code or 200))
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"seq": 3, "code": self.get_status()}))


class Raw(web.RequestHandler):
    """Bytes written as they are on the connection, then closed: framing Tornado would not send."""

    answers: dict[str, bytes] = {}

    async def get(self, name: str) -> None:
        """``/raw/<name>`` or ``/raw/<name>/jobs`` (a mirror's feed)."""
        stream = self.request.connection.detach()
        await stream.write(Raw.answers[name])
        stream.close()


class Held(web.RequestHandler):
    """An ndjson answer that sends its headers and ``first`` line, then holds until the client goes."""

    first = b""
    closed: asyncio.Event
    requests: list[dict[str, str]] = []

    async def get(self) -> None:
        Held.requests.append(dict(self.request.headers))
        self.set_header("Content-Type", NDJSON)
        self.write(Held.first)
        await self.flush()
        await Held.closed.wait()

    def on_connection_close(self) -> None:
        Held.closed.set()


def held(first: bytes) -> type[Held]:
    Held.first, Held.closed, Held.requests = first, asyncio.Event(), []
    return Held


class Recorder:
    """A sink that keeps what it is given."""

    def __init__(self) -> None:
        self.heads: list[tuple[int, str]] = []
        self.pieces: list[bytes] = []

    def head(self, code: int, content_type: str) -> None:
        self.heads.append((code, content_type))

    def data(self, chunk: bytes) -> None:
        self.pieces.append(chunk)

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)


def streamed(lines: Lines) -> FeedStream:
    return FeedStream(lines, None)  # type: ignore[arg-type]


@pytest.mark.gen_test(timeout=30)
async def test_lines_cut_at_any_byte_across_chunks_reach_the_mirror_whole():
    async with serving([(r"/jobs", Pieces)]) as url:
        cuts = [str(at) for at in range(1, len(BODY))]
        for query in [*cuts, ",".join(cuts)]:  # two chunks cut at each byte, then one byte per chunk
            lines = Lines()
            stream = streamed(lines)
            assert await read_feed(f"{url}/jobs?at={query}", {}, stream, **TIMEOUTS) is None
            assert (stream.code, stream.ndjson, lines.lines) == (200, True, LINES), query


@pytest.mark.gen_test(timeout=30)
async def test_the_chunked_framing_itself_may_arrive_cut_at_any_byte():
    # A real Tornado server's answer, bytes as they were on the wire ...
    async with serving([(r"/jobs", Pieces)]) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /jobs?at=5,40,41 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        wire = await reader.read()
        writer.close()
    assert b"Transfer-Encoding: chunked" in wire
    # ... read in two pieces cut at each byte (inside the head, a size line, a CRLF, a line), then byte by byte.
    loop = asyncio.get_running_loop()
    for pieces in [*([wire[:at], wire[at:]] for at in range(1, len(wire))), [bytes([b]) for b in wire]]:
        lines = Lines()
        protocol = FeedProtocol(streamed(lines), b"", loop.create_future())
        for piece in pieces:
            protocol.data_received(piece)
        assert protocol.done.done() and protocol.done.result() is None
        assert lines.lines == LINES


@pytest.mark.gen_test(timeout=20)
async def test_a_plain_page_and_an_error_page_are_read_whole(monkeypatch):
    def resolving(*args: Any, **kwargs: Any):
        raise AssertionError("an IP address was resolved (a thread per stream)")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", resolving)
    async with serving([(r"/(?:(\d+)/)?jobs", Page)]) as url:
        for code in (200, 404, 500):
            sink = Recorder()
            assert await read_feed(f"{url}/{code}/jobs", {"Accept": "x/y"}, sink, **TIMEOUTS) is None
            assert sink.heads == [(code, "application/json")]
            assert json.loads(sink.body) == {"seq": 3, "code": code}
        sent = Page.seen[-1]
        assert sent["Host"] == url.removeprefix("http://") and sent["Connection"] == "close"
        assert sent["Accept"] == "x/y" and "Accept-Encoding" not in sent


@pytest.mark.gen_test(timeout=20)
async def test_a_mirror_takes_an_error_page_or_a_plain_page_as_it_did():
    async with serving([(r"/(?:(\d+)/)?jobs", Page)]) as url:
        mirror, feed = following(f"{url}/500", auth_token="secret")
        assert await mirror._stream_once(feed) == "GET /jobs answered 500"
        assert Page.seen[-1]["Authorization"] == "Bearer secret"
        assert Page.seen[-1]["Accept"] == f"{NDJSON}, application/json" and "Accept-Encoding" not in Page.seen[-1]
        # A plain page of another epoch (this one names none): listed again, as a long-poll's page would be.
        mirror, feed = following(url)
        assert await mirror._stream_once(feed) is None and feed.epoch is None


@pytest.mark.gen_test(timeout=20)
async def test_an_answer_piling_up_past_the_bound_is_an_error_and_closed(monkeypatch):
    monkeypatch.setattr(mirror_module, "MAX_UNREAD_BYTES", 20)
    class CutAt21(Pieces):
        def get_argument(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
            return "21" if name == "at" else default

    async with serving([(r"/(?:(\d+)/)?jobs", Page), (r"/lines/jobs", CutAt21)]) as url:
        mirror, feed = following(url)  # a plain page of 26 bytes
        assert await mirror._stream_once(feed) == "GET /jobs answered more than 0 MB"
        mirror, feed = following(f"{url}/lines")  # 21 bytes of its first line, then the rest
        assert await mirror._stream_once(feed) == "GET /jobs streamed a line of more than 0 MB"


@pytest.mark.gen_test(timeout=20)
async def test_a_refused_or_timed_out_connection_is_an_error_string():
    port = free_port()
    error = await read_feed(f"http://127.0.0.1:{port}/jobs", {}, Recorder(), **TIMEOUTS)
    assert error.startswith(f"cannot connect to 127.0.0.1:{port}:") and "111" in error, error
    mirror, feed = following(f"http://127.0.0.1:{port}")
    assert (await mirror._stream_once(feed)).startswith("cannot connect")
    async with serving([(r"/jobs", Page)]) as url:  # one that listens, given no time to connect
        error = await read_feed(f"{url}/jobs", {}, Recorder(), connect_timeout=0, request_timeout=10)
        assert error == f"Timeout while connecting to {url.removeprefix('http://')}"


@pytest.mark.gen_test(timeout=20)
async def test_an_answer_that_stalls_after_its_headers_times_out_and_is_closed():
    async with serving([(r"/jobs", held(b'{"seq":1'))]) as url:
        sink = Recorder()
        error = await read_feed(f"{url}/jobs", {}, sink, connect_timeout=2, request_timeout=0.3)
        assert error == "Timeout during request"
        assert sink.heads == [(200, NDJSON)] and sink.body == b'{"seq":1'
        await until(Held.closed.is_set, timeout=5, what="the server to see the connection close")


@pytest.mark.gen_test(timeout=20)
async def test_malformed_or_cut_answers_are_error_strings():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
    Raw.answers = {
        "size": head + b"zz\r\n{}\r\n0\r\n\r\n",
        "crlf": head + b"2\r\n{}XX3\r\n",
        "cut": head + b"3\r\n{}\n\r\n",                       # closed before the last chunk
        "status": b"SMTP ready\r\n\r\n",
        "length": b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{}",
        "to-close": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + json.dumps(MARK).encode(),
    }
    async with serving([(r"/raw/([\w-]+)(?:/jobs)?", Raw)]) as url:
        outcomes = {}
        for name in Raw.answers:
            sink = Recorder()
            outcomes[name] = await read_feed(f"{url}/raw/{name}", {}, sink, **TIMEOUTS)
        assert outcomes["size"] == "malformed chunked answer: chunk size b'zz'"
        assert outcomes["crlf"] == "malformed chunked answer: no CRLF after a chunk"
        assert outcomes["cut"] == outcomes["length"] == "the connection closed before the answer ended"
        assert outcomes["status"] == "not an HTTP/1 answer: 'SMTP ready'"
        assert outcomes["to-close"] is None and json.loads(sink.body) == MARK  # a body that ends with the close
        mirror, feed = following(f"{url}/raw/size")
        assert await mirror._stream_once(feed) == "malformed chunked answer: chunk size b'zz'"


@pytest.mark.gen_test(timeout=20)
async def test_what_the_sink_raises_is_raised_to_the_follower():
    class Broken(Recorder):
        def data(self, chunk: bytes) -> None:
            raise RuntimeError("a bug in the mirror")

    async with serving([(r"/jobs", Pieces)]) as url:
        with pytest.raises(RuntimeError, match="a bug in the mirror"):
            await read_feed(f"{url}/jobs", {}, Broken(), **TIMEOUTS)


@pytest.mark.gen_test(timeout=20)
async def test_a_follower_done_with_a_stream_closes_it_at_once():
    mark = json.dumps({**MARK, "seq": 8}).encode() + b"\n"
    async with serving([(r"/jobs", held(mark + b"not json\n"))]) as url:
        mirror, feed = following(url, feed_wait=60)  # the worker would hold the answer for up to a minute
        assert await mirror._stream_once(feed) == "GET /jobs streamed a line that is not JSON"
        assert feed.seq == 8  # the mark before it was applied
        await until(Held.closed.is_set, timeout=5, what="the worker to see the connection close")


@pytest.mark.gen_test(timeout=20)
async def test_unfollowing_a_worker_closes_its_stream_at_once():
    async with serving([(r"/jobs", held(b""))]) as url:
        mirror, feed = following(url, feed_wait=60)
        task = asyncio.ensure_future(mirror._stream_once(feed))
        await until(lambda: Held.requests, what="the stream asked for")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(Held.closed.is_set, timeout=5, what="the worker to see the connection close")


@pytest.mark.gen_test(timeout=30)
async def test_a_mirror_streams_a_real_feed_and_stops_it_at_once():
    class HeldFeed(FakeFeed):
        def app(self) -> web.Application:
            plain = super().app().wildcard_router.rules[0].target
            feed = self

            class Jobs(plain):
                async def get(self):
                    if self.get_argument("stream", "0") != "1":
                        return await super().get()
                    feed.queries.append({k: self.get_argument(k) for k in self.request.arguments})
                    self.set_header("Content-Type", NDJSON)
                    page = feed.page(int(self.get_argument("since")), None, 0)
                    for job in page["jobs"]:  # the batch in one-byte chunks
                        for byte in json.dumps(job).encode() + b"\n":
                            self.write(bytes([byte]))
                            await self.flush()
                    self.write(json.dumps({**page, "jobs": []}) + "\n")
                    await self.flush()
                    await feed.closed.wait()

                def on_connection_close(self):
                    feed.closed.set()

            return web.Application([(r"/jobs", Jobs)])

    async with served(HeldFeed()) as fake:
        fake.closed = asyncio.Event()
        fake.put("job-1", "pending")
        mirror = Mirror(feed_wait=60)
        feed = mirror.follow("w", lambda: fake.url)
        await until(lambda: any(q.get("stream") == "1" for q in fake.queries), what="a stream")
        await until(lambda: feed.up and mirror.get("job-1") is not None, what="listed")
        await mirror.stop()
        await until(fake.closed.is_set, timeout=5, what="the worker to see the connection close")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (for a throw-away certificate)")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.mark.gen_test(timeout=20)
async def test_an_https_feed_is_read_and_its_certificate_checked(certificate):
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with serving([(r"/jobs", Pieces)], tls=server_tls) as url:
        lines = Lines()
        trusting = ssl.create_default_context(cafile=str(cert))
        assert await read_feed(f"{url}/jobs?at=3,50", {}, streamed(lines), tls=trusting, **TIMEOUTS) is None
        assert lines.lines == LINES
        # The system's certificates (the default) do not vouch for a self-signed one.
        error = await read_feed(f"{url}/jobs", {}, Recorder(), **TIMEOUTS)
        assert "CERTIFICATE_VERIFY_FAILED" in error, error


def following(url: str, **kwargs: Any) -> tuple[Mirror, Feed]:
    """A mirror and a feed of ``url`` that is up and listed (epoch e1, seq 7): the next read is a stream."""
    mirror = Mirror(**kwargs)
    feed = Feed("w", lambda: url)
    feed.up, feed.epoch, feed.seq = True, "e1", 7
    return mirror, feed
