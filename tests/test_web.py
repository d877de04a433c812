"""The shared handler base: JSON errors, body cap, query numbers, and the request log."""

import logging

import pytest
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from t2i.web import APIError, JSONBodyHandler, JSONHandler, NotFoundHandler, log_request


class EchoHandler(JSONBodyHandler):
    def post(self):
        self.write_json({"got": self.get_json_body()})


class FailHandler(JSONHandler):
    def get(self, status):
        if status == "crash":
            raise RuntimeError("secret internals")
        raise APIError(int(status), "Told to fail.", field=None, hint="x")


class HealthHandler(JSONHandler):
    def get(self):
        self.write_json({"ok": True})


class WaitHandler(JSONHandler):
    def get(self):
        self.write_json({"wait": self.get_number_argument("wait", float, 0.0)})


@pytest.fixture
def server(io_loop):
    app = web.Application([(r"/echo", EchoHandler, {"max_body_bytes": 2048}), (r"/fail/(\w+)", FailHandler),
                           (r"/health", HealthHandler), (r"/wait", WaitHandler)],
                          default_handler_class=NotFoundHandler, log_function=log_request)
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(app)
    server.add_sockets(sockets)
    yield f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    server.stop()


async def fetch(url, **kwargs):
    import json
    if kwargs.get("method") == "POST":
        kwargs["headers"] = {"Content-Type": "application/json", **kwargs.get("headers", {})}
    response = await AsyncHTTPClient().fetch(url, raise_error=False, **kwargs)
    return response.code, response.headers, json.loads(response.body) if response.body else None


@pytest.mark.gen_test(timeout=10)
async def test_errors_are_json_sentences_never_traces(server):
    code, headers, body = await fetch(server + "/fail/crash")
    assert code == 500 and body == {"error": "Internal server error."}
    assert headers["Content-Type"].startswith("application/json")
    code, _, body = await fetch(server + "/fail/409")
    assert code == 409 and body == {"error": "Told to fail.", "hint": "x"}  # a None detail is left out
    code, _, body = await fetch(server + "/no/such/route")
    assert code == 404 and "/no/such/route" in body["error"]


@pytest.mark.gen_test(timeout=10)
async def test_bodies_bad_json_and_over_the_cap(server):
    code, _, body = await fetch(server + "/echo", method="POST", body='{"a": 1}')
    assert code == 200 and body == {"got": {"a": 1}}
    code, _, body = await fetch(server + "/echo", method="POST", body="{nope")
    assert code == 400 and "not valid JSON" in body["error"]
    code, _, body = await fetch(server + "/echo", method="POST", body="")
    assert code == 400 and "empty" in body["error"]
    code, _, body = await fetch(server + "/echo", method="POST", body="x" * 5000)
    assert code == 413 and "2048" in body["error"]


@pytest.mark.gen_test(timeout=10)
async def test_query_numbers_are_checked(server):
    assert (await fetch(server + "/wait?wait=2.5"))[2] == {"wait": 2.5}
    for bad in ("abc", "-1", "nan"):
        code, _, body = await fetch(server + f"/wait?wait={bad}")
        assert code == 400 and body["field"] == "wait", bad


@pytest.mark.gen_test(timeout=10)
async def test_request_log_levels_and_no_tokens(server, caplog):
    caplog.set_level(logging.DEBUG, logger="t2i.access")
    await fetch(server + "/fail/crash", headers={"Authorization": "Bearer s3cret-token"})
    await fetch(server + "/fail/503")
    await fetch(server + "/fail/400")
    await fetch(server + "/health")
    await fetch(server + "/echo", method="POST", body="{}")
    levels = {record.getMessage().split()[2]: record.levelno for record in caplog.records
              if record.name == "t2i.access"}
    assert levels["/fail/crash"] == logging.ERROR
    assert levels["/fail/503"] == logging.INFO  # backpressure, not a fault
    assert levels["/fail/400"] == logging.WARNING
    assert levels["/health"] == logging.DEBUG
    assert levels["/echo"] == logging.INFO
    assert "s3cret-token" not in caplog.text


@pytest.mark.gen_test(timeout=10)
async def test_an_upload_cut_short_leaves_no_handler_behind(server):
    """A client that sends half its body and hangs up: the handler must not wait for the rest forever."""
    import asyncio
    from urllib.parse import urlsplit

    def stuck_handlers():
        return [task for task in asyncio.all_tasks() if "_execute" in repr(task.get_coro())]

    before = len(stuck_handlers())
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", urlsplit(server).port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"{" * 100)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
    for _ in range(50):
        if len(stuck_handlers()) == before:
            break
        await asyncio.sleep(0.02)
    assert len(stuck_handlers()) == before
