"""Every Prometheus metric of the gateway, and the one place that records them.

Names follow the OpenTelemetry GenAI semantic conventions mapped to Prometheus
naming (``gen_ai.server.time_to_first_token`` → ``gen_ai_server_time_to_first_token_seconds``);
the gateway's own ones start with ``tollgate_``. Base units throughout: seconds, tokens, USD.

Label values are bounded: aliases, providers and target models come from the
config, teams from the configured team list; anything else folds into ``other``.
No principal, request id or free text is ever a label.

Recording happens once per finished exchange (``observe``), off the per-chunk
path, plus small counters at the moment something happens (a fallback, an
upstream error, a refused request).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from extproc.config import Address, GatewayConfig
from extproc.telemetry.envoy_stats import FallbackReasons
from extproc.pipeline.exchange import Exchange
from extproc.quota.limits import MICROS_PER_USD, LimitState

OTHER = "other"
NONE = "none"

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1)
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05,
                    0.1, 0.25)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)

MODEL_LABELS = ("alias", "provider", "model", "team")


class Metrics:
    def __init__(self, cfg: GatewayConfig, *, teams: Iterable[str] = (), team_label: bool = True,
                 registry: CollectorRegistry | None = None) -> None:
        self.enabled = cfg.metrics.port != 0  # `metrics: {port: 0}` switches recording and serving off
        self.registry = registry or CollectorRegistry()
        self._aliases = frozenset(cfg.models)
        self._providers = frozenset(cfg.providers)
        self._models = frozenset(t.model for a in cfg.models.values() for t in a.targets)
        self._teams = frozenset(teams)
        if self.enabled:
            self.registry.register(FallbackReasons(cfg))  # why attempts failed over: Envoy's own counts
        self._team_label = team_label
        r = self.registry
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from the gateway having the whole request to the first generated content reaching it.",
            MODEL_LABELS, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, for streamed answers: (last - first) / (output tokens - 1).",
            MODEL_LABELS, buckets=TPOT_BUCKETS, registry=r)
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from the gateway having the whole request to the end of the answer.",
            (*MODEL_LABELS, "outcome"), buckets=DURATION_BUCKETS, registry=r)
        self.token_usage = Histogram(
            "gen_ai_client_token_usage_tokens",
            "Tokens per request as reported by the provider, by token type (input, output).",
            (*MODEL_LABELS, "token_type"), buckets=TOKEN_BUCKETS, registry=r)
        self.tokens = Counter(
            "tollgate_tokens", "Tokens used, by type (input, output, cached_input).",
            (*MODEL_LABELS, "token_type"), registry=r)
        self.cost = Counter("tollgate_cost_usd", "Money spent, in US dollars, at the configured prices.",
                            MODEL_LABELS, registry=r)
        self.requests = Counter(
            "tollgate_requests", "Requests by outcome, HTTP status class and error type.",
            (*MODEL_LABELS, "outcome", "status_class", "error_type"), registry=r)
        self.fallbacks = Counter(
            "tollgate_fallback_attempts",
            "Attempts after a failed one (a later target, or the same one with another key), by the provider that "
            "failed before and how: 5xx, 429, 401, 403, invalid_answer (read by the outcome stage), or no_response "
            "(refused, timed out or reset; tollgate_fallback_reasons_total has Envoy's own counts).",
            ("alias", "from_provider", "reason"), registry=r)
        self.key_quarantines = Counter(
            "tollgate_provider_key_quarantined",
            "Provider keys left out of their pool after the provider refused them (401/403), by provider and key "
            "position in the pool (#0, #1 ...; never the key).",
            ("provider", "key"), registry=r)
        self.rejections = Counter(
            "tollgate_quota_rejections",
            "Requests refused (or streams cut) by a token bucket or budget, by kind of scope (principal, team, "
            "org, alias) and kind of limit (tokens, money, requests).",
            ("scope", "kind"), registry=r)
        self.quota_store_errors = Counter(
            "tollgate_quota_store_errors",
            "Calls to the shared quota store that failed, by operation (reserve, top_up, settle, ledger) and the "
            "configured policy (fail_closed refuses the request, fail_open admits it against local limits).",
            ("operation", "policy"), registry=r)
        self.cache_lookups = Counter(
            "tollgate_cache_lookups", "Response-cache lookups by result (hit_exact, hit_semantic, miss, bypass).",
            ("alias", "result"), registry=r)
        self.upstream_errors = Counter(
            "tollgate_upstream_errors",
            "Failed answers that reached the gateway, by provider and kind (5xx, 429, no_response: Envoy's own "
            "5xx after the last target failed). Attempts Envoy retried are not seen here; see its cluster stats.",
            ("provider", "kind"), registry=r)
        self.budget_remaining = Gauge(
            "tollgate_budget_remaining_usd", "Money left in the current budget period, per team.", ("team",),
            registry=r)
        self.overhead = Histogram(
            "tollgate_gateway_overhead_seconds",
            "Time the request spent in Tollgate and Envoy, excluding the provider: from the gateway receiving the "
            "request headers to the answering attempt leaving, less failed attempts, plus Python time on the response.",
            ("alias",), buckets=OVERHEAD_BUCKETS, registry=r)
        self._server: tuple[Any, threading.Thread] | None = None
        self._cache: dict[tuple[str, ...], _Children] = {}  # bounded: every label value is from the config

    # -- label folding
    def alias(self, v: str | None) -> str:
        return v if v in self._aliases else (NONE if v is None else OTHER)

    def provider(self, v: str | None) -> str:
        return v if v in self._providers else (NONE if v is None else OTHER)

    def model(self, v: str | None) -> str:
        return v if v in self._models else (NONE if v is None else OTHER)

    def team(self, v: str | None) -> str:
        if not self._team_label:
            return ""
        return v if v in self._teams else (NONE if v is None else OTHER)

    # -- recording
    def observe(self, ex: Exchange, now: float) -> None:
        if not self.enabled:
            return
        labels = (self.alias(ex.alias), self.provider(ex.provider), self.model(ex.target_model), self.team(ex.team))
        outcome = outcome_of(ex)
        status = ex.status or 0
        c = self._children(labels, outcome, ex.cache)
        self.requests.labels(*labels, outcome, f"{status // 100}xx" if status else "none", ex.error or NONE).inc()
        c.duration.observe(max(0.0, now - ex.received_at))
        c.cache.inc()
        if ex.first_token_at is not None and ex.stream:
            c.ttft.observe(max(0.0, ex.first_token_at - ex.received_at))
        u = ex.usage
        if u is not None:
            c.input_usage.observe(u.prompt_tokens)
            c.output_usage.observe(u.completion_tokens)
            c.input_tokens.inc(u.prompt_tokens)
            c.output_tokens.inc(u.completion_tokens)
            if u.cached_tokens:
                c.cached_tokens.inc(u.cached_tokens)
            tpot = ex.tpot()
            if tpot is not None:
                c.tpot.observe(tpot)
        if ex.cost_usd:
            c.cost.inc(ex.cost_usd)
        overhead = ex.overhead()
        if overhead is not None:
            c.overhead.observe(overhead)

    def _children(self, labels: tuple[str, str, str, str], outcome: str, cache: str) -> _Children:
        """The labelled series one exchange touches, looked up once per label set (labels() is not free)."""
        key = (*labels, outcome, cache)
        c = self._cache.get(key)
        if c is None:
            c = self._cache[key] = _Children(
                duration=self.duration.labels(*labels, outcome),
                cache=self.cache_lookups.labels(labels[0], cache),
                ttft=self.ttft.labels(*labels),
                tpot=self.tpot.labels(*labels),
                input_usage=self.token_usage.labels(*labels, "input"),
                output_usage=self.token_usage.labels(*labels, "output"),
                input_tokens=self.tokens.labels(*labels, "input"),
                output_tokens=self.tokens.labels(*labels, "output"),
                cached_tokens=self.tokens.labels(*labels, "cached_input"),
                cost=self.cost.labels(*labels),
                overhead=self.overhead.labels(labels[0]),
            )
        return c

    def refused(self, status: int, code: str) -> None:
        """A request refused before an exchange existed (bad path, bad body, unknown alias)."""
        if not self.enabled:
            return
        none = (NONE, NONE, NONE, self.team(None))
        self.requests.labels(*none, "client_error" if status < 500 else "gateway_error", f"{status // 100}xx",
                             code).inc()

    def quota_rejected(self, scope_kind: str, kind: str) -> None:
        if self.enabled:
            scope = scope_kind if scope_kind in ("principal", "team", "org", "alias") else OTHER
            self.rejections.labels(scope, kind if kind in ("tokens", "money", "requests") else OTHER).inc()

    def quota_store_error(self, operation: str, policy: str) -> None:
        if self.enabled:
            self.quota_store_errors.labels(operation, policy).inc()

    def budgets(self, states: Iterable[LimitState]) -> None:
        """Money left for each team seen in a quota call (the tightest of its periods)."""
        if not self.enabled:
            return
        left: dict[str, int] = {}
        for s in states:
            if s.kind == "money" and s.scope.startswith("team:"):
                team = s.scope[5:]
                left[team] = min(s.remaining, left.get(team, s.remaining))
        for team, micro in left.items():
            if team in self._teams:  # a bounded label: configured teams only
                self.budget_remaining.labels(team).set(micro / MICROS_PER_USD)

    def fallback(self, alias: str, from_provider: str | None, reason: str) -> None:
        """Another attempt is made; ``reason`` is how the previous one failed (a bounded set, see the help)."""
        if self.enabled:
            self.fallbacks.labels(self.alias(alias), self.provider(from_provider), reason).inc()

    def key_quarantined(self, provider: str, slot: int) -> None:
        if self.enabled:
            self.key_quarantines.labels(self.provider(provider), f"#{slot}").inc()

    def upstream_error(self, provider: str, status: int) -> None:
        kind = "no_response" if not status else "429" if status == 429 else f"{status // 100}xx"
        if self.enabled:
            self.upstream_errors.labels(self.provider(provider), kind).inc()

    # -- serving
    def serve(self, address: Address) -> None:
        """Serve /metrics from a thread of its own (never on the gRPC event loop); port 0 turns it off."""
        if not self.enabled:
            return
        server, thread = start_http_server(address.port, addr=address.host, registry=self.registry)
        self._server = (server, thread)

    def close(self) -> None:
        if self._server is not None:
            server, _thread = self._server
            threading.Thread(target=server.shutdown, daemon=True).start()
            self._server = None


@dataclass(slots=True)
class _Children:
    duration: Any
    cache: Any
    ttft: Any
    tpot: Any
    input_usage: Any
    output_usage: Any
    input_tokens: Any
    output_tokens: Any
    cached_tokens: Any
    cost: Any
    overhead: Any


def outcome_of(ex: Exchange) -> str:
    status = ex.status or 0
    if ex.stream_failed:
        return "stream_error"
    if 200 <= status < 300:
        return "success"
    if 400 <= status < 500:
        return "client_error"
    if ex.error in ("internal_error", "gateway_error"):
        return "gateway_error"
    return "upstream_error"
