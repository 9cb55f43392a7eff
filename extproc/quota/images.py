"""How many prompt tokens an image costs, and how big an inline image is.

OpenAI bills images by their size after resizing, with one of two formulas
(see OpenAI's vision guide, "Calculating costs"):

- tiles: fit in 2048x2048, then shrink until the short side is at most 768;
  cost = base + per_tile x number of 512-px tiles; ``detail: low`` costs
  the base alone.
- patches (the small 4.1/5/o4 models): 32-px patches, at most 1536 of them
  (the image shrinks to fit), times a per-model multiplier.

Anthropic bills about ``width x height / 750`` after fitting the image in
1568 px on its long side. We never fetch remote images: an ``http(s)`` URL
is charged at the worst case its model allows, a ``data:`` URL by the size
read from its header.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tiles:
    base: int
    per_tile: int


@dataclass(frozen=True, slots=True)
class Patches:
    multiplier: float
    cap: int = 1536


@dataclass(frozen=True, slots=True)
class ClaudeArea:
    long_edge: int = 1568


ImageRule = Tiles | Patches | ClaudeArea

# The largest image a tile model can be billed for is 2048x768 after resizing: 4x2 tiles.
_WORST_TILES = 8


def image_tokens(rule: ImageRule, size: tuple[int, int] | None, detail: str) -> int:
    """Tokens for one image; ``size`` None means unknown (the model's worst case)."""
    if isinstance(rule, Tiles):
        if detail == "low":
            return rule.base
        tiles = _WORST_TILES if size is None else _tile_count(*size)
        return rule.base + rule.per_tile * tiles
    if isinstance(rule, Patches):
        patches = rule.cap if size is None else _patch_count(*size, rule.cap)
        return math.ceil(patches * rule.multiplier)
    w, h = size if size is not None else (rule.long_edge, rule.long_edge * 3 // 4)
    scale = min(1.0, rule.long_edge / max(w, h))
    return math.ceil(max(1, round(w * scale)) * max(1, round(h * scale)) / 750)


def _tile_count(width: int, height: int) -> int:
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    return math.ceil(w / 512) * math.ceil(h / 512)


def _patch_count(w: int, h: int, cap: int) -> int:
    patches = math.ceil(w / 32) * math.ceil(h / 32)
    if patches <= cap:
        return patches
    shrink = math.sqrt(32 * 32 * cap / (w * h))
    sw, sh = w * shrink, h * shrink
    # shrink a little more so that the width is a whole number of patches
    shrink *= min(math.floor(sw / 32) / (sw / 32), math.floor(sh / 32) / (sh / 32))
    return min(cap, math.ceil(w * shrink / 32) * math.ceil(h * shrink / 32))


def data_url_size(url: str) -> tuple[int, int] | None:
    """Width and height of a ``data:image/...;base64,`` URL, or None."""
    if not url.startswith("data:"):
        return None
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        return None
    try:
        # A header sits in the first bytes, except a JPEG's, which may follow metadata.
        chunk = payload if "jpeg" in head or "jpg" in head else payload[:4096]
        raw = base64.b64decode(chunk[: len(chunk) // 4 * 4], validate=False)
    except (binascii.Error, ValueError):
        return None
    return sniff_size(raw)


def sniff_size(raw: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF, WebP or JPEG header."""
    if raw.startswith(b"\x89PNG\r\n\x1a\n") and len(raw) >= 24:
        w, h = struct.unpack(">II", raw[16:24])
        return w, h
    if raw[:6] in (b"GIF87a", b"GIF89a") and len(raw) >= 10:
        w, h = struct.unpack("<HH", raw[6:10])
        return w, h
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return _webp_size(raw)
    if raw[:2] == b"\xff\xd8":
        return _jpeg_size(raw)
    return None


def _webp_size(raw: bytes) -> tuple[int, int] | None:
    kind = raw[12:16]
    if kind == b"VP8 " and len(raw) >= 30:
        w, h = struct.unpack("<HH", raw[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and len(raw) >= 25:
        bits = int.from_bytes(raw[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(raw) >= 30:
        return int.from_bytes(raw[24:27], "little") + 1, int.from_bytes(raw[27:30], "little") + 1
    return None


def _jpeg_size(raw: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(raw):
        if raw[i] != 0xFF:
            i += 1
            continue
        marker = raw[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 2 if marker != 0xFF else 1
            continue
        length = int.from_bytes(raw[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", raw[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None
