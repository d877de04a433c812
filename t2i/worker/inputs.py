"""Input images: a job's ``image`` parameters uploaded to ComfyUI before its workflow is built.

Each image parameter's ``data:`` URL (already checked by t2i.validation) goes to
ComfyUI's ``POST /upload/image`` as ``t2i/<prompt_id>_<param>.<ext>`` (the extension
from the bytes), and the request's value becomes the name ComfyUI *answered*, which is
what LoadImage takes (PROTOCOL §12: it may store the file under another name). The
files stay in ComfyUI's input folder until retention prunes them with their job
(``comfyui.input_dir``; t2i.worker.retention).
"""

from __future__ import annotations

import dataclasses
import logging
import re

from t2i.comfyui import ComfyUIClient
from t2i.config import WorkerConfig
from t2i.dataurl import BadImage, decode_image
from t2i.validation import GenerateRequest, ValidationError

log = logging.getLogger(__name__)

SUBFOLDER = "t2i"  # ComfyUI's input/t2i/: every upload of t2i, and nothing else, is there

# An upload's name in input/t2i/, as ComfyUI may have stored it ("<name> (1).png" after a clash).
UPLOAD_NAME = re.compile(
    r"^(?P<prompt_id>[0-9a-f]{8}-[0-9a-f]{4}-[45][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})_[a-z][a-z0-9_]*"
    r"(?: \(\d+\))?\.(?:png|jpg|webp)$")


def upload_name(prompt_id: str, param: str, extension: str) -> str:
    """The name a job's input image is sent under (ComfyUI may answer another)."""
    return f"{prompt_id}_{param}.{extension}"


async def upload_inputs(comfy: ComfyUIClient, config: WorkerConfig, request: GenerateRequest,
                        prompt_id: str) -> tuple[GenerateRequest, list[str]]:
    """Upload the request's input images; returns (the request with each image parameter's value
    replaced by ComfyUI's name for it, e.g. ``"t2i/<prompt_id>_image.png"``, those names).

    A request without image parameters (or a raw workflow) comes back as it is, with ``[]``.
    Raises ValidationError for an image that is not acceptable (when it was not checked before),
    ComfyUIUnavailable (503) when ComfyUI cannot be reached, UploadRejected (a PromptRejected:
    502) when it refuses; then whatever was uploaded already is left for retention.
    """
    if request.raw_workflow is not None:
        return request, []
    workflow = config.workflows[request.workflow or config.default_workflow]
    params = dict(request.params)
    uploaded: list[str] = []
    for name, spec in workflow.params.items():
        if spec.type != "image" or not isinstance(params.get(name), str):
            continue
        try:
            image = decode_image(params[name], spec.max_bytes, spec.max_pixels)
        except BadImage as exc:
            raise ValidationError(f"`{name}` {exc}.", name) from None
        sent = upload_name(prompt_id, name, image.extension)
        stored = await comfy.upload_image(sent, image.data, image.content_type, subfolder=SUBFOLDER, overwrite=True)
        if stored != f"{SUBFOLDER}/{sent}":
            log.info("job %s: ComfyUI stored input image %s as %s", prompt_id, sent, stored)
        params[name] = stored
        uploaded.append(stored)
    if not uploaded:
        return request, []
    log.debug("job %s: uploaded %d input image(s): %s", prompt_id, len(uploaded), ", ".join(uploaded))
    return dataclasses.replace(request, params=params), uploaded
