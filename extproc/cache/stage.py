"""The cache on the data path: look up before admission, store when the answer is complete.

``lookup`` is a stage of the router's list (``cache_stage``, right before the
quota stage), so it runs once the caller, the alias and the body are checked
and before admission: a hit becomes an ImmediateResponse (the
provider is never asked, no quota is held, the ledger records the saving); a
miss or a bypass lets the request go on, carrying a ``CacheState`` on its
exchange. The answer stage then feeds what reaches the client to ``seen``, and
a complete 200 answer (``stop``, one choice, no tool calls, not cut) is stored
in the background.

Time: the whole lookup (exact key, embedding, FAISS search, guards, reading
the entry) is bounded by ``lookup_budget``; an embedding pool that is full or
slower than that skips the lookup (``bypass``) instead of delaying the
request. The client can say ``Cache-Control: no-cache`` (no lookup) and
``no-store`` (no storing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from extproc.cache.entry import Answer, Entry
from extproc.cache.keys import Bypass, Plan, plan
from extproc.cache.metrics import CacheMetrics
from extproc.cache.pool import EmbedPool, Saturated
from extproc.cache.replay import Collector, replay_json, replay_sse
from extproc.cache.semantic import Decision, SemanticCache
from extproc.cache.settings import AliasCache, CacheSettings
from extproc.cache.store import CacheStore
from extproc.pipeline import messages
from extproc.pipeline.exchange import Exchange
from extproc.quota.ledger import Ledger, UsageRecord

log = logging.getLogger("tollgate.cache")

Spawn = Callable[[Coroutine[Any, Any, Any]], object]


class _HasCache(Protocol):
    cache: CacheStage | None


def cache_stage(rt: _HasCache) -> Callable[[Exchange], Coroutine[Any, Any, Any]] | None:
    """The router's cache stage (see ``pipeline.router.build_stages``); None without a cache section."""
    return rt.cache.lookup if rt.cache is not None else None


DEFAULT_NAMESPACE = "_default"  # callers without a team (auth mode none)


@dataclass(slots=True)
class CacheState:
    """What the cache knows about one exchange, from lookup to store."""

    plan: Plan
    alias: AliasCache
    store: bool = True  # no-store, a hit, or a bypass that forbids it: False
    vector: np.ndarray | None = None
    similarity: float | None = None
    collector: Collector = field(default_factory=Collector)


def _directives(value: str) -> set[str]:
    return {d.strip().split("=", 1)[0].lower() for d in value.split(",") if d.strip()}


