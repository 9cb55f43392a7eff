"""The one object the request path talks to about tokens and money.

Per request::

    admission = await governor.admit(body, caller=Caller(...), model=target_model, stream=stream)
        # before routing: counts the prompt, reserves prompt + max output (streams: + one slice)
        # in every scope at once; raises GatewayError 429 (or UnpricedModel 400, QuotaUnavailable 503)
    body.update(admission.upstream_changes())      # injected max_tokens, stream_options.include_usage
    response headers += admission.headers()        # x-ratelimit-*-tokens
    await admission.on_output(delta_text)          # per streamed chunk; raises 429 when a top-up is refused
    record = await admission.finish(usage, provider=..., model=answering_model, cache_status=...)
        # at the end (in a finally): settles the difference exactly once, appends the ledger record

With ``on_store_error: fail_open`` a store outage admits against a local
memory store holding each limit divided by ``replicas`` (counted in
``store_errors`` and logged); the request is settled where it was reserved,
so nothing is charged twice when the shared store is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc.errors import GatewayError
from extproc.providers.base import Usage
from extproc.quota.calendar import zone
from extproc.quota.clock import SYSTEM_CLOCK, Clock
from extproc.quota.ledger import Ledger, UsageRecord
from extproc.quota.limits import Rejection, Reservation, ScopeLimits
from extproc.quota.memory_store import MemoryQuotaStore
from extproc.quota.policy import QuotaPolicy, scaled
from extproc.quota.prices import UsageLike
from extproc.quota.settings import QuotaSettings
from extproc.quota.store import QuotaStore, QuotaUnavailable
from extproc.quota.tokenizer import OutputMeter, TokenCount, Tokenizer

log = logging.getLogger("tollgate.quota")


@dataclass(frozen=True, slots=True)
class Caller:
    request_id: str
    principal: str | None
    team: str | None
    alias: str


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``admit`` decided for one request."""

    caller: Caller
    model: str  # the model counted and priced for the reservation (the alias's first target)
    prompt: TokenCount
    max_output: int
    hold: int  # output tokens reserved up front (streams: one slice)
    inject_max_tokens: int | None  # the client set no cap: send this one upstream
    add_usage: bool  # a stream whose client did not ask for usage: ask for it, strip it on the way back


