"""Checking ``POST /generate`` bodies: one validator for the worker and the scheduler.

Both servers hold a *workflow catalogue*: the JSON form of each workflow's
parameter specs (``ParamSpec.to_json``), as a worker serves it at
``GET /workflows``. The worker checks against its own; the scheduler checks
against the catalogue its workers reported, so a bad request is refused before
it costs a hop.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Mapping

from t2i.config import PARAM_KINDS, SEED_MAX, WorkerConfig
from t2i.dataurl import BadImage, decode_image

GENERATE_FIELDS = frozenset(PARAM_KINDS) | {"workflow", "webhook_url"}
NOT_PARAMS = frozenset({"workflow", "webhook_url"})  # request fields that fill no template input


class ValidationError(ValueError):
    """A bad request field; ``field`` names it (None for the body as a whole)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class GenerateRequest:
    """A checked request: every mapped parameter has a value (defaults filled in)."""

    workflow: str | None
    params: dict[str, Any] = field(default_factory=dict)
    raw_workflow: dict[str, Any] | None = None
    webhook_url: str | None = None


def catalogue_of(config: WorkerConfig) -> dict[str, Any]:
    """The worker's workflow catalogue, as served at ``GET /workflows``."""
    catalogue = {
        "default_workflow": config.default_workflow,
        "allow_raw_workflows": config.allow_raw_workflows,
        "workflows": {
            name: {"params": {p: spec.to_json() for p, spec in wf.params.items()}}
            for name, wf in config.workflows.items()
        },
    }
    if config.webhooks.secret:
        catalogue["webhooks"] = {"allowed_urls": list(config.webhooks.allowed_urls)}
    return catalogue


def validate_generate(body: Any, catalogue: Mapping[str, Any] | None) -> GenerateRequest:
    """Check a request body against a catalogue; raise :class:`ValidationError`.

    With no catalogue (the scheduler before any worker answered) only the
    shape and types are checked; the worker checks the rest.
    """
    if not isinstance(body, dict):
        raise ValidationError("The request body must be a JSON object.")
    known = _known_fields(catalogue)
    for name in body:
        if known is not None and name not in known:
            raise ValidationError(f"Unknown field {name!r}; allowed: {', '.join(sorted(known))}.", name)
    webhook_url = check_webhook_url(body.get("webhook_url"), catalogue)
    workflows = (catalogue or {}).get("workflows")
    workflow = body.get("workflow")
    if isinstance(workflow, dict):
        if catalogue is not None and not catalogue.get("allow_raw_workflows"):
            raise ValidationError("Raw workflows are not allowed here; name a configured workflow.",
                                  "workflow")
        if not workflow or not all(isinstance(n, dict) for n in workflow.values()):
            raise ValidationError("A raw workflow must be a ComfyUI API-format object of nodes.", "workflow")
        extra = [n for n in body if n not in NOT_PARAMS]
        if extra:
            raise ValidationError(f"Field {extra[0]!r} cannot be used with a raw workflow.", extra[0])
        return GenerateRequest(workflow=None, raw_workflow=workflow, webhook_url=webhook_url)
    if workflow is None:
        workflow = (catalogue or {}).get("default_workflow")
    elif not isinstance(workflow, str):
        raise ValidationError("`workflow` must be the name of a configured workflow.", "workflow")
    if workflows is None:
        return GenerateRequest(workflow=workflow, params=_check_types_only(body), webhook_url=webhook_url)
    if workflow not in workflows:
        raise ValidationError(f"Unknown workflow {workflow!r}; available: {', '.join(sorted(workflows))}.",
                              "workflow")
    specs = workflows[workflow]["params"]
    params: dict[str, Any] = {}
    for name in body:
        if name not in specs and name not in NOT_PARAMS:
            raise ValidationError(f"Workflow {workflow!r} has no parameter {name!r}.", name)
    for name, spec in specs.items():
        value = body.get(name)
        if value is None:
            if spec.get("required"):
                raise ValidationError(f"`{name}` is required.", name)
            if name == "seed":
                value = random.randint(0, 2**32 - 1)
            elif "default" in spec:
                value = spec["default"]
            else:
                continue
        else:
            _check_value(name, value, spec)
        params[name] = value
    return GenerateRequest(workflow=workflow, params=params, webhook_url=webhook_url)


