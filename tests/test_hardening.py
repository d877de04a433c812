"""Hostile clients and careless edits (issue 16): each finding, tried the way it was found.

Idle sockets against a worker under systemd's default file limit, deeply nested JSON,
the token in curl's debug trace, NUL bytes and symlinks in served paths, cross-site
content types, 405s, an emptied workers.yaml, and a ComfyUI whose /view sends no image.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from tornado import web

from support.cluster import WorkerCluster, call, start_scheduler, start_sim, wait_status, write_worker_yaml
from support.net import free_port
from support.processes import WorkerProcess
from support.timing import until
from t2i.cli import RedactCredentials
from t2i.serve import connection_cap, serve
from t2i.web import LOG_URI_CHARS, JSONHandler

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


async def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, dict, dict]:
    """One request written by hand (for what HTTP clients will not send): (status, headers, JSON body)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(head.encode() + f"Host: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                     + body)
        answer = await reader.read()
    finally:
        writer.close()
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(payload) if payload else None


# --- 1. idle connections --------------------------------------------------------------

def _limit_files_to_1024() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))  # systemd's default


@pytest.mark.gen_test(timeout=60)
async def test_1100_idle_sockets_do_not_take_down_a_worker_under_1024_files(tmp_path):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counts the worker's open files in /proc")
    sim = await start_sim(step_time=0.01)
    port = free_port()
    worker = WorkerProcess(write_worker_yaml(tmp_path / "worker", sim.url, port=port), f"http://127.0.0.1:{port}",
                           preexec_fn=_limit_files_to_1024)
    idle: list[socket.socket] = []
    try:
        await worker.start()
        closed: set[socket.socket] = set()

        def worker_files() -> int:
            return len(os.listdir(f"/proc/{worker.proc.pid}/fd"))

        def closed_by_the_worker() -> int:
            for sock in idle:
                if sock not in closed:
                    try:
                        if sock.recv(1) == b"":
                            closed.add(sock)
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:  # reset
                        closed.add(sock)
            return len(closed)

        # 1100 sockets that never send a byte, 100 at a time, each batch taken in before the next (a flood
        # faster than the accept queue leaves half-open sockets that exist on this side only). The worker
        # takes them up to its cap, then closes the longest-idle ones for newer ones.
        cap, base, slack = connection_cap(1024), worker_files(), 8
        while len(idle) < 1100:
            for _ in range(100):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                idle.append(sock)
            held = min(len(idle), cap)
            await until(lambda: worker_files() >= base + held - slack, timeout=20,
                        what=f"the worker holding {held} idle connections ({len(idle)} opened)")
        await until(lambda: closed_by_the_worker() >= 1100 - cap - slack, timeout=20,
                    what=f"the worker closing {1100 - cap} idle connections to stay at its cap of {cap}")

        health = await call("GET", f"{worker.url}/health", timeout=10)
        assert health.code == 200, (health, worker.log()[-2000:])
        reply = await call("POST", f"{worker.url}/generate", {"prompt": "under siege", "steps": 2})
        assert reply.code == 200, reply
        state = await wait_status(worker.url, reply.json["prompt_id"], timeout=30)
        assert state["status"] == "completed", state
        image = await call("GET", state["image_url"])
        assert image.code == 200 and image.body.startswith(b"\x89PNG")
        size = worker.log_path.stat().st_size
        assert size < 100_000, f"the worker's log grew to {size} bytes:\n{worker.log()[-3000:]}"
        assert "Traceback" not in worker.log()
    finally:
        for sock in idle:
            sock.close()
        await worker.close()
        await sim.stop()


class _Hold(JSONHandler):
    """Answers once the test releases it (a long-poll, say)."""

    release: asyncio.Event

    async def get(self) -> None:
        await self.release.wait()
        self.write_json({"ok": True})


class _Quick(JSONHandler):
    def get(self) -> None:
        self.write_json({"ok": True})


