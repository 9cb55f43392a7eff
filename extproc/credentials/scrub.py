"""Take every credential the gateway injected out of what goes back to the client.

A provider (or a proxy in front of it) may echo the credential it received
in an error: whole, or in a recognisable part. OpenAI's own 401 says
``Incorrect API key provided: sk-proj-****abcd``; others show the first
characters, or the key with its middle elided (``sk-...abcd``). The gateway
injected that key, the client never had it, so none of it may reach the
client: not in a body passed through, not in a translated error, not in an
SSE error event, not in a header.

What is taken out, for each injected secret (replaced by ``[REDACTED]``):

* the secret itself;
* any run of ``WINDOW`` or more of its characters (a key cut short, a
  prefix shown);
* an elided form: an elision mark (``***``, ``...``, ``…``, ``xxx``,
  ``••``) ending in four or more of the secret's last characters, with or
  without some of its first characters in front.

The full check is a few regular-expression searches; it runs on every
header and on every error body and error event. A successful body is only
searched for the whole secret (one ``bytes.find``), since a provider that
echoes a key does so in an error.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

REDACTED = "[REDACTED]"
WINDOW = 12  # characters of a secret in a row that count as the secret
_ELISION = r"(?:\*{2,}|\.{2,}|…|x{3,}|X{3,}|•+)"
_TAIL = re.compile(r"[A-Za-z0-9_\-]{4,}")


class Scrubber:
    """Redacts the given secrets (injected for one exchange) from text, bytes and headers."""

    __slots__ = ("_secrets", "_exact", "_pattern")

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True))
        self._exact = tuple(s.encode() for s in self._secrets)
        parts: list[str] = []
        for s in self._secrets:
            n = min(WINDOW, len(s))
            runs = "|".join(re.escape(s[i:i + n]) for i in range(len(s) - n + 1))
            parts.append(rf"(?:{runs})[A-Za-z0-9_\-]*")  # a run, and whatever word characters follow it
            # an elision mark followed by characters that end the secret (checked in _replace)
            head = re.escape(s[:3])
            parts.append(rf"(?:{head}[A-Za-z0-9_\-]{{0,12}}?)?{_ELISION}[A-Za-z0-9_\-]{{4,}}")
        self._pattern = re.compile("|".join(parts)) if parts else None

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def _replace(self, m: re.Match[str]) -> str:
        found = m.group(0)
        if any(found[:WINDOW] in s for s in self._secrets):  # the secret, or a run of its characters
            return REDACTED
        tails = _TAIL.findall(found)  # an elided form: what follows the mark must end a secret
        if tails and any(s.endswith(tails[-1][-4:]) for s in self._secrets):
            return REDACTED
        return found

    def text(self, value: str) -> str:
        """``value`` with every secret and every recognisable part of one replaced."""
        if self._pattern is None:
            return value
        return self._pattern.sub(self._replace, value)

    def body(self, data: bytes) -> bytes:
        """The full check on a body (an error, an error event); non-UTF-8 bytes are kept as they are."""
        if self._pattern is None or not data:
            return data
        text = data.decode("utf-8", "surrogateescape")
        out = self.text(text)
        return data if out is text else out.encode("utf-8", "surrogateescape")

    def exact(self, data: bytes) -> bytes:
        """The cheap check for a successful body: only whole secrets."""
        for s in self._exact:
            if s in data:
                data = data.replace(s, REDACTED.encode())
        return data

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        """The headers whose values contained a secret, with it replaced (pseudo-headers left alone)."""
        if self._pattern is None:
            return {}
        return {k: v2 for k, v in headers.items() if not k.startswith(":") and (v2 := self.text(v)) != v}


def scrubber_for(secrets: Iterable[str]) -> Scrubber:
    """The (immutable) Scrubber for these secrets, built once per set of them.

    Building one writes out every run of every secret and compiles the
    pattern: tens of µs, once per exchange before this. An exchange's
    secrets are one or two of the gateway's few provider keys, so a small
    cache serves every request; rotating tokens (Azure AD) fall out of it.
    """
    return _scrubber(frozenset(secrets))


@functools.lru_cache(maxsize=256)
def _scrubber(secrets: frozenset[str]) -> Scrubber:
    return Scrubber(secrets)
