"""The hand-written OpenAPI document (``openapi.yaml``): served, and checked against.

``GET /openapi.json`` serves it on both servers. :func:`check_response`
validates a JSON response against the document (the tests run it on every
response their servers send), with a small validator for the OpenAPI 3.0
subset the document uses.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import yaml

from t2i.web import JSONHandler

DOCUMENT = Path(__file__).with_name("openapi.yaml")


@functools.lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    return yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _document_json() -> bytes:
    return json.dumps(document()).encode()


class OpenAPIHandler(JSONHandler):
    """``GET /openapi.json``."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(_document_json())


@functools.lru_cache(maxsize=1)
def _path_patterns() -> list[tuple[re.Pattern, str]]:
    patterns = []
    for template in document()["paths"]:
        regex = re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template))
        patterns.append((re.compile(f"^{regex}$"), template))
    return patterns


def match_path(path: str) -> str | None:
    """The document's path template that ``path`` falls under, if any."""
    for pattern, template in _path_patterns():
        if pattern.match(path):
            return template
    return None


def expects_json(method: str, path: str, status: int) -> bool:
    """Does the document promise a JSON body for this response?"""
    template = match_path(path)
    operation = document()["paths"].get(template, {}).get(method.lower()) if template else None
    response = (operation or {}).get("responses", {}).get(str(status)) or {}
    return "application/json" in response.get("content", {})


def check_response(method: str, path: str, status: int, body: Any) -> list[str]:
    """Problems with one response ([] when it matches the document)."""
    template = match_path(path)
    if template is None:
        return []
    operation = document()["paths"][template].get(method.lower())
    if operation is None:
        if status == 405:  # the document's description: a method a path does not list is a JSON 405
            return [f"{method} {template} 405: {p}" for p in validate(body, {"$ref": "#/components/schemas/Error"})]
        return [f"{method} {template}: method not documented"]
    response = operation["responses"].get(str(status))
    if response is None:
        return [f"{method} {template}: status {status} not documented"]
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


def documented_responses() -> set[tuple[str, str, int]]:
    """Every (method, path template, status) the document promises."""
    found = set()
    for template, operations in document()["paths"].items():
        for method, operation in operations.items():
            for status in operation["responses"]:
                found.add((method.upper(), template, int(status)))
    return found