@pytest.mark.gen_test(timeout=20)
async def test_at_the_cap_the_longest_idle_connection_goes_and_then_new_ones_get_503():
    _Hold.release = asyncio.Event()
    app = web.Application([(r"/hold", _Hold), (r"/quick", _Quick)])
    sockets = [socket.create_server(("127.0.0.1", 0))]
    sockets[0].setblocking(False)
    server = serve(app, sockets, max_body_size=4096, max_connections=3)
    base = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    streams = []
    try:
        for _ in range(3):
            streams.append(await asyncio.open_connection("127.0.0.1", sockets[0].getsockname()[1]))
        await until(lambda: len(server._connections) == 3, what="3 idle connections")
        # Full of idle connections: a request still gets in, and the oldest idle one is closed for it.
        assert (await call("GET", base + "/quick")).code == 200
        assert await asyncio.wait_for(streams[0][0].read(), 10) == b""
        for reader, writer in streams[1:]:
            writer.close()
        await until(lambda: not server._connections, what="the idle connections gone")
        # Full of busy connections: nothing to close, so a new one is told to come back.
        held = [asyncio.ensure_future(call("GET", base + "/hold")) for _ in range(3)]
        await until(lambda: len(server._connections) == 3 and not server._idle, what="3 busy connections")
        status, headers, body = await raw_request(base, "GET /quick HTTP/1.1\r\n")
        assert status == 503 and headers["Retry-After"] == "1" and body["error"]
        _Hold.release.set()
        assert [reply.code for reply in await asyncio.gather(*held)] == [200, 200, 200]
    finally:
        server.stop()
        await server.close_all_connections()


class _EMFILESocket(socket.socket):
    """A listening socket whose accept() always fails as a process out of descriptors does."""

    accepts = 0

    def accept(self):
        type(self).accepts += 1
        raise OSError(errno.EMFILE, "Too many open files")


@pytest.mark.gen_test(timeout=20)
async def test_accept_errors_pause_accepting_and_are_logged_once(caplog):
    sock = _EMFILESocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    server = serve(web.Application([]), [sock], max_body_size=4096)
    client = socket.create_connection(sock.getsockname())  # makes the listening socket readable, for good
    try:
        with caplog.at_level(logging.DEBUG, logger="t2i.serve"):
            await until(lambda: _EMFILESocket.accepts >= 3, what="three accept attempts")
        lines = [r for r in caplog.records if r.name == "t2i.serve" and r.levelno >= logging.WARNING]
        # Retried after a pause, not in a loop: one attempt per pause, and one line for all of them.
        assert len(lines) == 1 and "Too many open files" in lines[0].getMessage(), lines
        assert _EMFILESocket.accepts < 10
    finally:
        client.close()
        server.stop()


# --- 2. deeply nested JSON --------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_deeply_nested_json_is_a_400_on_both_servers(tmp_path):
    async with WorkerCluster(tmp_path / "w") as c:
        scheduler = await start_scheduler(tmp_path / "s", [c.worker])
        try:
            for base in (c.url, scheduler.url):
                for body in (b"[" * 2000, b'{"prompt": ' + b"[" * 100 + b"]" * 100 + b"}"):
                    reply = await call("POST", f"{base}/generate", raw=body)
                    assert reply.code == 400 and "nested" in reply.json["error"], (base, reply)
        finally:
            await scheduler.stop()


