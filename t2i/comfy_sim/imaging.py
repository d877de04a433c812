"""Pictures for the ComfyUI test double: RGB rasters, a PNG writer/reader and a tiny JPEG encoder.

Standard library only. Rows are built with bytes operations (a row is a few
``bytes * n`` joins), never one Python step per pixel, so a 1024x1024 image
costs milliseconds plus zlib time. Callers run the encoders off the event loop.

* ``Picture`` is a lazily rendered RGB image (noise, a flat colour, or the
  "painting" that stands in for a diffusion result: stripes and bands whose
  colours come from a hash of the prompt text and the seed).
* ``encode_png`` writes IHDR, one tEXt chunk per metadata key (ComfyUI writes
  ``prompt``), IDAT, IEND -- the chunk list recorded from real ComfyUI.
* ``encode_jpeg`` writes a valid baseline JPEG whose 8x8 blocks are flat
  colours (DC coefficients only). It is what previews and ``/view?preview=``
  return: coarse, but a real JPEG any decoder reads.
"""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from typing import Iterable, Sequence

RGB = tuple[int, int, int]


# ----------------------------------------------------------------- pictures

class Picture:
    """A width x height RGB raster, rendered on demand (``rows()``)."""

    def __init__(self, width: int, height: int, kind: str, **params):
        self.width = int(width)
        self.height = int(height)
        self.kind = kind
        self.params = params

    def __repr__(self) -> str:  # what format_value() shows in execution_error
        return f"<Picture {self.kind} {self.width}x{self.height}>"

    def rows(self) -> list[bytes]:
        return getattr(self, "_rows_" + self.kind)()

    def _rows_solid(self) -> list[bytes]:
        row = bytes(self.params["rgb"]) * self.width
        return [row] * self.height

    def _rows_pixels(self) -> list[bytes]:  # a decoded file's own rows
        return self.params["rows"]

    def _rows_noise(self) -> list[bytes]:
        data = random.Random(self.params["seed"]).randbytes(self.width * self.height * 3)
        stride = self.width * 3
        return [data[y * stride:(y + 1) * stride] for y in range(self.height)]

    def _rows_painting(self) -> list[bytes]:
        spec = painting_spec(self.params["key"], self.width)
        return [_painting_row(spec, y, self.height) for y in range(self.height)]

    def block_colors(self, step: int = 8) -> list[RGB]:
        """One colour per step x step block (its centre pixel), row-major."""
        rows = self.rows()
        return sample_blocks(rows, self.width, self.height, step)


