"""Where cached entries live: this process (``MemoryCacheStore``) or Redis (``redis_store.py``).

Both keep, per entry, the vector, the prompt, the answer and an expiry, an
exact-key lookup, and per namespace an age order for eviction beyond
``max_entries``. ``inserts`` feeds a sidecar's FAISS index: everything stored
after a position (here: by this process; in Redis: by every sidecar, from a
stream), so the index can catch up and be rebuilt at start.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple, Protocol

import numpy as np

from extproc.cache.entry import Entry
from extproc.cache.keys import scope_parts

Clock = Callable[[], float]


class Insert(NamedTuple):
    """What the index needs of an entry another sidecar stored (its answer stays in the store)."""

    entry_id: str
    scope: str
    prompt: str
    vector: np.ndarray
    expires: float


class CacheStore(Protocol):
    async def get_exact(self, exact: str) -> Entry | None: ...

    async def get(self, entry_id: str) -> Entry | None: ...

    async def put(self, entry: Entry, *, max_entries: int) -> list[str]:
        """Store ``entry``; the ids evicted from its namespace to stay within ``max_entries``."""

    async def inserts(self, after: str, *, block_ms: int = 0) -> tuple[str, list[Insert | str]]:
        """Entries stored with a vector after position ``after`` ("0": all), and clears as ``"clear:NS:ALIAS"``."""

    async def clear(self, namespace: str, alias: str | None = None) -> int: ...

    async def counts(self) -> dict[str, int]:
        """Live entries per namespace."""

    async def close(self) -> None: ...


class MemoryCacheStore:
    """One sidecar's entries, in dicts; the index is fed by the cache itself (no other writer exists)."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self._entries: dict[str, Entry] = {}
        self._exact: dict[str, str] = {}
        self._by_ns: dict[str, OrderedDict[str, None]] = {}

    def _live(self, entry_id: str | None) -> Entry | None:
        e = self._entries.get(entry_id) if entry_id is not None else None
        if e is not None and e.expires <= self.clock():
            self._drop(e)
            return None
        return e

    def _drop(self, e: Entry) -> None:
        self._entries.pop(e.id, None)
        if self._exact.get(e.exact) == e.id:
            del self._exact[e.exact]
        ns, _ = scope_parts(e.scope)
        self._by_ns.get(ns, OrderedDict()).pop(e.id, None)

    async def get_exact(self, exact: str) -> Entry | None:
        return self._live(self._exact.get(exact))

    async def get(self, entry_id: str) -> Entry | None:
        return self._live(entry_id)

    async def put(self, entry: Entry, *, max_entries: int) -> list[str]:
        old = self._entries.get(self._exact.get(entry.exact, ""))
        if old is not None:
            self._drop(old)
        self._entries[entry.id] = entry
        self._exact[entry.exact] = entry.id
        ns, _ = scope_parts(entry.scope)
        order = self._by_ns.setdefault(ns, OrderedDict())
        order[entry.id] = None
        evicted = [] if old is None else [old.id]
        while len(order) > max_entries:
            oldest, _ = order.popitem(last=False)
            gone = self._entries.get(oldest)
            if gone is not None:
                self._drop(gone)
            evicted.append(oldest)
        return evicted

    async def inserts(self, after: str, *, block_ms: int = 0) -> tuple[str, list[Insert | str]]:
        return after, []

    async def clear(self, namespace: str, alias: str | None = None) -> int:
        victims = [e for e in self._entries.values()
                   if scope_parts(e.scope)[0] == namespace and (alias is None or scope_parts(e.scope)[1] == alias)]
        for e in victims:
            self._drop(e)
        return len(victims)

    async def counts(self) -> dict[str, int]:
        now = self.clock()
        out: dict[str, int] = {}
        for e in self._entries.values():
            if e.expires > now:
                ns, _ = scope_parts(e.scope)
                out[ns] = out.get(ns, 0) + 1
        return out

    async def close(self) -> None:
        return None