# --- 3. the token in logs ----------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_the_token_is_never_logged_by_a_scheduler_at_debug(tmp_path):
    """The scheduler's curl client at --log-level debug, following a worker's feed and forwarding a job."""
    pytest.importorskip("pycurl")
    token = "s3cret-" + uuid.uuid4().hex
    async with WorkerCluster(tmp_path / "w", auth_token=token) as c:
        port = free_port()
        (tmp_path / "workers.yaml").write_text(yaml.safe_dump({"workers": [{"name": "gpu-a", "url": c.url}]}))
        config = tmp_path / "scheduler.yaml"
        config.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{port}", "workers_file": "workers.yaml",
                                          "auth_token": token, "health_interval": 0.2}))
        log_path = tmp_path / "scheduler.log"
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "t2i.scheduler", "--config", str(config), "--log-level", "debug",
                "--http-client", "curl", cwd=ROOT, stdout=log, stderr=asyncio.subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            async def feed_up() -> bool:
                try:
                    reply = await call("GET", base + "/workers", timeout=2)
                except ConnectionError:
                    return False
                return reply.code == 200 and reply.json["workers"][0]["feed"]["state"] == "up"

            await until(feed_up, timeout=30, what="the scheduler following the worker's feed")
            reply = await call("POST", base + "/generate", {"prompt": "a fox", "steps": 2})
            assert reply.code == 200, reply
            assert (await wait_status(base, reply.json["prompt_id"]))["status"] == "completed"
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 15)
    text = log_path.read_text(errors="replace")
    assert "DEBUG" in text  # it did log at debug
    assert token not in text, [line for line in text.splitlines() if token in line][:5]


def test_credentials_are_redacted_from_any_log_line():
    record = logging.LogRecord("tornado.curl_httpclient", logging.DEBUG, __file__, 1, "%s %s",
                               (">", "Authorization: Bearer abc123"), None)
    assert RedactCredentials().filter(record)
    assert record.getMessage() == "> Authorization: Bearer [redacted]"
    for line, redacted in [("Authorization: Basic dXNlcjpwdw==", "Authorization: Basic [redacted]"),
                           ("authorization: abc123", "authorization: [redacted]"),
                           ("sent 'Bearer abc123', got 401", "sent 'Bearer [redacted]', got 401")]:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, line, None, None)
        RedactCredentials().filter(record)
        assert record.getMessage() == redacted


# --- 4 and 5. paths: NUL bytes, symlinks ---------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_nul_bytes_in_paths_are_json_404s(tmp_path):
    async with WorkerCluster(tmp_path / "w") as c:
        scheduler = await start_scheduler(tmp_path / "s", [c.worker])
        try:
            for url in (f"{scheduler.url}/%00", f"{scheduler.url}/static/x%00.js", f"{scheduler.url}/a%00/b",
                        f"{c.url}/images/%00", f"{c.url}/images/{uuid.uuid4()}_0.png%00"):
                reply = await call("GET", url)
                assert reply.code == 404 and reply.json["error"], (url, reply)
                assert reply.headers["Content-Type"].startswith("application/json")
        finally:
            await scheduler.stop()


def _validate_as_tornado_6_5(self, root, absolute_path):
    """StaticFileHandler.validate_absolute_path as Tornado < 6.6 has it: the path as written, symlinks followed."""
    root = os.path.abspath(root) + os.path.sep
    if not (absolute_path + os.path.sep).startswith(root):
        raise web.HTTPError(403, "%s is not in root static directory", self.path)
    if os.path.isdir(absolute_path) and self.default_filename is not None:
        absolute_path = os.path.join(absolute_path, self.default_filename)
    if not os.path.exists(absolute_path):
        raise web.HTTPError(404)
    if not os.path.isfile(absolute_path):
        raise web.HTTPError(403, "%s is not a file", self.path)
    return absolute_path


