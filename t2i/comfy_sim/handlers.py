"""Tornado handlers of the ComfyUI test double: ComfyUI 0.3.64's routes, also under /api.

Status codes, body shapes and websocket routing follow ComfyUI's server.py as
recorded in tests/recordings/ (see /work/shared/comfyui/PROTOCOL.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import mimetypes
import os
import sys
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse, urlsplit

from tornado import web, websocket

from .engine import SENSITIVE_EXTRA_DATA_KEYS
from .imaging import decode_png_rgb, jpeg_of_rows
from .nodes import NODE_CLASSES
from .validation import validate_prompt

if TYPE_CHECKING:
    from .server import ComfySim

log = logging.getLogger("t2i.comfy_sim")
SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": 104857600}
TROUBLE = "500 Internal Server Error\n\nServer got itself in trouble"


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def csrf_forbidden(request) -> bool:
    """ComfyUI's origin_only_middleware: a loopback Host with a different Origin gets 403."""
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if host is None or origin is None:
        return False
    host_domain = host.lower()
    parsed = urlparse(origin)
    origin_domain = parsed.netloc.lower()
    host_parsed = urlsplit("//" + host_domain)
    try:
        origin_port, host_port = parsed.port, host_parsed.port
    except ValueError:
        return False
    loopback = _is_loopback(host_parsed.hostname)
    if origin_port is None:
        host_domain = host_parsed.hostname
    if host_port is None:
        origin_domain = parsed.hostname
    return bool(loopback and host_domain and origin_domain and host_domain != origin_domain)


# ----------------------------------------------------------------- HTTP handlers

class BaseHandler(web.RequestHandler):
    def initialize(self, sim: "ComfySim") -> None:
        self.sim = sim

    def prepare(self):
        if csrf_forbidden(self.request):
            self.empty(403)

    def compute_etag(self):
        return None

    def json_body(self) -> Any:
        return json.loads(self.request.body.decode("utf-8"))

    def reply(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(body))

    def empty(self, status: int = 200) -> None:
        self.set_status(status)
        self.clear_header("Content-Type")
        self.finish()

    def write_error(self, status_code: int, **kwargs) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(TROUBLE if status_code == 500 else f"{status_code}: {self._reason}")

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, web.HTTPError):
            return
        log.info("comfy_sim: %s %s -> 500 (%s: %s)", self.request.method, self.request.uri, typ.__name__, value)


class NotFoundHandler(BaseHandler):
    def prepare(self):
        super().prepare()
        if not self._finished:
            raise web.HTTPError(404)


class IndexHandler(BaseHandler):
    def get(self):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish("<!doctype html><title>ComfyUI (t2i comfy_sim)</title><p>ComfyUI test double.</p>")


class SystemStatsHandler(BaseHandler):
    def get(self):
        vram = 24 * 1024 ** 3
        self.reply({
            "system": {"os": os.name, "ram_total": 32 * 1024 ** 3, "ram_free": 30 * 1024 ** 3,
                       "comfyui_version": "0.3.64", "required_frontend_version": "1.27.10",
                       "installed_templates_version": "0.1.95", "required_templates_version": "0.1.95",
                       "python_version": sys.version, "pytorch_version": "2.14.1+cu130 (simulated)",
                       "embedded_python": False, "argv": ["t2i.comfy_sim", "--port", str(self.sim.port)]},
            "devices": [{"name": "cuda:0 Simulated GPU : comfy_sim", "type": "cuda", "index": 0,
                         "vram_total": vram, "vram_free": vram, "torch_vram_total": vram, "torch_vram_free": vram}],
        })


class FeaturesHandler(BaseHandler):
    def get(self):
        self.reply(SERVER_FEATURES)


class ObjectInfoHandler(BaseHandler):
    def get(self, node_class: str | None = None):
        if node_class is None:
            self.reply({name: cls.info(self.sim) for name, cls in NODE_CLASSES.items()})
        else:
            cls = NODE_CLASSES.get(node_class)
            self.reply({node_class: cls.info(self.sim)} if cls is not None else {})


