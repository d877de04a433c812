"""The one outbound HTTP client of a process, and JSON calls with explicit timeouts."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
from dataclasses import dataclass
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

log = logging.getLogger(__name__)

MAX_CLIENTS = 64


def configure_http_client(prefer_curl: bool = True) -> str:
    """Pick the process-wide AsyncHTTPClient implementation; returns its name.

    pycurl keeps connections alive between requests (the simple client opens a
    new one per request), which matters for the scheduler's polling hops. It is
    optional: without it the simple client is used.
    """
    if prefer_curl:
        try:
            import pycurl  # noqa: F401

            AsyncHTTPClient.configure("tornado.curl_httpclient.CurlAsyncHTTPClient", max_clients=MAX_CLIENTS)
            return "curl"
        except ImportError:
            pass
    AsyncHTTPClient.configure(None, max_clients=MAX_CLIENTS)
    return "simple"


@dataclass
class JSONResponse:
    status: int
    body: Any  # parsed JSON, or None when the body was empty or not JSON
    headers: dict[str, str]


def detached(awaitable) -> asyncio.Future:
    """Await ``awaitable`` so that cancelling the awaiting task leaves it alone (its outcome is dropped).

    Tornado's HTTP clients cannot abort a request: cancelling a fetch future only makes
    Tornado log "Exception after Future was cancelled" when the request later fails
    (a shutdown with health checks or long-polls in flight). The request ends by itself instead.
    """
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(drop_outcome)
    return asyncio.shield(task)


def drop_outcome(future: asyncio.Future) -> None:
    """A done-callback for a future nobody may await: its exception is taken, so asyncio logs no
    "exception was never retrieved" (the outcome was dealt with elsewhere, or does not matter)."""
    if not future.cancelled():
        future.exception()


async def fetch(request: HTTPRequest, client: AsyncHTTPClient | None = None) -> HTTPResponse:
    """``client.fetch(request, raise_error=False)``, safe to cancel (see :func:`detached`)."""
    return await detached((client or AsyncHTTPClient()).fetch(request, raise_error=False))


def json_request(url: str, method: str = "GET", body: Any = None, *, headers: dict[str, str] | None = None,
                 connect_timeout: float, request_timeout: float, body_bytes: bytes | None = None) -> HTTPRequest:
    """A request with ``body`` as JSON (a POST without one sends ``{}``: t2i's servers take JSON only);
    ``body_bytes``: ``body`` as it was received, sent as it is (a body of input images is not encoded again)."""
    headers = dict(headers or {})
    data: str | bytes | None = body_bytes
    if body is None and method == "POST":
        body = {}
    if body is not None:
        if data is None:
            data = json.dumps(body)
        headers["Content-Type"] = "application/json"
    return HTTPRequest(url, method=method, body=data, headers=headers,
                       connect_timeout=connect_timeout, request_timeout=request_timeout)


class UpstreamUnavailable(Exception):
    """The peer could not be reached (refused, timed out, reset).

    ``unsent`` is True when no connection was made (refused, unresolvable, connect timeout):
    the request certainly did not arrive. Otherwise it may have, answer or not.
    """

    def __init__(self, message: str, *, unsent: bool = False):
        super().__init__(message)
        self.unsent = unsent


# curl's codes for "could not resolve" and "could not connect" (CurlError.errno).
_CURL_UNSENT = {6, 7}


def _unsent(error: BaseException | None) -> bool:
    if isinstance(error, (ConnectionRefusedError, socket.gaierror)):
        return True
    if isinstance(error, OSError) and error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return True
    if isinstance(error, HTTPClientError) and getattr(error, "errno", None) in _CURL_UNSENT:
        return True
    return "while connecting" in str(error)  # tornado's connect timeout


async def fetch_json(url: str, method: str = "GET", body: Any = None, *, token: str | None = None,
                     connect_timeout: float = 3.0, request_timeout: float = 10.0,
                     client: AsyncHTTPClient | None = None, headers: dict[str, str] | None = None,
                     body_bytes: bytes | None = None) -> JSONResponse:
    """Call a JSON API; any HTTP status is returned, transport failures raise UpstreamUnavailable.
    ``body_bytes``: ``body``'s JSON as received, forwarded as it is (see :func:`json_request`)."""
    headers = {"Accept": "application/json", **(headers or {})}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = json_request(url, method, body, headers=headers, connect_timeout=connect_timeout,
                           request_timeout=request_timeout, body_bytes=body_bytes)
    try:
        response = await fetch(request, client)
    except HTTPClientError as exc:  # raised for 599 by some clients even with raise_error=False
        raise UpstreamUnavailable(str(exc), unsent=_unsent(exc)) from None
    except OSError as exc:
        raise UpstreamUnavailable(str(exc) or type(exc).__name__, unsent=_unsent(exc)) from None
    if response.code == 599:
        raise UpstreamUnavailable(str(response.error or "connection failed"), unsent=_unsent(response.error))
    parsed = None
    if response.body:
        try:
            parsed = json.loads(response.body)
        except ValueError:
            parsed = None
    return JSONResponse(response.code, parsed, dict(response.headers))
