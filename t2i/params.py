"""Template parameters: the request fields a workflow exposes, each with a type and checks.

``workflows.<name>.params.<param>`` in worker.yaml maps a request field to one node
input (``node``, ``input``) and says what values it takes: ``type`` (int, float,
string, bool, enum, image), ``default``, ``min``, ``max``, ``max_length``,
``choices``, ``required``. The six fields t2i always had (prompt, negative_prompt,
seed, steps, width, height) keep the type their name gives them. Other names take
the ``type`` written, else ``enum`` when ``choices`` are written, else the type of
the template's own value (whose value is then also the default).

``ParamSpec.to_json`` is what ``GET /workflows`` shows and what t2i.validation
checks requests against (on the worker and on the scheduler).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from t2i.yamlfile import Section

# The request fields t2i always knew, and their JSON types (their types come from their names).
PARAM_KINDS: dict[str, type] = {
    "prompt": str,
    "negative_prompt": str,
    "seed": int,
    "steps": int,
    "width": int,
    "height": int,
}
SEED_MAX = 2**53 - 1  # what a browser can hold exactly; ComfyUI accepts up to 2**64-1

PARAM_TYPES = ("int", "float", "string", "bool", "enum", "image")
JSON_TYPES = {"int": "integer", "float": "number", "string": "string", "bool": "boolean", "enum": "enum",
              "image": "image"}  # the `type` GET /workflows shows (today's six: "string" and "integer")
_PY_TYPES = {"int": int, "float": float, "string": str, "bool": bool, "enum": str, "image": str}
_LEGACY_TYPES = {name: "int" if kind is int else "string" for name, kind in PARAM_KINDS.items()}

# Request fields that are not template parameters (t2i.validation.NOT_PARAMS says the same).
RESERVED_FIELDS = frozenset({"workflow", "webhook_url"})
PARAM_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_LENGTH = 2000  # a string parameter's length cap when none is written

DEFAULT_MAX_IMAGE_BYTES = 8 * 1024 * 1024   # decoded bytes of one input image
DEFAULT_MAX_IMAGE_PIXELS = 2048 * 2048      # width x height of one input image
DEFAULT_MAX_BATCH = 8


@dataclass(frozen=True)
class ImageLimits:
    """worker.yaml's ``max_image_bytes`` and ``max_image_pixels``, given to every image parameter."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class ParamSpec:
    """Where a request field goes in a workflow, and what values it may take."""

    name: str
    node: str
    input: str
    default: Any = None
    min: int | float | None = None
    max: int | float | None = None
    max_length: int | None = None
    type: str = ""                        # one of PARAM_TYPES; "" -> from the name (today's six)
    choices: tuple[Any, ...] | None = None  # enum: the values allowed (None: ComfyUI's list, from object_info)
    required: bool | None = None          # None -> prompt and image parameters are required
    max_bytes: int | None = None          # image: decoded size cap
    max_pixels: int | None = None         # image: width x height cap

    def __post_init__(self) -> None:
        if not self.type:
            object.__setattr__(self, "type", _LEGACY_TYPES[self.name])

    @property
    def kind(self) -> type:
        return _PY_TYPES[self.type]

    @property
    def is_required(self) -> bool:
        if self.required is not None:
            return self.required
        return self.name == "prompt" or self.type == "image"

    def to_json(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"type": JSON_TYPES[self.type]}
        if self.is_required:
            spec["required"] = True
        for key in ("default", "min", "max", "max_length", "choices", "max_bytes", "max_pixels"):
            value = getattr(self, key)
            if value is not None:
                spec[key] = list(value) if key == "choices" else value
        return spec


def builtin_params(workflow: str) -> dict[str, dict[str, Any]]:
    """The parameters of the packaged templates (t2i/workflows/<workflow>.json)."""
    common = {
        "prompt": {"node": "6", "input": "text", "max_length": 2000},
        "negative_prompt": {"node": "7", "input": "text", "default": "", "max_length": 2000},
        "seed": {"node": "3", "input": "seed"},
        "steps": {"node": "3", "input": "steps", "default": 20, "min": 1, "max": 150},
    }
    sampler = {
        "cfg": {"node": "3", "input": "cfg", "type": "float", "default": 7.0, "min": 0.0, "max": 30.0},
        "sampler_name": {"node": "3", "input": "sampler_name", "type": "enum", "default": "euler"},
        "scheduler": {"node": "3", "input": "scheduler", "type": "enum", "default": "normal"},
    }
    if workflow == "txt2img":
        return {**common,
                "width": {"node": "5", "input": "width", "default": 512, "min": 64, "max": 2048},
                "height": {"node": "5", "input": "height", "default": 512, "min": 64, "max": 2048},
                **sampler,
                "batch_size": {"node": "5", "input": "batch_size", "type": "int", "default": 1, "min": 1,
                               "max": DEFAULT_MAX_BATCH}}
    if workflow == "img2img":
        return {**common, **sampler,
                "denoise": {"node": "3", "input": "denoise", "type": "float", "default": 0.75, "min": 0.0,
                            "max": 1.0},
                "batch_size": {"node": "12", "input": "amount", "type": "int", "default": 1, "min": 1,
                               "max": DEFAULT_MAX_BATCH},
                "image": {"node": "10", "input": "image", "type": "image"}}
    raise KeyError(workflow)


