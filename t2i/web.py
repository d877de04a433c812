"""What both servers' handlers share: JSON bodies, JSON errors, request logs."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
from typing import Any, Awaitable

from tornado import web
from tornado.httputil import responses
from tornado.log import app_log, gen_log

from t2i.jobstate import result_of

log = logging.getLogger("t2i.access")

# Request URIs in logs are cut to this many characters (a 60 KB query string is not a log line).
LOG_URI_CHARS = 200
# JSON bodies nested deeper than this are refused (ours are 2 or 3 levels; ComfyUI workflows 4 or 5).
MAX_JSON_DEPTH = 64
# What POST bodies must be: a JSON body in any other type (text/plain, a form) is a "simple" cross-site
# request that browsers send without asking the server first (CORS preflight).
JSON_TYPE = "application/json"

# Routes that browsers, balancers, scrapers and the scheduler hit every second or so:
# logged at debug so the info log shows what people did.
QUIET_ROUTES = re.compile(r"^/(status|jobs|health|workflows|metrics|previews|images)(/|$|\?)")


# A job id in a route: one path segment (the same string in the scheduler, the worker and ComfyUI).
PROMPT_ID = r"(?P<prompt_id>[^/]+)"


class APIError(web.HTTPError):
    """An error answered as ``{"error": message, **details}``."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None,
                 **details: Any):
        super().__init__(status_code, reason=responses.get(status_code, "Error"))
        self.message = message
        self.headers = headers or {}
        # Details that do not apply (a field of None) are left out, not sent as null.
        self.details = {name: value for name, value in details.items() if value is not None}


