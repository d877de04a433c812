"""The scheduler's pool client resolves worker addresses in place and names through the system."""

import socket

import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import Resolver, bind_sockets
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from t2i.resolver import LiteralFirstResolver, literal_address


class RecordingResolver(Resolver):
    """A fallback that answers every name with loopback and remembers what it was asked."""

    def initialize(self) -> None:
        self.asked: list[str] = []

    async def resolve(self, host, port, family=socket.AF_UNSPEC):
        self.asked.append(host)
        return [(socket.AF_INET, ("127.0.0.1", port))]


class Hello(web.RequestHandler):
    def get(self):
        self.write("hello")


def test_literals_are_answered_by_family():
    assert literal_address("10.0.0.11", 8001, socket.AF_UNSPEC) == [(socket.AF_INET, ("10.0.0.11", 8001))]
    assert literal_address("[::1]", 8001, socket.AF_UNSPEC) == [(socket.AF_INET6, ("::1", 8001, 0, 0))]
    assert literal_address("127.0.0.1", 80, socket.AF_INET6) is None   # a family the address is not
    assert literal_address("gpu-a.lan", 8001, socket.AF_UNSPEC) is None
    assert literal_address("10.0.0.256", 8001, socket.AF_UNSPEC) is None


@pytest.mark.gen_test(timeout=10)
async def test_addresses_skip_the_fallback_and_names_use_it():
    fallback = RecordingResolver()
    resolver = LiteralFirstResolver(fallback=fallback)
    assert await resolver.resolve("127.0.0.1", 9) == [(socket.AF_INET, ("127.0.0.1", 9))]
    assert fallback.asked == []
    assert await resolver.resolve("worker.invalid", 9) == [(socket.AF_INET, ("127.0.0.1", 9))]
    assert fallback.asked == ["worker.invalid"]


@pytest.mark.gen_test(timeout=10)
async def test_a_client_with_it_reaches_a_server_by_address_without_asking_the_system():
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(web.Application([(r"/", Hello)]))
    server.add_sockets(sockets)
    fallback = RecordingResolver()
    client = SimpleAsyncHTTPClient(force_instance=True, resolver=LiteralFirstResolver(fallback=fallback))
    try:
        response = await client.fetch(f"http://127.0.0.1:{sockets[0].getsockname()[1]}/")
        assert response.body == b"hello" and fallback.asked == []
    finally:
        client.close()
        server.stop()