class PromptHandler(BaseHandler):
    def get(self):
        self.reply(self.sim.queue_info())

    def post(self):
        sim, executor = self.sim, self.sim._executor
        json_data = self.json_body()
        if "number" in json_data:
            number = float(json_data["number"])
        else:
            number = executor.number
            if "front" in json_data and json_data["front"]:
                number = -number
            executor.number += 1
        if "prompt" not in json_data:
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                     "extra_info": {}}
            return self.reply({"error": error, "node_errors": {}}, 400)
        prompt = json_data["prompt"]
        prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        partial = json_data["partial_execution_targets"] if "partial_execution_targets" in json_data else None
        valid = validate_prompt(sim, prompt, partial)
        extra_data = json_data["extra_data"] if "extra_data" in json_data else {}
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if not valid[0]:
            log.info("comfy_sim: invalid prompt: %s", valid[1])
            return self.reply({"error": valid[1], "node_errors": valid[3]}, 400)
        sensitive = {key: extra_data.pop(key) for key in SENSITIVE_EXTRA_DATA_KEYS if key in extra_data}
        sim.submitted.append((prompt_id, prompt, extra_data))
        executor.put((number, prompt_id, prompt, extra_data, valid[2], sensitive))
        self.reply({"prompt_id": prompt_id, "number": number, "node_errors": valid[3]})


class QueueHandler(BaseHandler):
    def get(self):
        self.reply({"queue_running": self.sim.queue_running, "queue_pending": self.sim.queue_pending})

    def post(self):
        json_data = self.json_body()
        executor = self.sim._executor
        if "clear" in json_data and json_data["clear"]:
            executor.wipe_queue()
        if "delete" in json_data:
            for prompt_id in json_data["delete"]:
                executor.delete_pending(prompt_id)
        self.empty()


class InterruptHandler(BaseHandler):
    def post(self):
        try:
            json_data = self.json_body()
        except ValueError:
            json_data = {}
            self.sim.interrupts.append(None)
        else:
            self.sim.interrupts.append(json_data)
        prompt_id = json_data.get("prompt_id")
        executor = self.sim._executor
        if prompt_id:
            if any(item[1] == prompt_id for item in executor.running_items()):
                executor.interrupt()
        else:
            executor.interrupt()
        self.empty()


class FreeHandler(BaseHandler):
    def post(self):
        json_data = self.json_body()
        if json_data.get("free_memory", False):
            self.sim._executor.flush_cache = True
        self.empty()


class HistoryHandler(BaseHandler):
    def get(self, prompt_id: str | None = None):
        executor = self.sim._executor
        if prompt_id is not None:
            return self.reply(executor.get_history(prompt_id=prompt_id))
        max_items = self.get_query_argument("max_items", None)
        offset = self.get_query_argument("offset", None)
        self.reply(executor.get_history(max_items=int(max_items) if max_items is not None else None,
                                        offset=int(offset) if offset is not None else -1))

    def post(self):
        json_data = self.json_body()
        history = self.sim._executor.history
        if "clear" in json_data and json_data["clear"]:
            history.clear()
        if "delete" in json_data:
            for prompt_id in json_data["delete"]:
                history.pop(prompt_id, None)
        self.empty()


class ViewHandler(BaseHandler):
    async def get(self):
        query = {k: self.get_query_argument(k) for k in self.request.query_arguments}
        if "filename" not in query:
            return self.empty(404)
        filename, base = query["filename"], None
        for tag in ("output", "input", "temp"):
            if filename.endswith(f"[{tag}]"):
                filename, base = filename[:-len(tag) - 3], self.sim.directories[tag]
                break
        if not filename:
            return self.empty(400)
        if filename[0] == "/" or ".." in filename:
            return self.empty(400)
        if base is None:
            base = self.sim.directories.get(query.get("type", "output"))
        if base is None:
            return self.empty(400)
        if "subfolder" in query:
            full = os.path.join(base, query["subfolder"])
            if os.path.commonpath((os.path.abspath(full), base)) != base:
                return self.empty(403)
            base = full
        filename = os.path.basename(filename)
        path = os.path.join(base, filename)
        if not os.path.isfile(path):
            return self.empty(404)
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, _read, path)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript",
                            "text/css"}:
            content_type = "application/octet-stream"
        if "preview" in query:
            # Only JPEG can be produced here (no Pillow); webp requests get a JPEG too.
            jpeg = await loop.run_in_executor(None, _preview_jpeg, data)
            if jpeg is not None:
                data, content_type = jpeg, "image/jpeg"
        self.set_header("Content-Type", content_type)
        self.set_header("Content-Disposition", f'filename="{filename}"')
        self.finish(data)


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