class JSONHandler(web.RequestHandler):
    """Base of every API handler: JSON in, JSON out, JSON errors, never a trace."""

    _long_poll: asyncio.Future | None = None
    _client_gone = False

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")

    def image_asked(self) -> bool:
        """Does a ``GET /result`` ask for the image itself: an image type first in ``Accept`` (``image/*``,
        ``image/png``...) and no ``redirect`` (that is a 303)? A browser's page load lists ``text/html``
        first, and a plain API client sends none or ``*/*``: those get JSON."""
        first = self.request.headers.get("Accept", "").split(",", 1)[0]
        return (first.split(";", 1)[0].strip().lower().startswith("image/")
                and self.get_query_argument("redirect", None) is None)

    def write_result(self, status: dict[str, Any]) -> None:
        """``GET /result``'s answer from a ``/status`` object (``?redirect=image``: 303 to the image)."""
        redirect = self.get_query_argument("redirect", None)
        if redirect not in (None, "image"):
            raise APIError(400, "`redirect` can only be `image`.", field="redirect")
        code, body = result_of(status)
        if code == 200 and body.get("image_url") and redirect == "image":
            self.redirect(body["image_url"], status=303)
            return
        self.write_json(body, status=code)

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(obj, separators=(",", ":")))

    def prepare(self) -> None:
        # Before any body handling: a method the route does not serve is 405, whatever its body.
        if self.request.method not in allowed_methods(self):
            raise APIError(405, f"{self.request.method} is not allowed here.")

    def get_json_body(self) -> Any:
        """The request body as JSON; 400 when it is not JSON (or nested absurdly deep)."""
        body = self.request.body
        if not body:
            raise APIError(400, "The request body is empty; send a JSON object.")
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"The request body is not valid JSON: {exc}") from None
        except RecursionError:
            value = None
        else:
            if json_depth(value) <= MAX_JSON_DEPTH:
                return value
        raise APIError(400, f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.")

    def get_number_argument(self, name: str, kind: type, default: Any) -> Any:
        """A non-negative number from the query (``?wait=``, ``?since=``); 400 naming it otherwise."""
        raw = self.get_query_argument(name, None)
        if raw is None:  # absent; an empty value (`?since=`) is not a number: 400
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise APIError(400, f"`{name}` must be a number.", field=name) from None
        if value != value or value < 0:  # NaN or negative
            raise APIError(400, f"`{name}` must be a non-negative number.", field=name)
        return value

    async def wait_unless_gone(self, awaitable: Awaitable[Any]) -> bool:
        """Await a long-poll's wait; False (the wait cancelled) when the client went away meanwhile."""
        self._long_poll = asyncio.ensure_future(awaitable)
        try:
            await self._long_poll
        except asyncio.CancelledError:
            return False
        finally:
            self._long_poll = None
        return not self._client_gone

    def on_connection_close(self) -> None:
        self._client_gone = True
        if self._long_poll is not None:
            self._long_poll.cancel()
        # Tornado's own: a handler still waiting for a streamed body stops waiting for it.
        super().on_connection_close()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        if status_code == 405:
            self.set_header("Allow", ", ".join(allowed_methods(self)))
        body: dict[str, Any] = {}
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.error_exc = exc  # t2i.metrics counts a 503 by the exception behind it
        if isinstance(exc, APIError):
            for name, value in exc.headers.items():
                self.set_header(name, value)
            body = {"error": exc.message, **exc.details}
        elif isinstance(exc, web.HTTPError) and exc.log_message and status_code < 500:
            body = {"error": exc.log_message % exc.args if exc.args else exc.log_message}
        else:
            # Unexpected failures are logged with their trace by Tornado; the client gets a sentence.
            reason = responses.get(status_code, "Error")
            body = {"error": "Internal server error." if status_code == 500 else f"{reason}."}
        self.finish(json.dumps(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Tornado's, with the request's URI cut short (it logs the whole request otherwise)."""
        summary = f"{self.request.method} {short_uri(self.request.uri)} ({self.request.remote_ip})"
        if isinstance(value, web.HTTPError):
            if value.log_message:
                message = value.log_message % value.args if value.args else value.log_message
                gen_log.warning("%d %s: %s", value.status_code, summary, message)
        else:
            app_log.error("Uncaught exception %s", summary, exc_info=(typ, value, tb))


# handler class -> the methods it implements: asked on every request (prepare), the same for its class.
_ALLOWED: dict[type, tuple[str, ...]] = {}


def allowed_methods(handler: web.RequestHandler) -> tuple[str, ...]:
    """The methods ``handler``'s class implements (for 405 and its ``Allow`` header)."""
    cls = type(handler)
    methods = _ALLOWED.get(cls)
    if methods is None:
        methods = _ALLOWED[cls] = tuple(
            method for method in handler.SUPPORTED_METHODS
            if getattr(cls, method.lower()) is not getattr(web.RequestHandler, method.lower()))
    return methods


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def short_uri(uri: str | None) -> str:
    """``uri`` for a log line: at most LOG_URI_CHARS characters, saying how long it was when cut."""
    uri = uri or ""
    if len(uri) <= LOG_URI_CHARS:
        return uri
    return f"{uri[:LOG_URI_CHARS]}...({len(uri)} chars)"


class JSONBodyHandler(JSONHandler):
    """A handler whose POST body is capped: over the cap is 413, before it is read.

    Tornado's own cap answers with a bare 400 and a dropped connection, so the
    body is streamed and counted here instead.
    """

    max_body_bytes = 1_048_576

    def initialize(self, max_body_bytes: int | None = None, **kwargs: Any) -> None:
        if max_body_bytes:
            self.max_body_bytes = max_body_bytes
        self._chunks: list[bytes] = []
        self._size = 0

    def prepare(self) -> None:
        super().prepare()
        if self.request.method not in ("POST", "PUT", "PATCH"):
            return
        length = self.request.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            raise APIError(413, f"The request body is larger than {self.max_body_bytes} bytes.")
        content_type = self.request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if content_type != JSON_TYPE:
            raise APIError(415, f"Send the request body as JSON, with `Content-Type: {JSON_TYPE}` "
                                f"(got {content_type or 'no Content-Type'}).")
        # Room for the streamed body plus a little, so chunked bodies reach data_received.
        self.request.connection.set_max_body_size(body_size_limit(self.max_body_bytes))

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self.max_body_bytes:
            self._chunks.append(chunk)

    def check_body_size(self) -> None:
        """413 for a streamed (chunked) body that went over the cap."""
        if self._size > self.max_body_bytes:
            raise APIError(413, f"The request body is larger than {self.max_body_bytes} bytes.")

    def get_json_body(self) -> Any:
        self.check_body_size()
        self.request.body = b"".join(self._chunks)
        return super().get_json_body()


web.stream_request_body(JSONBodyHandler)


def body_size_limit(max_body_bytes: int) -> int:
    """The server-wide cap: JSON bodies get a 413 at ``max_body_bytes``; the slack lets a
    streamed body just over it reach the handler, which says so in JSON."""
    return max_body_bytes + 65536


class FileHandler(web.StaticFileHandler):
    """Files from one folder, with JSON errors; nothing outside it is served, through a symlink either.

    The check resolves real paths itself, whatever the installed Tornado does with symlinks.
    Anything refused is a 404 (``not_found``), never a trace or a 403 that tells what exists.
    """

    not_found = "No such file."

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        if "\x00" in absolute_path:  # os.stat would raise ValueError: a 500
            raise APIError(404, self.not_found)
        try:
            path = super().validate_absolute_path(root, absolute_path)
        except web.HTTPError as exc:
            if exc.status_code in (403, 404):
                raise APIError(404, self.not_found) from None
            raise
        if path is not None and not is_inside(root, path):
            raise APIError(404, self.not_found)
        return path

    write_error = JSONHandler.write_error
    log_exception = JSONHandler.log_exception


def is_inside(root: str, path: str) -> bool:
    """Is ``path``, symlinks resolved, a regular file under ``root`` (resolved too)?"""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return os.path.commonpath([real_root, real]) == real_root and real != real_root and os.path.isfile(real)


class NotFoundHandler(JSONHandler):
    """JSON 404 for every path no route claims."""

    def prepare(self) -> None:
        raise APIError(404, f"No such resource: {self.request.path}")


def bearer_token(handler: web.RequestHandler) -> str | None:
    header = handler.request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def require_token(handler: web.RequestHandler, expected: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <expected>`` (when one is set)."""
    if expected is None:
        return
    token = bearer_token(handler)
    if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
        raise APIError(401, "This route needs `Authorization: Bearer <token>` with the configured token.",
                       headers={"WWW-Authenticate": "Bearer"})


def log_request(handler: web.RequestHandler) -> None:
    """One line per request; polls and health checks at debug. Never logs headers (tokens)."""
    status = handler.get_status()
    request = handler.request
    if status >= 500 and status not in (502, 503, 504):
        level = logging.ERROR  # our own fault
    elif status == 503:
        level = logging.INFO  # "try again later": backpressure; its cause is logged once where it is seen
    elif status >= 400 and status != 404:  # including 502 and 504: a peer's trouble
        level = logging.WARNING
    elif QUIET_ROUTES.match(request.path) or status == 404 and request.path.startswith("/images/"):
        level = logging.DEBUG
    else:
        level = logging.INFO
    if log.isEnabledFor(level):
        # request.uri has no credentials: tokens only travel in headers.
        log.log(level, "%d %s %s (%s) %.1fms", status, request.method, short_uri(request.uri),
                request.remote_ip, 1000.0 * request.request_time())
    from t2i.metrics import observe_request  # not at the top: t2i.metrics imports this module

    observe_request(handler)
