"""Construct the cache stage from the config (called by the runtime's composition root)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

from extproc.cache.embedder import Embedder
from extproc.cache.metrics import CacheMetrics
from extproc.cache.pool import EmbedPool
from extproc.cache.redis_store import RedisCacheStore
from extproc.cache.settings import CacheSettings
from extproc.cache.stage import CacheStage
from extproc.cache.store import CacheStore, MemoryCacheStore
from extproc.pipeline.exchange import Exchange
from extproc.quota.ledger import Ledger
from extproc.quota.redis_store import connect


def open_store(settings: CacheSettings, password: str | None = None) -> CacheStore:
    if settings.store == "redis" and settings.redis_url:
        return RedisCacheStore(connect(settings.redis_url, password=password), prefix=settings.key_prefix,
                               stream_client=connect(settings.redis_url, password=password, timeout=10.0,
                                                     max_connections=4))
    return MemoryCacheStore()


def build_cache(settings: CacheSettings | None, *, registry: CollectorRegistry | None, metrics_on: bool,
                spawn: Callable[[Coroutine[Any, Any, Any]], object], ledger: Ledger | None,
                cost_of: Callable[[Exchange], int | None], redis_password: str | None = None,
                embedder: Embedder | None = None) -> CacheStage | None:
    if settings is None:
        return None
    pool = None
    if settings.semantic:
        pool = EmbedPool(embedder or Embedder(backend=settings.embedder), workers=settings.embed_workers, limit=settings.embed_queue,
                         cpu_share=settings.embed_cpu)
    return CacheStage(settings, open_store(settings, redis_password), CacheMetrics(registry, enabled=metrics_on),
                      pool=pool, spawn=spawn, ledger=ledger, cost_of=cost_of)