def painting_spec(key: str, width: int) -> dict:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    digest += hashlib.sha256(digest).digest()
    palette = [tuple(digest[i:i + 3]) for i in range(0, 15, 3)]
    count = 3 + digest[15] % 6
    weights = [1 + digest[16 + i] for i in range(count)]
    total = sum(weights)
    widths, used = [], 0
    for i, weight in enumerate(weights):
        w = width - used if i == count - 1 else max(1, width * weight // total)
        w = max(0, min(w, width - used))
        widths.append(w)
        used += w
    phases = [digest[24 + i] / 255.0 for i in range(count)]
    band = 6 + digest[31] % 40
    disc = (digest[40] / 255.0, digest[41] / 255.0, 0.12 + 0.25 * digest[42] / 255.0)  # centre x, y, radius
    return {"palette": palette, "widths": widths, "phases": phases, "band": band, "disc": disc,
            "disc_rgb": tuple(255 - c for c in palette[4])}


def _mix(a: Sequence[int], b: Sequence[int], t: float) -> RGB:
    return tuple(int(a[i] + (b[i] - a[i]) * t) & 255 for i in range(3))  # type: ignore[return-value]


def _painting_row(spec: dict, y: int, height: int) -> bytes:
    row = _stripes_row(spec, y, height)
    width = len(row) // 3
    cx, cy, r = spec["disc"]
    radius = r * min(width, height)
    dy = y + 0.5 - cy * height
    if abs(dy) < radius:
        half = (radius * radius - dy * dy) ** 0.5
        x0 = max(0, int(cx * width - half))
        x1 = min(width, int(cx * width + half))
        if x1 > x0:
            row = row[:x0 * 3] + bytes(spec["disc_rgb"]) * (x1 - x0) + row[x1 * 3:]
    return row


def _stripes_row(spec: dict, y: int, height: int) -> bytes:
    t = y / max(1, height - 1)
    palette = spec["palette"]
    shade = 0.82 if (y // spec["band"]) % 2 else 1.0
    parts = []
    for i, w in enumerate(spec["widths"]):
        if w <= 0:
            continue
        f = abs(((t + spec["phases"][i]) % 1.0) * 2.0 - 1.0)
        r, g, b = _mix(palette[i % 5], palette[(i + 2) % 5], f)
        parts.append(bytes((int(r * shade), int(g * shade), int(b * shade))) * w)
    return b"".join(parts)


def sample_blocks(rows: Sequence[bytes], width: int, height: int, step: int = 8) -> list[RGB]:
    colors: list[RGB] = []
    stride = step * 3
    for by in range(0, height, step):
        row = rows[min(by + step // 2, height - 1)]
        first = min(step // 2, width - 1) * 3
        reds, greens, blues = row[first::stride], row[first + 1::stride], row[first + 2::stride]
        count = (width + step - 1) // step
        for i in range(count):
            j = min(i, len(reds) - 1)
            colors.append((reds[j], greens[j], blues[j]))
    return colors


def blend_blocks(a: Sequence[RGB], b: Sequence[RGB], t: float) -> list[RGB]:
    return [_mix(x, y, t) for x, y in zip(a, b)]


# ----------------------------------------------------------------- PNG

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width: int, height: int, rows: Iterable[bytes], text: dict[str, str] | None = None,
               level: int = 4) -> bytes:
    """8-bit RGB PNG, filter 0 on every row, tEXt chunks before IDAT (as PIL writes them)."""
    raw = b"".join(b"\x00" + row for row in rows)
    out = [PNG_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    for key, value in (text or {}).items():
        out.append(_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace")))
    out.append(_chunk(b"IDAT", zlib.compress(raw, level)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes, bool]]:
    """[(type, payload, crc_ok)] of a PNG; raises ValueError when it is not one."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    pos, chunks = len(PNG_SIGNATURE), []
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        payload = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        chunks.append((kind, payload, zlib.crc32(kind + payload) & 0xFFFFFFFF == crc))
        pos += 12 + length
        if kind == b"IEND":
            break
    return chunks


def decode_png_rgb(data: bytes) -> tuple[int, int, list[bytes]] | None:
    """Rows of an 8-bit RGB/RGBA PNG that uses filter 0 (what encode_png writes); None otherwise."""
    try:
        chunks = png_chunks(data)
    except ValueError:
        return None
    header = next((p for k, p, _ in chunks if k == b"IHDR"), None)
    if header is None:
        return None
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or color not in (2, 6) or interlace:
        return None
    channels = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(p for k, p, _ in chunks if k == b"IDAT"))
    stride = width * channels + 1
    rows = []
    for y in range(height):
        line = raw[y * stride:(y + 1) * stride]
        if not line or line[0] != 0:
            return None
        line = line[1:]
        if channels == 4:
            line = b"".join(bytes(px) for px in zip(line[0::4], line[1::4], line[2::4]))
        rows.append(line)
    return width, height, rows


# ----------------------------------------------------------------- JPEG (DC only)

_DC_BITS = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
_DC_VALS = list(range(12))
_AC_BITS = [1] + [0] * 15  # one code: '0' = EOB, every block has only its DC term
_AC_VALS = [0]


def _huffman_codes(bits: list[int], vals: list[int]) -> dict[int, tuple[int, int]]:
    codes, code, k = {}, 0, 0
    for length in range(1, 17):
        for _ in range(bits[length - 1]):
            codes[vals[k]] = (code, length)
            code += 1
            k += 1
        code <<= 1
    return codes


_DC_CODES = _huffman_codes(_DC_BITS, _DC_VALS)
_EOB = _huffman_codes(_AC_BITS, _AC_VALS)[0]


class _BitWriter:
    def __init__(self):
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def write(self, value: int, length: int) -> None:
        self.acc = (self.acc << length) | (value & ((1 << length) - 1))
        self.n += length
        while self.n >= 8:
            self.n -= 8
            byte = (self.acc >> self.n) & 0xFF
            self.out.append(byte)
            if byte == 0xFF:
                self.out.append(0)
        self.acc &= (1 << self.n) - 1

    def flush(self) -> bytes:
        if self.n:
            self.write((1 << (8 - self.n)) - 1, 8 - self.n)
        return bytes(self.out)


def _ycc(rgb: Sequence[int]) -> tuple[int, int, int]:
    r, g, b = rgb
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return tuple(max(-128, min(127, int(round(v)) - 128)) for v in (y, cb, cr))  # type: ignore[return-value]


def encode_jpeg(width: int, height: int, blocks: Sequence[RGB]) -> bytes:
    """Baseline JPEG of width x height whose 8x8 blocks have the given colours (row-major)."""
    bw, bh = (width + 7) // 8, (height + 7) // 8
    if len(blocks) < bw * bh:
        raise ValueError("not enough block colours")
    quant = bytes([8] * 64)  # DC quantiser 8: the quantised DC term is the level-shifted mean
    out = [
        b"\xff\xd8",
        b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00",
        b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + quant,
        b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + bytes([1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0]),
        b"\xff\xc4" + struct.pack(">H", 2 + 17 + len(_DC_VALS) + 17 + len(_AC_VALS))
        + b"\x00" + bytes(_DC_BITS) + bytes(_DC_VALS) + b"\x10" + bytes(_AC_BITS) + bytes(_AC_VALS),
        b"\xff\xda" + struct.pack(">HB", 12, 3) + bytes([1, 0, 2, 0, 3, 0]) + bytes([0, 63, 0]),
    ]
    bits = _BitWriter()
    previous = [0, 0, 0]
    eob_code, eob_len = _EOB
    for index in range(bw * bh):
        for comp, value in enumerate(_ycc(blocks[index])):
            diff = value - previous[comp]
            previous[comp] = value
            size = abs(diff).bit_length()
            code, length = _DC_CODES[size]
            bits.write(code, length)
            if size:
                bits.write(diff if diff > 0 else diff + (1 << size) - 1, size)
            bits.write(eob_code, eob_len)
    out.append(bits.flush())
    out.append(b"\xff\xd9")
    return b"".join(out)


def jpeg_of_rows(width: int, height: int, rows: Sequence[bytes]) -> bytes:
    return encode_jpeg(width, height, sample_blocks(rows, width, height, 8))
