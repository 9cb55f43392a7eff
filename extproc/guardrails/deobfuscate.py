"""Second views of a prompt for the injection scan: the text an obfuscated attack hides.

An attacker who knows a phrase list writes around it: zero-width characters
inside words, Cyrillic or Greek look-alike letters, fullwidth or mathematical
letters, leetspeak ("1gn0r3"), spaced or hyphen-split letters
("i g n o r e", "i-nstruction"), or the whole payload in base64, hex, binary
or rot13. ``views`` gives each undone form once, with the span of the
original it came from, and the scan runs the same phrase families on it.

Cost: the views are built only after the plain scan found nothing, and only
from what the text actually holds (a prompt of plain ASCII words with no long
alphanumeric blob gets the rot13 view alone, and only when short). Decoding is
bounded: at most ``MAX_BLOBS`` blobs, each at most ``MAX_BLOB`` characters.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Iterator

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff"))
# Cyrillic and Greek letters drawn like Latin ones (lower case; the scan lower-cases first)
_HOMOGLYPHS = str.maketrans({"а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j",
                             "ѕ": "s", "ԁ": "d", "ɡ": "g", "ӏ": "l", "ο": "o", "α": "a", "ν": "v", "ι": "i", "κ": "k",
                             "τ": "t", "υ": "u", "χ": "x", "ε": "e", "ω": "w", "ѵ": "v"})
_LEET = str.maketrans("013457@$|!8", "oieastasiib")
_ODD = re.compile(r"[^\x00-\x7f]|[a-z][0-9@$|][a-z]|[0-9@$][a-z]{2}|(?<![a-z])[a-z][ .\-_*·]{1,5}[a-z][ .\-_*·]{1,5}"
                  r"[a-z](?![a-z])|[a-z]-[a-z]")
_MIXED_WORD = re.compile(r"[^\W\d_]+")
_LEET_WORD = re.compile(r"[a-z0-9@$|!]*[a-z][a-z0-9@$|!]*")
_SPACED = re.compile(r"(?<![a-z])(?:[a-z](?:[ .\-_*·]{1,5}|\n))+[a-z](?![a-z])")
_SPLIT = re.compile(r"(?<=[a-z])-\s?(?=[a-z])")
_BASE64 = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
_HEX = re.compile(r"(?:(?:0x|\\x)?[0-9a-fA-F]{2}[\s,:]?){8,}")
_BINARY = re.compile(r"(?:[01]{8}['\",\s]*){4,}")
MAX_BLOBS = 8
MAX_BLOB = 4096
ROT13_UP_TO = 4096
_ROT13 = str.maketrans("abcdefghijklmnopqrstuvwxyz", "nopqrstuvwxyzabcdefghijklm")


def views(text: str) -> Iterator[tuple[str, int, int]]:
    """(lower-cased undone text, start, end in ``text``) for every obfuscation the text shows signs of."""
    low = text.lower()
    if _ODD.search(low):
        plain = unmask(low)
        if plain != low:
            yield plain, 0, len(text)
    if len(text) <= ROT13_UP_TO:
        yield low.translate(_ROT13), 0, len(text)
    yield from _decoded(text)


def unmask(low: str) -> str:
    """Zero-width characters dropped, look-alikes mapped to Latin, leetspeak and spaced letters undone."""
    s = unicodedata.normalize("NFKC", low.translate(_ZERO_WIDTH)).lower()
    s = _MIXED_WORD.sub(_latin, s)
    s = _LEET_WORD.sub(_unleet, s)
    s = _SPACED.sub(_join, s)
    return _SPLIT.sub("", s)


def _latin(m: re.Match[str]) -> str:
    w = m.group()
    if w.isascii() or not any("a" <= c <= "z" for c in w):
        return w  # a plain word, or a word of another script (Russian stays Russian)
    return w.translate(_HOMOGLYPHS)


def _unleet(m: re.Match[str]) -> str:
    w = m.group()
    return w.translate(_LEET) if not w.isalpha() and not w.isdigit() else w


def _join(m: re.Match[str]) -> str:
    """Letters with gaps between them joined; a wider gap than the usual one is a word break."""
    run = m.group()
    gaps = re.findall(r"[^a-z]+", run)
    narrow = min(len(g) for g in gaps)
    return "".join(p if p.isalpha() else (" " if len(p) > narrow else "") for p in re.findall(r"[a-z]|[^a-z]+", run))


def _decoded(text: str) -> Iterator[tuple[str, int, int]]:
    """Printable text hidden in base64, hex or binary blobs."""
    n = 0
    for rx, decode in ((_BASE64, _from_base64), (_HEX, _from_hex), (_BINARY, _from_binary)):
        for m in rx.finditer(text):
            if n >= MAX_BLOBS:
                return
            blob = m.group()[:MAX_BLOB]
            plain = decode(blob)
            if plain is not None:
                n += 1
                yield plain.lower(), m.start(), m.end()


def _printable(raw: bytes) -> str | None:
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    good = sum(c.isprintable() or c in "\n\t" for c in s)
    return s if s and good / len(s) >= 0.9 and any(c.isalpha() for c in s) else None


def _from_base64(blob: str) -> str | None:
    if blob.isalpha() and (blob.islower() or blob.isupper()):
        return None  # a long word or a name, not an encoding
    try:
        raw = base64.b64decode(blob + "=" * (-len(blob) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return _printable(raw)


def _from_hex(blob: str) -> str | None:
    digits = re.sub(r"0x|\\x|[\s,:]", "", blob)
    if len(digits) % 2:
        digits = digits[:-1]
    try:
        return _printable(bytes.fromhex(digits))
    except ValueError:
        return None


def _from_binary(blob: str) -> str | None:
    bits = re.findall(r"[01]{8}", blob)
    return _printable(bytes(int(b, 2) for b in bits))