class UploadImageHandler(BaseHandler):
    def post(self):
        """server.py image_upload: store the ``image`` part in input/ (or temp/, output/), answer its name."""
        upload_type = self.get_body_argument("type", None) or "input"
        upload_dir = self.sim.directories.get(upload_type)
        if upload_dir is None:  # get_dir_by_type leaves its folder unset: an UnboundLocalError in ComfyUI
            raise web.HTTPError(500)
        parts = self.request.files.get("image")
        if not parts:
            if "image" in self.request.body_arguments:  # a text field: ComfyUI reads `.file` off a str
                raise web.HTTPError(500)
            return self.empty(400)
        image = parts[0]
        filename = image.filename
        if not filename:
            return self.empty(400)
        subfolder = self.get_body_argument("subfolder", "")
        folder = os.path.join(upload_dir, os.path.normpath(subfolder))
        path = os.path.abspath(os.path.join(folder, filename))
        if os.path.commonpath((upload_dir, path)) != upload_dir:
            return self.empty(400)
        os.makedirs(folder, exist_ok=True)
        stem, ext = os.path.splitext(filename)
        duplicate = False
        if self.get_body_argument("overwrite", None) not in ("true", "1") or self.sim.rename_uploads:
            i = 1
            while os.path.exists(path) or (self.sim.rename_uploads and i == 1):
                if not self.sim.rename_uploads and _read(path) == image.body:  # compare_image_hash
                    duplicate = True
                    break
                filename = f"{stem} ({i}){ext}"
                path = os.path.join(folder, filename)
                i += 1
        if not duplicate:
            with open(path, "wb") as handle:
                handle.write(image.body)
        answer = {"name": filename, "subfolder": subfolder, "type": upload_type}
        self.sim.uploads.append(answer)
        self.reply(answer)


def _preview_jpeg(data: bytes) -> bytes | None:
    decoded = decode_png_rgb(data)
    if decoded is None:
        return None
    width, height, rows = decoded
    return jpeg_of_rows(width, height, rows)


class WebSocketHandler(websocket.WebSocketHandler):
    def initialize(self, sim: "ComfySim") -> None:
        self.sim = sim
        self.sid: str | None = None
        self.generation = sim._generation
        self.first_message = True

    def check_origin(self, origin: str) -> bool:
        return not csrf_forbidden(self.request)

    def open(self, *args):
        sim = self.sim
        sid = self.get_query_argument("clientId", "")
        if sid:
            sim.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        self.sid = sid
        sim._ws_opened(self, sid)
        sim.send_json("status", {"status": sim.queue_info(), "sid": sid}, sid)
        executor = sim._executor
        if executor.client_id == sid and executor.last_node_id is not None:
            sim.send_json("executing", {"node": executor.last_node_id}, sid)

    def on_message(self, message):
        if isinstance(message, bytes):
            return
        try:
            data = json.loads(message)
        except ValueError:
            return
        try:
            if self.first_message and data.get("type") == "feature_flags":
                flags = data.get("data", {})
                if self.sid in self.sim.sockets_metadata:
                    self.sim.sockets_metadata[self.sid]["feature_flags"] = flags
                self.sim.send_json("feature_flags", SERVER_FEATURES, self.sid)
            self.first_message = False
        except Exception as exc:  # ComfyUI logs and ignores it
            log.debug("comfy_sim: bad ws message from %s: %s", self.sid, exc)

    def on_close(self):
        self.sim._ws_closed(self)

    def send(self, message, binary: bool) -> None:
        try:
            future = self.write_message(message, binary=binary)
        except websocket.WebSocketClosedError:
            return
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def abort(self) -> None:
        """Drop the TCP connection without a close frame, as a killed process does."""
        conn = self.ws_connection
        stream = getattr(conn, "stream", None)
        if stream is not None and not stream.closed():
            stream.close()


def routes(sim: "ComfySim") -> list:
    args = {"sim": sim}
    table = [
        (r"/ws", WebSocketHandler), (r"/system_stats", SystemStatsHandler), (r"/features", FeaturesHandler),
        (r"/object_info", ObjectInfoHandler), (r"/object_info/([^/]+)", ObjectInfoHandler),
        (r"/prompt", PromptHandler), (r"/queue", QueueHandler), (r"/interrupt", InterruptHandler),
        (r"/free", FreeHandler), (r"/history", HistoryHandler), (r"/history/([^/]+)", HistoryHandler),
        (r"/view", ViewHandler), (r"/upload/image", UploadImageHandler),
    ]
    routes = [(r"/", IndexHandler, args)]
    for pattern, handler in table:
        routes.append((pattern, handler, args))
        routes.append((r"/api" + pattern, handler, args))
    return routes