class Governor:
    def __init__(
        self,
        settings: QuotaSettings,
        *,
        store: QuotaStore,
        ledger: Ledger,
        tokenizer: Tokenizer,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.store = store
        self.ledger = ledger
        self.tokenizer = tokenizer
        self.policy = QuotaPolicy(settings)
        self.store_errors = 0  # shared-store failures (for a metric)
        self._local = (MemoryQuotaStore(tz=zone(settings.time_zone), clock=clock)
                       if settings.on_store_error == "fail_open" else None)

    async def admit(
        self, body: Mapping[str, Any], *, caller: Caller, model: str, stream: bool, endpoint: str = "chat"
    ) -> Admission:
        if endpoint == "embeddings":
            prompt = await asyncio.to_thread(self.tokenizer.count_embedding_input, model, body.get("input"))
            asked: Any = 0  # embeddings produce no output tokens
        else:
            prompt = await self.tokenizer.count_chat_async(model, body)
            asked = body.get("max_completion_tokens") or body.get("max_tokens")
        max_output = asked if isinstance(asked, int) else self.settings.default_max_tokens
        hold = min(self.settings.stream_slice_tokens, max_output) if stream else max_output
        micro = self.settings.prices.estimate(model, prompt.tokens, hold)
        scopes = self.policy.scopes(principal=caller.principal, team=caller.team, alias=caller.alias)
        result, store = await self._reserve(scopes, prompt.tokens + hold, micro, caller.request_id)
        if isinstance(result, Rejection):
            raise result.error()
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        plan = Plan(caller, model, prompt, max_output, hold, None if isinstance(asked, int) else max_output,
                    stream and not include_usage)
        return Admission(self, store, result, plan)

    async def _reserve(
        self, scopes: tuple[ScopeLimits, ...], tokens: int, micro: int, rid: str
    ) -> tuple[Reservation | Rejection, QuotaStore]:
        lease = self.settings.lease_seconds
        try:
            return await self.store.reserve(scopes, tokens, micro, lease_seconds=lease, reservation_id=rid), self.store
        except QuotaUnavailable as e:
            self.store_errors += 1
            if self._local is None:
                log.error("quota store unavailable, refusing request %s (fail_closed): %s", rid, e.message)
                raise
            log.warning("quota store unavailable, admitting request %s against local limits / %d (fail_open): %s",
                        rid, self.settings.replicas, e.message)
            local = scaled(scopes, self.settings.replicas)
            return await self._local.reserve(local, tokens, micro, lease_seconds=lease, reservation_id=rid), self._local


class Admission:
    """One admitted request's hold on the quotas, until ``finish``."""

    def __init__(self, governor: Governor, store: QuotaStore, reservation: Reservation, plan: Plan) -> None:
        self._g = governor
        self._store = store
        self.reservation = reservation
        self.plan = plan
        self.caller = plan.caller
        self.model = plan.model
        self.prompt = plan.prompt
        self.strip_usage_chunk = plan.add_usage  # the client did not ask for the usage chunk: drop it
        self._covered = plan.hold  # output tokens reserved so far
        self._meter: OutputMeter = governor.tokenizer.output_meter(plan.model)
        self._finished: UsageRecord | None = None

    def headers(self) -> dict[str, str]:
        return self.reservation.headers()

    def upstream_changes(self) -> dict[str, Any]:
        """Fields to set in the upstream request body."""
        changes: dict[str, Any] = {}
        if self.plan.inject_max_tokens is not None:
            changes["max_tokens"] = self.plan.inject_max_tokens
        if self.strip_usage_chunk:
            changes["stream_options"] = {"include_usage": True}
        return changes

    async def on_output(self, text: str) -> None:
        """Count streamed output; past the reserved slices, reserve the next one or end the stream (429)."""
        produced = self._meter.add(text)
        s = self._g.settings
        while produced > self._covered:
            grow = s.stream_slice_tokens
            micro = s.prices.estimate(self.model, 0, grow)
            try:
                result = await self._store.top_up(self.reservation, grow, micro, lease_seconds=s.lease_seconds)
            except QuotaUnavailable:
                self._g.store_errors += 1
                if s.on_store_error == "fail_closed":
                    raise
                return  # fail open: keep streaming, settle later
            if isinstance(result, Rejection):
                raise result.error()
            self.reservation, self._covered = result, self._covered + grow

    async def finish(
        self, usage: UsageLike | None, *, provider: str, model: str | None = None, cache_status: str = "bypass",
        cache_write_tokens: int = 0, answered: bool = True,
    ) -> UsageRecord:
        """Settle with the provider's usage (else the prompt plus what was streamed) and record it; once."""
        if self._finished is not None:
            return self._finished
        if not answered:
            usage = Usage(0, 0, 0)  # the provider produced nothing: nothing is billed
        elif usage is None:
            usage = Usage(self.prompt.tokens, await self._meter.exact(), 0)
        model = model or self.model
        micro = self._g.settings.prices.cost(model, usage, cache_write_tokens=cache_write_tokens)
        c = self.caller
        record = UsageRecord(c.request_id, c.principal or "", c.team or "", c.alias, provider, model,
                             usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, micro, cache_status)
        self._finished = record
        try:
            await self._store.settle(self.reservation, usage.prompt_tokens + usage.completion_tokens, micro)
        except GatewayError as e:
            self._g.store_errors += 1  # the lease will expire into a charge of what was reserved
            log.error("could not settle request %s: %s", c.request_id, e.message)
        try:
            await self._g.ledger.append(record)
        except GatewayError as e:
            log.error("could not record usage of request %s: %s", c.request_id, e.message)
        return record
