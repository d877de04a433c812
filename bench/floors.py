"""Same-run floors for ``bench/cpu_bench.py``: the least a server on t2i's stack (a Tornado server,
Tornado's curl client with connections kept alive, its ``websocket_connect``) costs per job.

``forwarder``, under the scheduler: takes ``POST /generate`` and passes its body to one worker, then the
worker's answer back. Nothing else: no validation, placement, mirror, access log or metrics.

``wrapper``, under the worker: a minimal ComfyUI wrapper. ``POST /generate`` fills t2i's txt2img template
(prompt, seed, steps, size) and POSTs it to ComfyUI under its own prompt_id; the websocket's ``executed``
names the image and ``execution_success`` ends the run; then one ``GET /view``, and
``GET /result/{id}?wait=S`` answers with the image's bytes. Nothing else: no checks beyond that, no
journal, no image on disk, no feed, no retries, no queue of its own, no access log, no metrics.

    python -m bench.floors forwarder PORT WORKER_URL
    python -m bench.floors wrapper PORT COMFYUI_URL
"""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import sys
import uuid
from pathlib import Path
from urllib.parse import urlencode

from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.websocket import websocket_connect

TEMPLATE = json.loads((Path(__file__).resolve().parent.parent / "t2i" / "workflows" / "txt2img.json").read_text())


# --- the forwarder ------------------------------------------------------------------------------------

class Forward(web.RequestHandler):
    async def post(self) -> None:
        response = await self.settings["client"].fetch(
            self.settings["upstream"] + "/generate", method="POST", body=self.request.body,
            headers={"Content-Type": "application/json"}, raise_error=False)
        self.set_status(response.code)
        self.set_header("Content-Type", "application/json")
        self.finish(response.body)


# --- the ComfyUI wrapper ------------------------------------------------------------------------------

class Wrapper:
    def __init__(self, comfy_url: str):
        self.comfy_url = comfy_url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.http = AsyncHTTPClient()
        self.outputs: dict[str, dict] = {}             # prompt_id -> its first image ref (from `executed`)
        self.images: dict[str, asyncio.Future] = {}    # prompt_id -> its image's bytes

    async def connect(self) -> None:
        url = self.comfy_url.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}"
        for _ in range(300):  # ComfyUI may still be starting: the bench starts everything at once
            try:
                await websocket_connect(url, on_message_callback=self.on_message, max_message_size=64 * 1024 * 1024)
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise SystemExit(f"ComfyUI at {self.comfy_url} does not answer")

    def on_message(self, message: str | bytes | None) -> None:
        if not isinstance(message, str):
            return
        msg = json.loads(message)
        data = msg.get("data") or {}
        prompt_id = data.get("prompt_id")
        if msg.get("type") == "executed" and prompt_id in self.images:
            images = (data.get("output") or {}).get("images") or []
            if images:
                self.outputs.setdefault(prompt_id, images[0])
        elif msg.get("type") == "execution_success" and prompt_id in self.outputs:
            asyncio.ensure_future(self.view(prompt_id))

    async def view(self, prompt_id: str) -> None:
        ref = self.outputs.pop(prompt_id)
        query = urlencode({"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                           "type": ref.get("type", "output")})
        response = await self.http.fetch(f"{self.comfy_url}/view?{query}", raise_error=False)
        future = self.images.get(prompt_id)
        if future is not None and not future.done():
            future.set_result(response.body)

    async def submit(self, body: dict) -> str:
        prompt_id = str(uuid.uuid4())
        workflow = copy.deepcopy(TEMPLATE)
        workflow["6"]["inputs"]["text"] = body.get("prompt", "")
        workflow["7"]["inputs"]["text"] = body.get("negative_prompt", "")
        workflow["3"]["inputs"].update(seed=body.get("seed", 0), steps=body.get("steps", 20))
        workflow["5"]["inputs"].update(width=body.get("width", 512), height=body.get("height", 512))
        workflow["9"]["inputs"]["filename_prefix"] = f"t2i_{prompt_id}"
        self.images[prompt_id] = asyncio.get_running_loop().create_future()
        await self.http.fetch(self.comfy_url + "/prompt", method="POST", headers={"Content-Type": "application/json"},
                              body=json.dumps({"prompt": workflow, "client_id": self.client_id,
                                               "prompt_id": prompt_id}))
        return prompt_id


class Generate(web.RequestHandler):
    async def post(self) -> None:
        prompt_id = await self.settings["wrapper"].submit(json.loads(self.request.body))
        self.finish({"prompt_id": prompt_id})


class Result(web.RequestHandler):
    async def get(self, prompt_id: str) -> None:
        future = self.settings["wrapper"].images.get(prompt_id)
        if future is None:
            raise web.HTTPError(404)
        wait = float(self.get_query_argument("wait", "0"))
        try:
            image = await asyncio.wait_for(asyncio.shield(future), wait)
        except asyncio.TimeoutError:
            self.set_status(202)
            self.finish({"status": "running"})
            return
        del self.settings["wrapper"].images[prompt_id]
        self.set_header("Content-Type", "image/png")
        self.finish(image)


async def forwarder_app(upstream: str) -> web.Application:
    return web.Application([(r"/generate", Forward)], client=AsyncHTTPClient(), upstream=upstream.rstrip("/"))


async def wrapper_app(comfy_url: str) -> web.Application:
    wrapper = Wrapper(comfy_url)
    await wrapper.connect()
    return web.Application([(r"/generate", Generate), (r"/result/([^/]+)", Result)], wrapper=wrapper)


async def serve(kind: str, port: int, url: str) -> None:
    """Serve the ``kind`` floor on 127.0.0.1:``port`` until SIGTERM."""
    AsyncHTTPClient.configure("tornado.curl_httpclient.CurlAsyncHTTPClient")
    app = await {"forwarder": forwarder_app, "wrapper": wrapper_app}[kind](url)
    HTTPServer(app).add_sockets(bind_sockets(port, "127.0.0.1"))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