@pytest.mark.parametrize("tornado_check", ["installed", "6.5"])
@pytest.mark.gen_test(timeout=30)
async def test_symlinks_out_of_images_and_static_are_refused(tmp_path, monkeypatch, tornado_check):
    if tornado_check == "6.5":
        monkeypatch.setattr(web.StaticFileHandler, "validate_absolute_path", _validate_as_tornado_6_5)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>t2i</title>")
    (static / "app.js").write_text("console.log('t2i');")
    (static / "leak.js").symlink_to(secret)
    (static / "inside.js").symlink_to(static / "app.js")  # a link that stays inside is fine
    async with WorkerCluster(tmp_path / "w") as c:
        planted = f"{uuid.uuid4()}_0.png"
        (tmp_path / "w" / "images" / planted).symlink_to(secret)
        scheduler = await start_scheduler(tmp_path / "s", [c.worker], static_dir=str(static))
        try:
            for url in (f"{c.url}/images/{planted}", f"{scheduler.url}/leak.js", f"{scheduler.url}/static/leak.js"):
                reply = await call("GET", url)
                assert reply.code == 404 and reply.json["error"], (url, reply)
                assert b"root:" not in reply.body
            assert (await call("GET", f"{scheduler.url}/static/inside.js")).body == b"console.log('t2i');"
            assert (await call("GET", f"{scheduler.url}/")).code == 200
            # A real image is still served.
            state = await c.wait(await c.submit({"prompt": "x", "steps": 2}))
            assert (await call("GET", state["image_url"])).code == 200
        finally:
            await scheduler.stop()


# --- 6. content types -------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_post_bodies_that_are_not_json_are_415_on_both_servers(tmp_path):
    body = json.dumps({"prompt": "sent by another site"}).encode()
    async with WorkerCluster(tmp_path / "w") as c:
        scheduler = await start_scheduler(tmp_path / "s", [c.worker])
        try:
            prompt_id = await c.submit({"prompt": "x", "steps": 50})
            for base in (c.url, scheduler.url):
                for route in ("/generate", f"/cancel/{prompt_id}"):
                    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                                         "multipart/form-data; boundary=x"):
                        reply = await call("POST", base + route, raw=body, headers={"Content-Type": content_type})
                        assert reply.code == 415 and "application/json" in reply.json["error"], (route, reply)
                    # No Content-Type at all: what a cross-site fetch with no body sends.
                    status, _, answer = await raw_request(base, f"POST {route} HTTP/1.1\r\n", body)
                    assert status == 415 and answer["error"], (base, route, answer)
            assert (await c.wait(prompt_id, "running", predicate=lambda s: s["status"] == "running"))
            assert len(c.sim.submitted) == 1  # nothing above reached ComfyUI
            reply = await call("POST", scheduler.url + "/generate", raw=body,
                               headers={"Content-Type": "Application/JSON; charset=utf-8"})
            assert reply.code == 200, reply
            assert (await call("POST", f"{c.url}/cancel/{prompt_id}")).code == 200  # an empty JSON body is fine
        finally:
            await scheduler.stop()


# --- 7. 405 and long URIs ------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_405_is_json_with_allow_everywhere_and_long_uris_are_logged_short(tmp_path, caplog):
    async with WorkerCluster(tmp_path / "w") as c:
        scheduler = await start_scheduler(tmp_path / "s", [c.worker])
        try:
            cases = [("GET", "/generate", "POST"), ("DELETE", "/generate", "POST"), ("POST", "/health", "GET"),
                     ("POST", "/metrics", "GET"), ("POST", "/openapi.json", "GET"), ("GET", "/cancel/x", "POST")]
            for base in (c.url, scheduler.url):
                for method, path, allow in cases:
                    reply = await call(method, base + path)
                    assert reply.code == 405 and reply.json["error"], (method, base + path, reply)
                    assert reply.headers["Allow"] == allow, (method, path, reply.headers)
            for base, path in ((c.url, f"/images/{uuid.uuid4()}_0.png"), (scheduler.url, "/app.js")):
                reply = await call("POST", base + path)
                assert reply.code == 405 and reply.headers["Allow"] == "GET, HEAD" and reply.json["error"]
            # A body a route would refuse does not hide that the method is wrong.
            reply = await call("PUT", c.url + "/generate", raw=b"x", headers={"Content-Type": "text/plain"})
            assert reply.code == 405 and reply.headers["Allow"] == "POST"

            caplog.set_level(logging.DEBUG, logger="t2i.access")
            long_query = "x=" + "a" * 60_000
            assert (await call("GET", f"{c.url}/health?{long_query}")).code == 200
            lines = [r.getMessage() for r in caplog.records if r.name == "t2i.access" and "/health?x=" in r.getMessage()]
            assert lines and all(len(line) < LOG_URI_CHARS + 100 for line in lines), lines
            assert f"({len('/health?' + long_query)} chars)" in lines[0]
        finally:
            await scheduler.stop()


