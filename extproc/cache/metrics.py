"""The cache's Prometheus series, registered beside the gateway's own.

Lookups by result are the gateway's ``tollgate_cache_lookups_total{alias,
result}`` (counted once per exchange, from ``Exchange.cache``); the series
here say why lookups were skipped, how similar the best candidates were, how
long embeddings took, and what hits saved. Label values are bounded: aliases
and namespaces (teams) come from the config, reasons from a fixed list.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SIMILARITY_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0)
EMBED_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25)


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry | None, *, enabled: bool = True) -> None:
        self.enabled = enabled and registry is not None
        r = registry if registry is not None else CollectorRegistry()
        self.bypass = Counter("tollgate_cache_bypass", "Requests the cache did not look up or store, by reason "
                              "(saturated, cpu_budget, timeout, no_cache, n, logprobs, non_text, last_turn, mode_off, "
                              "store_error, ...).", ("alias", "reason"), registry=r)
        self.similarity = Histogram("tollgate_cache_similarity", "Cosine of the nearest stored prompt, per "
                                    "semantic lookup that found one.", ("alias",), buckets=SIMILARITY_BUCKETS,
                                    registry=r)
        self.embed_seconds = Histogram("tollgate_cache_embed_seconds", "Time of one prompt's embedding in the "
                                       "worker pool.", buckets=EMBED_BUCKETS, registry=r)
        self.saved_tokens = Counter("tollgate_cache_saved_tokens", "Tokens hits did not send to a provider "
                                    "(the cached answer's input + output).", ("alias",), registry=r)
        self.saved_usd = Counter("tollgate_cache_saved_usd", "What hits saved, in US dollars: the cached "
                                 "answer's original cost.", ("alias",), registry=r)
        self.entries = Gauge("tollgate_cache_entries", "Entries this sidecar's index holds, per namespace.",
                             ("namespace",), registry=r)
        self.stored = Counter("tollgate_cache_stores", "Answers stored, by layer (exact: no vector; "
                              "semantic).", ("alias", "layer"), registry=r)

    def skipped(self, alias: str, reason: str) -> None:
        if self.enabled:
            self.bypass.labels(alias, reason).inc()

    def nearest(self, alias: str, similarity: float | None) -> None:
        if self.enabled and similarity is not None:
            self.similarity.labels(alias).observe(similarity)

    def embedded(self, seconds: float) -> None:
        if self.enabled:
            self.embed_seconds.observe(seconds)

    def saved(self, alias: str, tokens: int, micro_usd: int) -> None:
        if self.enabled:
            self.saved_tokens.labels(alias).inc(tokens)
            self.saved_usd.labels(alias).inc(micro_usd / 1_000_000)

    def store(self, alias: str, layer: str) -> None:
        if self.enabled:
            self.stored.labels(alias, layer).inc()

    def sizes(self, counts: dict[str, int]) -> None:
        if self.enabled:
            for ns, n in counts.items():
                self.entries.labels(ns).set(n)
