"""The cache's decision: exact key first, then FAISS, then the guards; and storing.

``find`` is the one decision both the data path (``stage.py``) and
``tollgate cache score`` run: given a planned request and (for the semantic
layer) its prompt's vector,

1. an entry stored under the same exact key (same scope, same normalised last
   user message) is a ``hit_exact``;
2. otherwise the scope's FAISS partition gives the nearest stored prompts; the
   first one at or above the threshold whose guards agree (``guards.py``) and
   that the store still has is a ``hit_semantic``;
3. anything else is a ``miss`` (with why: nothing near, below threshold, or
   the guard that objected).

The store is the authority; the local index only proposes candidates. With
Redis, ``follow`` tails the store's insert stream into the index, so an answer
stored by one sidecar is found by all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np

from extproc.cache.entry import Answer, Entry
from extproc.cache.guards import disagreement, features
from extproc.cache.index import LocalIndex
from extproc.cache.keys import Plan
from extproc.cache.store import CacheStore, Clock

log = logging.getLogger("tollgate.cache")

CANDIDATES = 4  # nearest prompts checked by the guards, best first


@dataclass(frozen=True, slots=True)
class Decision:
    result: str  # hit_exact | hit_semantic | miss | bypass
    similarity: float | None = None  # of the best candidate (1.0 for an exact hit)
    reason: str = ""  # miss: no_candidate | below_threshold | a guard's name; bypass: why
    entry: Entry | None = None


class SemanticCache:
    def __init__(self, store: CacheStore, *, clock: Clock = time.time) -> None:
        self.store = store
        self.index = LocalIndex()
        self.clock = clock
        self.position = "0"  # how far the insert stream has been read
        self._rebuild: asyncio.Task[None] | None = None

    async def find(self, plan: Plan, vector: np.ndarray | None, threshold: float) -> Decision:
        entry = await self.store.get_exact(plan.exact)
        if entry is not None:
            return Decision("hit_exact", 1.0, entry=entry)
        if vector is None:
            return Decision("miss", None, "exact_only")
        return await self.nearest(plan, vector, threshold)

    async def nearest(self, plan: Plan, vector: np.ndarray, threshold: float) -> Decision:
        candidates = self.index.search(plan.scope, vector, CANDIDATES)
        if not candidates:
            return Decision("miss", None, "no_candidate")
        best = candidates[0].similarity
        if best < threshold:
            return Decision("miss", best, "below_threshold")
        mine = features(plan.prompt)
        objection = ""
        now = self.clock()
        for c in candidates:
            if c.similarity < threshold:
                break
            if c.expires <= now:
                self.index.remove(c.entry_id)
                continue
            why = disagreement(c.features, mine)
            if why is not None:
                objection = objection or why
                continue
            entry = await self.store.get(c.entry_id)
            if entry is None:  # expired, evicted or cleared meanwhile
                self.index.remove(c.entry_id)
                continue
            return Decision("hit_semantic", c.similarity, entry=entry)
        return Decision("miss", best, objection or "gone")

    async def insert(self, plan: Plan, vector: np.ndarray | None, answer: Answer, *, ttl: float,
                     max_entries: int) -> Entry:
        now = self.clock()
        entry = Entry(uuid.uuid4().hex, plan.scope, plan.exact, plan.prompt, vector, answer, now, now + ttl)
        evicted = await self.store.put(entry, max_entries=max_entries)
        for gone in evicted:
            self.index.remove(gone)
        if vector is not None:
            self.index.add(entry.id, entry.scope, entry.prompt, vector, entry.expires)
            self._maybe_rebuild()
        return entry

    def _maybe_rebuild(self) -> None:
        """Start promoting/retraining grown partitions in the background (one task at a time)."""
        if (self._rebuild is None or self._rebuild.done()) and self.index.wanted():
            self._rebuild = asyncio.get_running_loop().create_task(self._rebuild_all())

    async def _rebuild_all(self) -> None:
        for scope in self.index.wanted():
            try:
                await self.index.rebuild(scope)
            except Exception:  # noqa: BLE001 - the flat partition keeps serving
                log.exception("cache: rebuilding the index of a scope failed")

    async def settle(self) -> None:
        """Wait for a background rebuild (the bench and the specs)."""
        while self._rebuild is not None and not self._rebuild.done():
            await self._rebuild
        if self.index.wanted():
            await self._rebuild_all()

    async def catch_up(self, block_ms: int = 0) -> int:
        """Add what other sidecars stored since the last call; how many records were read."""
        position, records = await self.store.inserts(self.position, block_ms=block_ms)
        self.position = position
        rows = []
        now = self.clock()
        for rec in records:
            if isinstance(rec, str):  # "clear:NS:ALIAS"
                _, ns, alias = rec.split(":", 2)
                self.index.drop(ns, alias or None)
                continue
            if rec.expires > now:
                rows.append(rec)
        if rows:
            self.index.add_many(rows)
            self._maybe_rebuild()
        return len(records)

    async def follow(self, poll_ms: int = 200) -> None:
        """Tail the insert stream for as long as the gateway runs; a lost connection is retried."""
        while True:
            try:
                await self.catch_up(block_ms=poll_ms)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis down: keep serving from what is indexed
                log.warning("cache: cannot read the insert stream (%s); retrying", type(e).__name__)
                await asyncio.sleep(1.0)