class CacheStage:
    def __init__(self, settings: CacheSettings, store: CacheStore, metrics: CacheMetrics, *,
                 pool: EmbedPool | None, spawn: Spawn, ledger: Ledger | None = None,
                 cost_of: Callable[[Exchange], int | None] = lambda ex: None) -> None:
        self.settings = settings
        self.cost_of = cost_of  # what the answer cost at the configured prices (micro-USD), saved by later hits
        self.cache = SemanticCache(store)
        self.metrics = metrics
        self.pool = pool
        self.spawn = spawn
        self.ledger = ledger
        self._follower: asyncio.Task[None] | None = None

    # -- lifecycle
    async def start(self, *, follow: bool = True) -> None:
        """Warm the embedder, rebuild the index from the store (Redis), then tail it."""
        if self.pool is not None:  # the first forward pass allocates and spins up BLAS: not on a request
            await self.pool.embed("warm up", timeout=None)
            self.pool.rested()
        started = time.perf_counter()
        total = 0
        while True:
            n = await self.cache.catch_up()
            total += n
            if n == 0:
                break
        if total:
            log.info("cache: index rebuilt from %d records in %.2f s (%d entries)", total,
                     time.perf_counter() - started, len(self.cache.index))
        self.metrics.sizes(self.cache.index.counts())
        if follow and self.settings.store == "redis":
            self._follower = asyncio.get_running_loop().create_task(self.cache.follow())

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        if self.pool is not None:
            self.pool.close()
        await self.cache.store.close()

    # -- operator commands (``tollgate cache clear|stats`` through ``control.py`` when the store is this process)
    async def clear(self, namespace: str, alias: str | None = None) -> int:
        """Remove a namespace's entries (or one alias's) from the store and from the index."""
        removed = await self.cache.store.clear(namespace, alias)
        self.cache.index.drop(namespace, alias)
        sizes = self.cache.index.counts()
        self.metrics.sizes({namespace: sizes.get(namespace, 0), **sizes})
        return removed

    async def counts(self) -> dict[str, int]:
        """Live entries per namespace, exact-only ones included."""
        return await self.cache.store.counts()

    # -- lookup
    def namespace(self, team: str | None) -> str:
        return "shared" if self.settings.namespace == "shared" else (team or DEFAULT_NAMESPACE)

    async def lookup(self, ex: Exchange) -> messages.ProcessingResponse | None:
        """An ImmediateResponse for a hit; None to go on (``ex.cache`` says miss or bypass)."""
        cache_control = ex.cache_control
        cfg = self.settings.for_alias(ex.alias)
        if cfg.mode == "off" or ex.endpoint != "chat":
            return self._bypass(ex, "mode_off" if cfg.mode == "off" else "endpoint")
        p = plan(ex.body, alias=ex.alias, namespace=self.namespace(ex.team))
        if isinstance(p, Bypass):
            return self._bypass(ex, p.reason)
        directives = _directives(cache_control) if cache_control else set()
        state = ex.cache_state = CacheState(p, cfg, store="no-store" not in directives)
        if "no-cache" in directives:
            return self._bypass(ex, "no_cache")
        try:
            async with asyncio.timeout(self.settings.lookup_budget):  # in this task: no task per lookup
                d = await self._decide(state)
        except Saturated as e:
            return self._bypass(ex, e.reason)
        except (asyncio.TimeoutError, TimeoutError):
            return self._bypass(ex, "timeout")
        except Exception as e:  # noqa: BLE001 - a broken cache must not break the request
            log.warning("cache: lookup failed for %s (%s)", ex.request_id, type(e).__name__)
            return self._bypass(ex, "store_error")
        ex.cache = d.result
        state.similarity = d.similarity
        if d.entry is None:
            return None
        state.store = False
        return self._hit(ex, d, d.entry)

    async def _decide(self, state: CacheState) -> Decision:
        p, cfg = state.plan, state.alias
        d = await self.cache.find(p, None, cfg.threshold)
        if d.result == "hit_exact" or cfg.mode != "semantic" or self.pool is None:
            return d
        vector, seconds = await self.pool.embed(p.prompt, timeout=None)  # the lookup's timeout bounds it
        self.metrics.embedded(seconds)
        state.vector = vector
        d = await self.cache.nearest(p, vector, cfg.threshold)
        self.metrics.nearest(p.alias, d.similarity)
        return d

    def _bypass(self, ex: Exchange, reason: str) -> messages.ProcessingResponse | None:
        """Go on without the cache (counted by reason)."""
        ex.cache = "bypass"
        self.metrics.skipped(ex.alias, reason)
        return None

    def _hit(self, ex: Exchange, d: Decision, entry: Entry) -> messages.ProcessingResponse:
        a = entry.answer
        model = a.model or ex.alias
        if ex.stream:
            opts = ex.body.get("stream_options")
            include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            body, ctype = replay_sse(a, model, include_usage=include_usage), "text/event-stream"
        else:
            body, ctype = replay_json(a, model), "application/json"
        ex.status = 200
        ex.answer_complete = True
        ex.first_token_at = ex.last_token_at = time.monotonic()
        saved_tokens = a.prompt_tokens + a.completion_tokens
        self.metrics.saved(ex.alias, saved_tokens, a.micro_usd)
        if self.ledger is not None:
            self.spawn(self._record_hit(ex, a, saved_tokens))
        headers = {
            "x-request-id": ex.request_id,
            "x-tollgate-cache": d.result.replace("_", "-"),
            "x-tollgate-cache-similarity": f"{d.similarity:.4f}" if d.similarity is not None else "1.0000",
            "x-tollgate-cost-usd": "0.000000",
            "x-tollgate-saved-usd": f"{a.micro_usd / 1_000_000:.6f}",
            "x-tollgate-saved-tokens": str(saved_tokens),
            "cache-control": "no-cache",
        }
        return messages.immediate(200, body, headers, content_type=ctype)

    async def _record_hit(self, ex: Exchange, a: Answer, saved_tokens: int) -> None:
        assert self.ledger is not None
        record = UsageRecord(ex.request_id, ex.principal or "", ex.team or "", ex.alias, "cache", a.model,
                             0, 0, 0, 0, ex.cache, saved_tokens=saved_tokens, saved_micro_usd=a.micro_usd)
        try:
            await self.ledger.append(record)
        except Exception:  # noqa: BLE001 - the answer is served; the saving is only reported
            log.exception("cache: could not record the hit of %s in the ledger", ex.request_id)

    # -- storing
    def seen(self, ex: Exchange, data: bytes | None, *, whole: bool, end: bool) -> None:
        """The answer stage hands over what reaches the client; at the end a complete answer is stored."""
        state = ex.cache_state
        if state is None or not state.store:
            return
        if data:
            if whole:
                state.collector.feed_whole(data)
            else:
                state.collector.feed_stream(data)
        if end:
            self._finish(ex, state)

    def _finish(self, ex: Exchange, state: CacheState) -> None:
        state.store = False  # once
        if ex.status != 200 or ex.stream_failed or not ex.answer_complete or ex.error:
            return
        u = ex.usage
        answer = state.collector.answer(u.prompt_tokens if u else 0, u.completion_tokens if u else 0,
                                        self._cost(ex))
        if answer is not None:
            self.spawn(self._store(state, answer))

    def _cost(self, ex: Exchange) -> int:
        return self.cost_of(ex) or 0

    async def _store(self, state: CacheState, answer: Answer) -> None:
        p, cfg = state.plan, state.alias
        vector = state.vector
        try:
            if vector is None and cfg.mode == "semantic" and self.pool is not None:
                try:  # the lookup was skipped or exact: embed now, off the request's path
                    vector, seconds = await self.pool.embed(p.prompt, timeout=None)
                    self.metrics.embedded(seconds)
                except Saturated:
                    vector = None  # stored for the exact layer only
            await self.cache.insert(p, vector if cfg.mode == "semantic" else None, answer, ttl=cfg.ttl,
                                    max_entries=self.settings.max_entries)
            self.metrics.store(p.alias, "semantic" if vector is not None and cfg.mode == "semantic" else "exact")
            self.metrics.sizes(self.cache.index.counts())
        except Exception as e:  # noqa: BLE001 - not stored is only a later miss
            log.warning("cache: could not store an answer (%s)", type(e).__name__)
            self.metrics.skipped(p.alias, "store_error")
