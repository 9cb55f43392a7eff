"""What the gateway knows about one HTTP exchange, shared by its two filters.

The router-level ("gateway") filter creates an ``Exchange`` when it has read
the request, prepares the primary target and reads the answer (target, status,
usage, token timings); a fallback attempt finds it by Envoy's request id and
prepares its own target. The exchange is recorded when the last stream holding
it ends. Both filters' gRPC streams come to this one process, so a dictionary
is enough.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from extproc.providers.base import Translator, Usage

if TYPE_CHECKING:
    from extproc.guardrails.stage import GuardState
    from extproc.quota.governor import Admission


@dataclass(slots=True)
class Exchange:
    request_id: str
    endpoint: str  # "chat" | "embeddings": what the pipeline and the backends serve
    alias: str
    body: dict
    stream: bool = False
    principal: str | None = None  # who is calling (set by authentication)
    team: str | None = None  # which team the call is charged to
    tier: str | None = None  # the caller's tier claim, if the issuer maps one
    admission: Admission | None = None  # the quota hold, when quotas are on; settled when the exchange ends
    started_at: float = field(default_factory=time.monotonic)  # request headers reached the gateway
    received_at: float = field(default_factory=time.monotonic)  # full request read
    attempts: int = 0
    provider: str | None = None
    target_model: str | None = None  # the configured backend model of the answering target
    response_model: str | None = None  # what the backend said it was
    status: int | None = None
    usage: Usage | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    content_chunks: int = 0
    stream_failed: bool = False
    streamed: bool = False  # the answer came as a stream of server-sent events
    answer_complete: bool = False  # a whole answer was read, or its stream ended cleanly ([DONE] / message_stop)
    error: str | None = None
    translators: dict[int, Translator] = field(default_factory=dict)  # by target index: each prepared target's
    raw_body: bytes = b""  # the client's bytes, for a fallback that sends them unchanged
    body_rewritten: bool = False  # the primary's preparation changed the body Envoy keeps for retries
    holders: int = 1  # the gateway stream, plus each fallback attempt's stream while it runs
    cache: str = "bypass"  # response cache result: hit_exact | hit_semantic | miss | bypass
    cache_state: Any = None  # extproc.cache.stage.CacheState while the cache follows this exchange
    cache_control: str = ""  # the client's Cache-Control header: no-cache skips the lookup, no-store the store
    cost_usd: float = 0.0
    upstream_sent_at: float | None = None  # the latest attempt's request left Tollgate
    last_attempt_status: int | None = None  # None: the latest attempt got no response headers
    failed_attempt_seconds: float = 0.0  # time spent on attempts that were not the answer
    response_seconds: float = 0.0  # Python time spent on response messages
    secrets: list[str] = field(default_factory=list)  # every credential injected for it, scrubbed from answers
    guardrails: GuardState | None = None  # what the guardrails decided, when they are on
    inbound: str = "openai"  # the client's schema: "openai", or "anthropic" for POST /v1/messages
    target_index: int = 0  # the alias target of the latest attempt
    key_slot: int | None = None  # which key of its provider's pool the latest attempt carries
    tried_keys: set[tuple[str, int]] = field(default_factory=set)  # (provider, key) pairs this request used
    outcomes: list[list] = field(default_factory=list)  # per attempt: [provider, HTTP status or None (no answer)]
    retry: str | None = None  # what the latest failed attempt asked of the next one: "key" | "fallback"
    observed: Any = None  # extproc.pipeline.observe.Observer when the answer's chunks pass unheld

    def outcome_text(self) -> str:
        """Each attempt's outcome, in order: ``openai=401,openai=200``; ``none`` where no answer came."""
        return ",".join(f"{p}={s if s is not None else 'none'}" for p, s in self.outcomes)

    def tpot(self) -> float | None:
        """Seconds per output token after the first; streams only."""
        u = self.usage
        if not self.stream or self.first_token_at is None or self.last_token_at is None or u is None:
            return None
        if u.completion_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (u.completion_tokens - 1)

    def overhead(self) -> float | None:
        """Time in Tollgate and Envoy, excluding the provider (see metrics.py)."""
        if self.upstream_sent_at is None:
            return None
        return max(0.0, self.upstream_sent_at - self.started_at - self.failed_attempt_seconds) + self.response_seconds


class Exchanges:
    """Live exchanges by request id."""

    def __init__(self) -> None:
        self._live: dict[str, Exchange] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._live

    def add(self, ex: Exchange) -> None:
        self._live[ex.request_id] = ex

    def get(self, request_id: str) -> Exchange | None:
        return self._live.get(request_id)

    def release(self, ex: Exchange) -> bool:
        """Drop one holder; True when that was the last, and the exchange is over.

        The gateway stream reads the answer, so it is normally the last; a
        fallback attempt's stream may still be closing, so the exchange ends
        when all are done, whichever is last.
        """
        ex.holders -= 1
        if ex.holders > 0:
            return False
        self._live.pop(ex.request_id, None)
        return True
