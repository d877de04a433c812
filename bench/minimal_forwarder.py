"""The floor under the scheduler's CPU per job (``bench/cpu_bench.py``): a minimal Tornado app that takes
``POST /generate`` and passes its body to one worker with the client the scheduler uses (Tornado's curl
client, connections kept alive), then the worker's answer back. Nothing else: no validation, placement,
mirror, access log or metrics.

    python -m bench.minimal_forwarder PORT WORKER_URL
"""

from __future__ import annotations

import asyncio
import signal
import sys

from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets


class Forward(web.RequestHandler):
    async def post(self) -> None:
        response = await self.settings["client"].fetch(
            self.settings["upstream"] + "/generate", method="POST", body=self.request.body,
            headers={"Content-Type": "application/json"}, raise_error=False)
        self.set_status(response.code)
        self.set_header("Content-Type", "application/json")
        self.finish(response.body)


async def main(port: int, upstream: str) -> None:
    AsyncHTTPClient.configure("tornado.curl_httpclient.CurlAsyncHTTPClient")
    app = web.Application([(r"/generate", Forward)], client=AsyncHTTPClient(), upstream=upstream.rstrip("/"))
    HTTPServer(app).add_sockets(bind_sockets(port, "127.0.0.1"))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