# --- 8. an emptied workers.yaml ----------------------------------------------------------------

def test_a_workers_yaml_without_a_workers_list_stops_the_scheduler_at_start(tmp_path):
    for text in ("", "# every worker commented out\n", "workers:\n"):
        (tmp_path / "workers.yaml").write_text(text)
        config = tmp_path / "scheduler.yaml"
        config.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{free_port()}", "workers_file": "workers.yaml"}))
        result = subprocess.run([sys.executable, "-m", "t2i.scheduler", "--config", str(config)], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, (text, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "workers.yaml" in lines[0] and "workers" in lines[0], result.stderr


@pytest.mark.gen_test(timeout=30)
async def test_emptying_workers_yaml_while_running_keeps_the_last_good_list(tmp_path, caplog):
    async with WorkerCluster(tmp_path / "w") as c:
        scheduler = await start_scheduler(tmp_path / "s", [c.worker])
        try:
            (tmp_path / "s" / "workers.yaml").write_text("# emptied by mistake\n")

            async def config_error():
                reply = await call("GET", scheduler.url + "/workers")
                return reply.json if reply.json["config"]["error"] else None

            listing = await until(config_error, what="the reload refused")
            assert "workers.yaml" in listing["config"]["error"] and "workers" in listing["config"]["error"]
            assert [w["name"] for w in listing["workers"]] == [c.worker.config.name]
            assert any("workers.yaml" in r.getMessage() and r.levelno >= logging.ERROR for r in caplog.records)
            reply = await call("POST", scheduler.url + "/generate", {"prompt": "still routed", "steps": 2})
            assert reply.code == 200, reply
        finally:
            await scheduler.stop()


# --- 9. what ComfyUI's /view sends -------------------------------------------------------------

@pytest.mark.parametrize("content_type, data, why", [
    ("image/png", b"Not Found: the file you asked for\n", "not a PNG, JPEG, WebP or GIF"),
    ("image/jpeg", PNG, "the bytes are image/png but were served as image/jpeg"),
    ("text/html", PNG, "served as text/html"),
])
@pytest.mark.gen_test(timeout=30)
async def test_a_view_that_sends_no_image_fails_the_job(tmp_path, monkeypatch, content_type, data, why):
    from t2i.comfy_sim.handlers import ViewHandler

    async def misbehaving_view(self):
        self.set_header("Content-Type", content_type)
        self.finish(data)

    monkeypatch.setattr(ViewHandler, "get", misbehaving_view)
    async with WorkerCluster(tmp_path) as c:
        state = await c.wait(await c.submit({"prompt": "x", "steps": 2}))
        assert state["status"] == "failed" and why in state["error"], state
        assert state["image_url"] is None
        assert not [p for p in (tmp_path / "images").iterdir() if not p.name.startswith(".")]


@pytest.mark.gen_test(timeout=30)
async def test_an_image_served_as_octet_stream_is_stored_by_its_bytes(tmp_path, monkeypatch):
    """ComfyUI sends application/octet-stream for extensions it does not know: the bytes decide."""
    from t2i.comfy_sim.handlers import ViewHandler

    async def octet_stream_view(self):
        self.set_header("Content-Type", "application/octet-stream")
        self.finish(b"\xff\xd8\xff\xe0" + b"\x00" * 64)

    monkeypatch.setattr(ViewHandler, "get", octet_stream_view)
    async with WorkerCluster(tmp_path) as c:
        state = await c.wait(await c.submit({"prompt": "x", "steps": 2}))
        assert state["status"] == "completed" and state["image_url"].endswith(".jpg"), state
        image = await call("GET", state["image_url"])
        assert image.code == 200 and image.headers["Content-Type"] == "image/jpeg"