def check_webhook_url(url: Any, catalogue: Mapping[str, Any] | None) -> str | None:
    """A ``webhook_url`` must start with one of the worker's allowed prefixes: t2i never calls a URL
    a client chose freely. The catalogue's ``webhooks.allowed_urls`` says which (absent: none)."""
    if url is None:
        return None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2000:
        raise ValidationError("`webhook_url` must be an http:// or https:// URL.", "webhook_url")
    if catalogue is None:
        return url  # the scheduler before any worker answered: the worker checks it
    allowed = (catalogue.get("webhooks") or {}).get("allowed_urls") or []
    if not allowed:
        raise ValidationError("Webhooks are not enabled here (no webhooks.secret and allowed_urls in the "
                              "worker's configuration).", "webhook_url")
    if not any(url.startswith(prefix) for prefix in allowed):
        raise ValidationError(f"`webhook_url` must start with one of: {', '.join(allowed)}.", "webhook_url")
    return url


def _known_fields(catalogue: Mapping[str, Any] | None) -> set[str] | None:
    """Every request field some workflow of the catalogue takes (None without a catalogue: any)."""
    workflows = (catalogue or {}).get("workflows")
    if not isinstance(workflows, Mapping):
        return None
    known = set(NOT_PARAMS)
    for spec in workflows.values():
        if isinstance(spec, Mapping) and isinstance(spec.get("params"), Mapping):
            known.update(spec["params"])
    return known


def _check_types_only(body: Mapping[str, Any]) -> dict[str, Any]:
    params = {}
    for name, kind in PARAM_KINDS.items():
        if body.get(name) is not None:
            spec = {"type": "string" if kind is str else "integer"}
            _check_value(name, body[name], spec)
            params[name] = body[name]
    return params


def _check_value(name: str, value: Any, spec: Mapping[str, Any]) -> None:
    kind = spec.get("type")
    if kind in _CHECKS:
        _CHECKS[kind](name, value, spec)
        return
    if kind == "string":
        if not isinstance(value, str):
            raise ValidationError(f"`{name}` must be a string.", name)
        if name == "prompt" and not value.strip():
            raise ValidationError("`prompt` must not be empty.", name)
        if "\x00" in value:
            raise ValidationError(f"`{name}` must not contain NUL characters.", name)
        limit = spec.get("max_length")
        if limit is not None and len(value) > limit:
            raise ValidationError(f"`{name}` is longer than {limit} characters.", name)
        return
    if kind != "integer":
        return  # a type this version does not know: the worker that listed it checks it
    if not isinstance(value, int) or isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            raise ValidationError(f"`{name}` must be a whole number without a decimal point.", name)
        raise ValidationError(f"`{name}` must be an integer.", name)
    # today's six (seed, steps, width, height) are never negative, whatever the catalogue says
    low = spec.get("min", 0 if name in PARAM_KINDS else None)
    high = spec.get("max", SEED_MAX if name == "seed" else None)
    _check_range(name, value, low, high)
    if name in ("width", "height") and value % 8:  # ComfyUI's latents are 8x8-pixel blocks: it would round down
        raise ValidationError(f"`{name}` must be a multiple of 8 ({value} would make {value - value % 8}).", name)


def _check_number(name: str, value: Any, spec: Mapping[str, Any]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValidationError(f"`{name}` must be a number.", name)
    if not math.isfinite(value):
        raise ValidationError(f"`{name}` must be a finite number.", name)
    _check_range(name, value, spec.get("min"), spec.get("max"))


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if low is not None and value < low:
        raise ValidationError(f"`{name}` must be at least {low}.", name)
    if high is not None and value > high:
        raise ValidationError(f"`{name}` must be at most {high}.", name)


def _check_boolean(name: str, value: Any, spec: Mapping[str, Any]) -> None:
    if not isinstance(value, bool):
        raise ValidationError(f"`{name}` must be true or false.", name)


SHOWN_CHOICES = 10  # choices named in an error, at most


def _check_enum(name: str, value: Any, spec: Mapping[str, Any]) -> None:
    choices = spec.get("choices")
    if isinstance(choices, list):
        if value in choices and not isinstance(value, bool):
            return
        shown = ", ".join(str(c) for c in choices[:SHOWN_CHOICES])
        more = len(choices) - SHOWN_CHOICES
        raise ValidationError(f"`{name}` must be one of: {shown}" + (f" (and {more} more)" if more > 0 else "")
                              + ".", name)
    # No list known yet (ComfyUI not asked): a plain string, which ComfyUI checks.
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > 1000:
        raise ValidationError(f"`{name}` must be a string naming one of its choices.", name)


def _check_image(name: str, value: Any, spec: Mapping[str, Any]) -> None:
    try:
        decode_image(value, spec.get("max_bytes"), spec.get("max_pixels"))
    except BadImage as exc:
        raise ValidationError(f"`{name}` {exc}.", name) from None


_CHECKS = {"number": _check_number, "boolean": _check_boolean, "enum": _check_enum, "image": _check_image}
