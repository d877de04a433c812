"""Input images as requests carry them: ``data:`` URLs, checked by their content.

A request field of type ``image`` holds ``data:<type>;base64,<bytes>``. What the
bytes are is read from the bytes (PNG, JPEG or WebP magic and header), never from
the declared type or a file name; the pixel size comes from the image's own header.
Pure and standard-library only: the scheduler and the worker both check requests
with it (t2i.validation), the worker decodes again to upload (t2i.worker.inputs).
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass

# content type -> the file extension an upload gets
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class BadImage(ValueError):
    """Why a value is not an acceptable input image; ``str()`` is a sentence without the field name."""


@dataclass(frozen=True)
class InputImage:
    data: bytes
    content_type: str  # from the bytes: image/png, image/jpeg or image/webp
    width: int
    height: int

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.content_type]


def decode_image(value: object, max_bytes: int | None = None, max_pixels: int | None = None) -> InputImage:
    """A ``data:`` URL -> the image in it; raises :class:`BadImage` saying what is wrong."""
    if not isinstance(value, str) or not value.startswith("data:"):
        raise BadImage("must be a data: URL (data:image/png;base64,…)")
    header, comma, payload = value.partition(",")
    if not comma or not header.endswith(";base64"):
        raise BadImage("must be a base64 data: URL (data:image/png;base64,…)")
    if max_bytes is not None and len(payload) // 4 * 3 > max_bytes + 2:
        raise BadImage(f"is larger than {max_bytes} bytes")  # before decoding megabytes for nothing
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("is not valid base64 after data:…;base64,") from None
    if not data:
        raise BadImage("is empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise BadImage(f"is larger than {max_bytes} bytes ({len(data)})")
    content_type = sniff(data)
    if content_type not in EXTENSIONS:  # a GIF is an image, but not one ComfyUI's LoadImage takes
        raise BadImage("is not a PNG, JPEG or WebP image")
    size = dimensions(data, content_type)
    if size is None:
        raise BadImage(f"is a damaged or truncated {EXTENSIONS[content_type].upper()} image")
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise BadImage(f"is {width}×{height} pixels; at most {max_pixels} pixels are allowed")
    return InputImage(data, content_type, width, height)


def sniff(data: bytes) -> str | None:
    """The image type ``data`` starts like (PNG, JPEG, WebP, GIF: by magic number), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def dimensions(data: bytes, content_type: str) -> tuple[int, int] | None:
    """(width, height) from the image's header; None when the header is not there or says 0."""
    reader = {"image/png": _png_size, "image/jpeg": _jpeg_size, "image/webp": _webp_size}.get(content_type)
    if reader is None:
        return None
    try:
        size = reader(data)
    except (struct.error, IndexError):
        return None
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


# JPEG markers that start a frame (SOF0..SOF15 but DHT C4, JPG C8 and DAC CC)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD8:  # no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        pos += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: frame tag, start code 9d 01 2a, 14-bit sizes
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: signature 2f, then 14 bits each of width-1, height-1
        if data[20] != 0x2F:
            return None
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit canvas width-1, height-1
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None
