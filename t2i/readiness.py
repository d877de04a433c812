"""Can this ComfyUI run this workflow? Checked against its ``GET /object_info/{class}``.

Pure: :func:`problems_of` takes a workflow and the node descriptions ComfyUI gave and
says, in sentences, what is missing: a node class ComfyUI does not have, or a list
value (checkpoint, VAE, LoRA, sampler, scheduler…) it does not offer. The worker's
routing readiness and ``t2i-worker --check`` both use it.
"""

from __future__ import annotations

from typing import Any, Iterable

# ComfyUI folder lists, named the way people name them ("ComfyUI has no checkpoint X").
_KINDS = {"ckpt_name": "checkpoint", "vae_name": "VAE", "lora_name": "LoRA", "control_net_name": "ControlNet model",
          "clip_name": "CLIP model", "unet_name": "diffusion model", "upscale_model": "upscale model",
          "sampler_name": "sampler", "scheduler": "scheduler"}
_SHOWN = 5  # list values named in a sentence, at most


def classes_of(workflow: dict[str, Any]) -> set[str]:
    return {node["class_type"] for node in workflow.values()
            if isinstance(node, dict) and isinstance(node.get("class_type"), str)}


def combo_options(spec: Any) -> list[Any] | None:
    """The allowed values of a COMBO input spec, in either of ComfyUI's two shapes; None otherwise."""
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):  # [["a.safetensors", "b.safetensors"], {...}]
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):  # ["COMBO", {"options": [...]}]
        options = spec[1].get("options")
        return options if isinstance(options, list) else None
    return None


def problems_of(workflow: dict[str, Any], object_info: dict[str, Any],
                skip_inputs: Iterable[tuple[str, str]] = ()) -> list[str]:
    """What stops ComfyUI running ``workflow``: one sentence per problem (empty: it can).

    ``object_info``: class name -> ComfyUI's description of it (``{}`` or absent: no such
    node). ``skip_inputs``: (node id, input) pairs a request fills in (checked per request
    by ComfyUI itself).
    """
    skip = set(skip_inputs)
    problems: list[str] = []
    for node_id, node in workflow.items():
        if not isinstance(node, dict):
            continue
        class_type = node.get("class_type")
        info = object_info.get(class_type) if isinstance(class_type, str) else None
        if not info:
            problems.append(f"ComfyUI has no node {class_type!r} (node {node_id}; a custom node not installed?)")
            continue
        declared = {}
        for group in ("required", "optional"):
            declared.update((info.get("input") or {}).get(group) or {})
        for name, value in (node.get("inputs") or {}).items():
            if (node_id, name) in skip or isinstance(value, list):  # a link, or the request's value
                continue
            options = combo_options(declared.get(name))
            if options is not None and value not in options:
                kind = _KINDS.get(name, f"{name} value")
                offered = ", ".join(str(o) for o in options[:_SHOWN]) + (" …" if len(options) > _SHOWN else "")
                problems.append(f"ComfyUI has no {kind} {value} (it has: {offered or 'none'})")
    return problems