BUILTIN_WORKFLOWS = ("txt2img", "img2img")


def builtin_spec(name: str, spec: dict[str, Any], limits: ImageLimits) -> ParamSpec:
    if spec.get("type") == "image":
        spec = {**spec, "max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels}
    return ParamSpec(name=name, **spec)


def load_param(sec: Section, name: str, template: dict[str, Any], limits: ImageLimits,
               taken: dict[tuple[str, str], str]) -> ParamSpec:
    """One ``params.<name>`` entry, checked against the workflow file; ``taken``: (node, input) -> param."""
    if name in RESERVED_FIELDS:
        raise sec.error(None, f"`{name}` is a request field of its own, not a parameter name")
    if not PARAM_NAME.match(name):
        raise sec.error(None, "a parameter name is lower-case letters, digits and _ (a request field)")
    node = str(sec.get("node", (str, int), required=True))
    inp = sec.get("input", str, required=True)
    if node not in template:
        raise sec.error("node", f"node {node!r} is not in the workflow file")
    if inp not in (template[node].get("inputs") or {}):
        raise sec.error("input", f"node {node!r} has no input {inp!r}")
    if (node, inp) in taken:
        raise sec.error("input", f"node {node!r} input {inp!r} is already filled by `{taken[(node, inp)]}`")
    taken[(node, inp)] = name
    ptype = _type_of(sec, name, template[node]["inputs"][inp])
    kind = {"int": int, "float": float, "bool": bool}.get(ptype, str)
    fields: dict[str, Any] = {"type": ptype, "required": sec.get("required", bool)}
    if ptype != "image":
        fields["default"] = sec.get("default", kind)
        if fields["default"] is None and name not in PARAM_KINDS:
            fields["default"] = _template_default(template[node]["inputs"][inp], ptype)
    if ptype in ("int", "float"):
        fields["min"] = sec.get("min", kind)
        fields["max"] = sec.get("max", kind)
    elif ptype == "string":
        fields["max_length"] = sec.get("max_length", int, MAX_LENGTH, minimum=1)
    elif ptype == "enum":
        choices = sec.get("choices", list)
        if choices is not None:
            if not choices or not all(isinstance(c, str) for c in choices):
                raise sec.error("choices", "must be a non-empty list of strings")
            fields["choices"] = tuple(choices)
    elif ptype == "image":
        fields.update(max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
    sec.finish()
    spec = ParamSpec(name, node, inp, **fields)
    _check_default(sec, spec)
    return spec


def _type_of(sec: Section, name: str, template_value: Any) -> str:
    written = sec.get("type", str)
    if written is not None and written not in PARAM_TYPES:
        raise sec.error("type", f"must be one of {', '.join(PARAM_TYPES)}, got {written!r}")
    if name in PARAM_KINDS:
        if written is not None and written != _LEGACY_TYPES[name]:
            raise sec.error("type", f"`{name}` is always {_LEGACY_TYPES[name]}")
        return _LEGACY_TYPES[name]
    if written is not None:
        return written
    if "choices" in sec.data:
        return "enum"
    for ptype, kinds in (("bool", bool), ("int", int), ("float", float), ("string", str)):
        if isinstance(template_value, kinds):
            return ptype
    raise sec.error("type", "is required here: the template's value of this input is not a plain value")


def _template_default(value: Any, ptype: str) -> Any:
    """The template's own value, as the default of a parameter that writes none."""
    if ptype == "bool":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if ptype == "int":
        return value if isinstance(value, int) else None
    if ptype == "float":
        return float(value) if isinstance(value, (int, float)) else None
    return value if isinstance(value, str) else None


def _check_default(sec: Section, spec: ParamSpec) -> None:
    if spec.min is not None and spec.max is not None and spec.min > spec.max:
        raise sec.error("min", "is greater than max")
    default = spec.default
    if default is None:
        return
    if spec.choices is not None and default not in spec.choices:
        raise sec.error("default", f"{default!r} is not one of the choices")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if spec.min is not None and default < spec.min:
            raise sec.error("default", f"{default!r} is less than min {spec.min!r}")
        if spec.max is not None and default > spec.max:
            raise sec.error("default", f"{default!r} is greater than max {spec.max!r}")
    if isinstance(default, str) and spec.max_length is not None and len(default) > spec.max_length:
        raise sec.error("default", f"is longer than max_length {spec.max_length}")
