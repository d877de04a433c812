"""Copying a finished job's images out of ComfyUI into the worker's ``images/``."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

from t2i.comfyui import ComfyUIClient, ComfyUIError, ComfyUIUnavailable, ImageRef
from t2i.dataurl import sniff
from t2i.worker.images import ImageStore

log = logging.getLogger(__name__)


class CollectError(Exception):
    """The images could not be copied; ``str()`` is the sentence the job fails with.

    ``retry``: ComfyUI could not be reached, so its files may still be fetched once it is back.
    """

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message)
        self.retry = retry


async def collect_images(comfy: ComfyUIClient, images: ImageStore, prompt_id: str, refs: list[ImageRef],
                         prefetched: dict[ImageRef, asyncio.Future] | None = None,
                         in_hand: Callable[[str], None] | None = None) -> list[str]:
    """Fetch each output with ``/view`` and store it atomically, not yet fsynced
    (:meth:`ImageStore.make_durable` does that); all or nothing.

    ``prefetched``: ``/view`` fetches started when `executed` named the file; one that failed is
    fetched again here. ``in_hand(name)``: called when the first image's bytes are fetched and
    checked, before they are written; :meth:`ImageStore.read` has them from then on (a client waiting
    for the image need not wait for the disk). Returns the stored names. On failure the files already
    stored are removed (and the bytes in hand forgotten), and :class:`CollectError` is raised.
    """
    saved: list[str] = []
    for number, ref in enumerate(refs):
        try:
            data, content_type = await _fetch(comfy, ref, (prefetched or {}).get(ref))
        except ComfyUIError as exc:
            await discard_images(images, saved)
            log.error("job %s: could not fetch image %s: %s", prompt_id, ref.filename, exc)
            raise CollectError(f"Could not fetch the image from ComfyUI: {exc}",
                               retry=isinstance(exc, ComfyUIUnavailable)) from None
        try:
            kind = image_type(data, content_type)
        except ValueError as exc:
            await discard_images(images, saved)
            log.error("job %s: ComfyUI's /view of %s: %s", prompt_id, ref.filename, exc)
            raise CollectError(f"ComfyUI sent something other than an image for {ref.filename}: {exc}.") from None
        name = ImageStore.filename_for(prompt_id, number, kind)
        if number == 0 and in_hand is not None:
            images.keep_fresh(name, data)
            in_hand(name)
        try:
            await images.save(name, data, durable=False)
        except OSError as exc:  # disk full, read-only folder: the job fails, the worker goes on
            images.forget([name])
            await discard_images(images, saved)
            log.error("job %s: could not save image %s: %s", prompt_id, name, exc)
            raise CollectError(f"Could not save the image: {exc}") from None
        saved.append(name)
    return saved


async def _fetch(comfy: ComfyUIClient, ref: ImageRef, early: asyncio.Future | None) -> tuple[bytes, str]:
    if early is not None:
        try:
            return await early
        except ComfyUIError as exc:
            log.debug("the early /view of %s failed (%s); fetching it again", ref.filename, exc)
    return await comfy.view(ref)


def image_type(data: bytes, content_type: str) -> str:
    """The type of the image in ``data``, served as ``content_type``; ValueError saying why it is not one.

    ``application/octet-stream`` claims nothing (ComfyUI sends it for extensions it does not
    know), so the bytes decide; any other type must be the one the bytes are.
    """
    kind = sniff(data)
    if kind is None:
        raise ValueError(f"{len(data)} bytes served as {content_type or 'no type'} that are not a PNG, JPEG, "
                         "WebP or GIF image")
    if content_type.lower() not in (kind, "application/octet-stream"):
        raise ValueError(f"the bytes are {kind} but were served as {content_type or 'no type'}")
    return kind


async def discard_images(images: ImageStore, names: list[str]) -> None:
    """Delete stored images (off the event loop) and forget them."""
    if not names:
        return
    images.forget(names)
    paths = [images.directory / name for name in names]
    await asyncio.get_running_loop().run_in_executor(None, _unlink_all, paths)


def _unlink_all(paths: list) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass
