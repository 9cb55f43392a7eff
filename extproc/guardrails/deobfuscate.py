"""Second views of a prompt for the injection scan: the text an obfuscated attack hides.

An attacker who knows a phrase list writes around it: zero-width characters
inside words, Cyrillic or Greek look-alike letters, fullwidth or mathematical
letters, leetspeak ("1gn0r3"), spaced or hyphen-split letters
("i g n o r e", "i-nstruction"), or the whole payload in base64, hex, binary,
URL encoding or rot13. ``views`` gives each undone form once, with the span of the
original it came from, and the scan runs the same phrase families on it.

Cost: the views are built only after the plain scan found nothing, only from
the first and last ``VIEW_CHARS`` characters, and only for what the text shows
signs of (rot13 only when the text names it: a payload nobody is told to
decode is no attack). Decoding is bounded: at most ``MAX_BLOBS`` blobs, each at
most ``MAX_BLOB`` characters.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
import urllib.parse
from collections.abc import Iterator

# one table undoes what a masked word is made of: invisible characters dropped, Cyrillic and Greek look-alikes
# and leetspeak digits mapped to Latin letters (the original text was scanned first, so Russian read as Latin
# garbage here loses nothing)
_UNMASK = str.maketrans({**dict.fromkeys("\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff"),
                         "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j",
                         "ѕ": "s", "ԁ": "d", "ɡ": "g", "ӏ": "l", "ο": "o", "α": "a", "ν": "v", "ι": "i", "κ": "k",
                         "τ": "t", "υ": "u", "χ": "x", "ε": "e", "ω": "w", "ѵ": "v"})
_LONG_TOKEN = re.compile(r"(?<!\S)\S{16,}")
_BLOB_EDGES = "\"'`()[]{}<>,;:.!?"
# an invisible character, fullwidth or mathematical letters, Cyrillic or Greek (a Russian text takes the slow path)
_MASKED = re.compile(r"[\u00ad\u180e\u200b-\u200f\u2060-\u2064\ufeff\uff01-\uff5e\U0001d400-\U0001d7ff\u0370-\u04ff]")
_LEET_BYTES = bytes.maketrans(b"013457@$|", b"oieastasi")
_SPACED = re.compile(r"\b[a-z](?:[ .*_-]{1,5}[a-z]\b){3,}")
_SPLIT = re.compile(r"(?<=\b[a-z])-(?=[a-z]{2})|(?<=\b[a-z]{2})-(?=[a-z]{2})")
SPACED_UP_TO = 1024  # spaced-out letters are undone in a short text, or one that is mostly spaces
_HEX = re.compile(r"\b[0-9a-fA-F]{16,}\b|\b[0-9a-fA-F]{2}(?:[\s,:][0-9a-fA-F]{2}){7,}\b|(?:\\x[0-9a-fA-F]{2}){8,}"
                  r"|\b0x[0-9a-fA-F]{2}(?:[\s,]+0x[0-9a-fA-F]{2}){7,}")
_BINARY = re.compile(r"\b[01]{8}(?:['\",\s]+[01]{8}){3,}")
_PERCENT = re.compile(r"%[0-9a-f]{2}\w+%[0-9a-f]{2}")  # URL-encoded words: "ignore%20all%20previous"
_ROT13_HINT = ("rot13", "rot-13", "rot 13", "caesar")
VIEW_CHARS = 2048  # head and tail: what a masked attack must say, it says where the model reads first or last
MAX_BLOBS = 8
MAX_BLOB = 4096
_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_ROT13 = str.maketrans("abcdefghijklmnopqrstuvwxyz", "nopqrstuvwxyzabcdefghijklm")
_DIGITS = "0123456789"


def views(text: str) -> Iterator[tuple[str, int, int, bool]]:
    """(lower-cased undone text, start, end in ``text``, decoded?) for every obfuscation the text shows signs of."""
    if len(text) > 2 * VIEW_CHARS:
        yield from _views(text[:VIEW_CHARS], 0)
        yield from _views(text[-VIEW_CHARS:], len(text) - VIEW_CHARS)
    else:
        yield from _views(text, 0)


def _views(text: str, base: int) -> Iterator[tuple[str, int, int, bool]]:
    low = text.lower()
    plain = unmask(low)
    if plain != low:
        yield plain, base, base + len(text), False
    if "%" in low and _PERCENT.search(low):
        yield urllib.parse.unquote(low).lower(), base, base + len(text), True
    if any(h in low for h in _ROT13_HINT):
        yield low.translate(_ROT13), base, base + len(text), False
    for decoded, start, end in _decoded(text, low):
        yield decoded, base + start, base + end, True


def unmask(low: str) -> str:
    """Invisible characters dropped, look-alikes and leetspeak mapped to Latin, spaced and split letters joined."""
    s = low
    if not low.isascii() and _MASKED.search(low):
        s = unicodedata.normalize("NFKC", low).lower().translate(_UNMASK)
    s = s.encode().translate(_LEET_BYTES).decode()  # UTF-8 keeps ASCII bytes out of other characters: safe, C speed
    if len(s) <= SPACED_UP_TO or s.count(" ") * 3 > len(s):
        s = _SPLIT.sub("", _SPACED.sub(_join, s))
    return s


def _join(m: re.Match[str]) -> str:
    """Letters with gaps between them joined; a wider gap than the usual one is a word break."""
    run = m.group()
    gaps = re.findall(r"[^a-z]+", run)
    narrow = min(len(g) for g in gaps)
    return "".join(p if p.isalpha() else (" " if len(p) > narrow else "") for p in re.findall(r"[a-z]|[^a-z]+", run))


def _decoded(text: str, low: str) -> Iterator[tuple[str, int, int]]:
    """Printable text hidden in base64 or hex tokens, or in spaced hex or binary (only where digits abound)."""
    n = 0
    tried: set[str] = set()
    for m in _LONG_TOKEN.finditer(text):
        blob = m.group().strip(_BLOB_EDGES)[:MAX_BLOB]
        if blob in tried:
            continue
        tried.add(blob)
        # a token of hex digits only is read as hex (base64 of text is never all hex digits)
        plain = _from_hex(blob) if _HEX_DIGITS.issuperset(blob) else _from_base64(blob)
        if plain is not None:
            yield plain.lower(), m.start(), m.end()
            n += 1
            if n >= MAX_BLOBS:
                return
    if sum(low.count(d) for d in _DIGITS) * 4 > len(low):
        for rx, decode in ((_HEX, _from_hex), (_BINARY, _from_binary)):
            for m in rx.finditer(text, 0, MAX_BLOB * MAX_BLOBS):
                plain = decode(m.group()[:MAX_BLOB])
                if plain is not None:
                    yield plain.lower(), m.start(), m.end()


def _printable(raw: bytes) -> str | None:
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    good = sum(c.isprintable() or c in "\n\t" for c in s)
    return s if s and good / len(s) >= 0.9 and any(c.isalpha() for c in s) else None


def _from_base64(blob: str) -> str | None:
    if (blob.isalpha() and (blob.islower() or blob.isupper())) or not _B64_CHARS.issuperset(blob):
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
