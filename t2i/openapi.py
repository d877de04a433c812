"""The hand-written OpenAPI document (``openapi.yaml``): served, and checked against.

One file describes both servers: ``x-servers`` on each operation (and, where only
one of them can answer with a status, on that response) says which serve it. Where
the two serve the same method and path differently (``GET /jobs``: the worker's
change feed, the scheduler's list of a client's jobs), the path's ``x-per-server``
holds the other server's operation (``x-per-server: {scheduler: {get: ...}}``).
``document(server)`` is one server's own document, and ``GET /openapi.json``
serves it (``OpenAPIHandler``, told its server through the URL spec).
:func:`check_response` validates a JSON response against a server's document (the
tests run it on every response their servers send), with a small validator for
the OpenAPI 3.0 subset the document uses.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import yaml
from tornado import web

from t2i.web import JSONHandler

DOCUMENT = Path(__file__).with_name("openapi.yaml")
SERVERS = ("scheduler", "worker")


@functools.lru_cache(maxsize=None)
def document(server: str | None = None) -> dict[str, Any]:
    """One server's document (``"scheduler"`` or ``"worker"``); both servers' with None."""
    full = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    if server is None:
        return _merged(full)
    if server not in SERVERS:
        raise ValueError(f"unknown server {server!r}; one of {SERVERS}")
    return _for_server(full, server)


def _serves(node: dict[str, Any], server: str) -> bool:
    return server in node.get("x-servers", SERVERS)


def _operations(path_item: dict[str, Any], server: str) -> dict[str, Any]:
    """The path's operations as ``server`` has them (its ``x-per-server`` ones replace the shared ones)."""
    own = path_item.get("x-per-server", {}).get(server, {})
    return {**{m: op for m, op in path_item.items() if not m.startswith("x-")}, **own}


def _merged(full: dict[str, Any]) -> dict[str, Any]:
    """Both servers' document: a method served differently by each has the responses of both."""
    for template, path_item in full["paths"].items():
        variants = path_item.pop("x-per-server", {})
        for operations in variants.values():
            for method, operation in operations.items():
                if method not in path_item:
                    path_item[method] = operation
                else:
                    path_item[method]["responses"] = {**operation["responses"], **path_item[method]["responses"]}
    return full


def _for_server(full: dict[str, Any], server: str) -> dict[str, Any]:
    """``full`` cut down to the operations (and responses) ``server`` serves."""
    own = copy.deepcopy(full)
    own["info"]["title"] = f"t2i {server}"
    own["paths"] = {}
    for template, path_item in full["paths"].items():
        kept = {}
        for method, operation in _operations(path_item, server).items():
            if _serves(operation, server):
                operation = copy.deepcopy(operation)
                operation["responses"] = {status: response for status, response in operation["responses"].items()
                                          if _serves(response, server)}
                kept[method] = operation
        if kept:
            own["paths"][template] = kept
    return own


@functools.lru_cache(maxsize=None)
def _document_json(server: str) -> bytes:
    return json.dumps(document(server)).encode()


class OpenAPIHandler(JSONHandler):
    """``GET /openapi.json``: the document of the server it is on (``server`` from the URL spec)."""

    def initialize(self, server: str) -> None:
        if server not in SERVERS:
            raise ValueError(f"OpenAPIHandler: unknown server {server!r}")
        self.server = server

    def get(self) -> None:
        """This server's OpenAPI document."""
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(_document_json(self.server))


def server_of(application: web.Application) -> str | None:
    """Which server ``application`` is: the ``server`` its ``/openapi.json`` route was given."""
    for rule in application.wildcard_router.rules:
        if rule.target is OpenAPIHandler:
            return (rule.target_kwargs or {}).get("server")
    return None


@functools.lru_cache(maxsize=None)
def _path_patterns(server: str | None) -> list[tuple[re.Pattern, str]]:
    patterns = []
    for template in document(server)["paths"]:
        regex = re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template))
        patterns.append((re.compile(f"^{regex}$"), template))
    return patterns


def match_path(path: str, server: str | None = None) -> str | None:
    """The path template of ``server``'s document (both servers' with None) that ``path`` falls under."""
    for pattern, template in _path_patterns(server):
        if pattern.match(path):
            return template
    return None


def expects_json(method: str, path: str, status: int, server: str | None = None) -> bool:
    """Does the document promise a JSON body for this response (and nothing else, e.g. ``image/*`` for an
    ``Accept`` that asks for it)?"""
    template = match_path(path, server)
    operation = document(server)["paths"].get(template, {}).get(method.lower()) if template else None
    response = (operation or {}).get("responses", {}).get(str(status)) or {}
    return list(response.get("content", {})) == ["application/json"]


def check_response(method: str, path: str, status: int, body: Any, server: str | None = None) -> list[str]:
    """Problems with one response of ``server`` ([] when it matches that server's document)."""
    template = match_path(path, server)
    if template is None:
        return []
    operation = document(server)["paths"][template].get(method.lower())
    if operation is None:
        if status == 405:  # the document's description: a method a path does not list is a JSON 405
            return [f"{method} {template} 405: {p}" for p in validate(body, {"$ref": "#/components/schemas/Error"})]
        return [f"{method} {template}: method not documented"]
    response = operation["responses"].get(str(status))
    if response is None:
        where = f" on the {server}" if server else ""
        return [f"{method} {template}: status {status} not documented{where}"]
    schema = response.get("content", {}).get("application/json", {}).get("schema")
    if schema is None or body is None:
        return []
    return [f"{method} {template} {status}: {p}" for p in validate(body, schema)]


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = document()
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool,
    "integer": int, "number": (int, float),
}


def validate(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    schema = _resolve(schema)
    if value is None:
        return [] if schema.get("nullable") or not schema else [f"{where} is null"]
    if "oneOf" in schema:
        matches = [s for s in schema["oneOf"] if not validate(value, s, where)]
        return [] if len(matches) == 1 else [f"{where} matches {len(matches)} of oneOf"]
    kind = schema.get("type")
    if kind:
        expected = _TYPES[kind]
        if not isinstance(value, expected) or (kind in ("integer", "number") and isinstance(value, bool)):
            return [f"{where} should be {kind}, is {type(value).__name__}"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}={value!r} not in {schema['enum']}")
    if "minLength" in schema and isinstance(value, str) and len(value) < schema["minLength"]:
        problems.append(f"{where} is too short")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        problems.append(f"{where}={value} below {schema['minimum']}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{where}.{name} is missing")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            if name in properties:
                problems += validate(item, properties[name], f"{where}.{name}")
            elif extra is False:
                problems.append(f"{where}.{name} is not allowed")
            elif isinstance(extra, dict):
                problems += validate(item, extra, f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problems += validate(item, schema["items"], f"{where}[{index}]")
    return problems


def documented_responses(server: str | None = None) -> set[tuple[str, str, int]]:
    """Every (method, path template, status) ``server``'s document promises."""
    found = set()
    for template, operations in document(server)["paths"].items():
        for method, operation in operations.items():
            for status in operation["responses"]:
                found.add((method.upper(), template, int(status)))
    return found
