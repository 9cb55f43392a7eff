"""Verified tokens, so that a client reusing its token costs one hash and one dict lookup.

Keyed by the SHA-256 of the whole token (never a prefix: two tokens that share
a header and most of a payload must not share an entry). An entry ends at the
token's ``exp``; the cache holds at most ``capacity`` entries, dropping expired
ones first and then the oldest. It is emptied when an issuer withdraws a key,
so tokens signed with a withdrawn key are checked again.
"""

from __future__ import annotations

import hashlib

from extproc.auth.identity import Identity


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class VerifiedTokens:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict[bytes, Identity] = {}
        self._swept_at = float("-inf")

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: float) -> Identity | None:
        """The identity of a token verified before, unless it has expired; ``now`` is epoch seconds."""
        ident = self._entries.get(digest)
        if ident is None:
            return None
        if ident.expires_at <= now:
            del self._entries[digest]
            return None
        return ident

    def put(self, digest: bytes, ident: Identity, now: float) -> None:
        if self.capacity <= 0 or ident.expires_at <= now:
            return
        if len(self._entries) >= self.capacity and digest not in self._entries:
            self._make_room(now)
        self._entries[digest] = ident

    def _make_room(self, now: float) -> None:
        if now - self._swept_at >= 1.0:  # a full scan at most once a second, even under a flood of new tokens
            self._swept_at = now
            for d in [d for d, i in self._entries.items() if i.expires_at <= now]:
                del self._entries[d]
        while len(self._entries) >= self.capacity:
            del self._entries[next(iter(self._entries))]  # the oldest insertion

    def clear(self) -> None:
        self._entries.clear()
