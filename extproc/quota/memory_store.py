"""The embedded quota store: one process, no Redis (``make run``, single sidecar).

It keeps exactly the semantics of ``redis_store`` (the same test suite runs
against both), with the injected clock playing the part of Redis ``TIME``.
The arithmetic mirrors ``lua/common.lua`` line for line: buckets hold
sixty-thousandths of a token (so a bucket of R tokens/min gains exactly R
units per millisecond: refills never round), budgets hold micro-dollars,
times are integer milliseconds.
"""

from __future__ import annotations

import heapq
import math
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from zoneinfo import ZoneInfo

from extproc.quota import calendar
from extproc.quota.clock import SYSTEM_CLOCK, Clock
from extproc.quota.limits import Budget, LimitState, Rejection, Reservation, ScopeLimits, Settlement, TokenBucket
from extproc.quota.store import (
    DEFAULT_RETENTION_SECONDS,
    bucket_key,
    budget_key,
    check_amounts,
    lease_gone,
)

UNIT = 60_000  # bucket units per token

@dataclass(slots=True)
class _Record:
    state: str  # open | expired | settled
    tokens: int
    micro_usd: int
    deadline_ms: int
    windows: tuple[int, ...]
    tokens_delta: int = 0
    micro_usd_delta: int = 0
    closed_ms: int = 0


@dataclass(slots=True)
class _Outcome:
    """One limit's verdict during a call: its state after the call and, if it refuses, why."""

    state: LimitState
    refuses: bool = False
    retry_ms: int = 0
    never_fits: bool = False
    requested: int = 0
    target: str = ""  # what to take from if every limit agrees: a scope (bucket) or a period key (budget)
    amount: int = 0  # bucket units or micro-dollars
    bucket: TokenBucket | None = None


class MemoryQuotaStore:
    def __init__(
        self,
        *,
        tz: ZoneInfo,
        clock: Clock = SYSTEM_CLOCK,
        retention_seconds: float = DEFAULT_RETENTION_SECONDS,
    ) -> None:
        self._tz = tz
        self._clock = clock
        self._retention_ms = int(retention_seconds * 1000)
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[int, int]] = {}  # key -> (units, last refill ms)
        self._spent: dict[str, int] = {}  # budget period key -> micro-dollars
        self._records: dict[str, _Record] = {}
        self._leases: list[tuple[int, str]] = []  # heap of (deadline ms, id); stale entries skipped
        self._closed: list[tuple[int, str]] = []  # heap of (closed at ms, id)

    # -- the QuotaStore interface

    async def reserve(
        self,
        scopes: Sequence[ScopeLimits],
        tokens: int,
        micro_usd: int,
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
    ) -> Reservation | Rejection:
        check_amounts(tokens, micro_usd)
        rid = reservation_id or uuid.uuid4().hex
        scopes = tuple(scopes)
        with self._lock:
            now = self._now_ms()
            self._sweep(now)
            rec = self._records.get(rid)
            if rec is not None:
                return self._reservation(rid, scopes, rec, ())
            windows = tuple(self._window(b, now) for s in scopes for b in s.budgets)
            outcomes = self._judge(scopes, windows, tokens, micro_usd, now)
            refusal = _refusal(outcomes)
            if refusal is not None:
                return refusal
            self._apply(outcomes, now)
            rec = _Record("open", tokens, micro_usd, now + _ms(lease_seconds), windows)
            self._records[rid] = rec
            heapq.heappush(self._leases, (rec.deadline_ms, rid))
            return self._reservation(rid, scopes, rec, outcomes)

    async def top_up(
        self, reservation: Reservation, tokens: int, micro_usd: int, *, lease_seconds: float
    ) -> Reservation | Rejection:
        check_amounts(tokens, micro_usd)
        with self._lock:
            now = self._now_ms()
            self._sweep(now)
            rec = self._records.get(reservation.id)
            if rec is None or rec.state != "open":
                return lease_gone(reservation, tokens, rec.state if rec else "unknown")
            outcomes = self._judge(reservation.scopes, rec.windows, tokens, micro_usd, now)
            refusal = _refusal(outcomes)
            if refusal is not None:
                return refusal
            self._apply(outcomes, now)
            rec.tokens += tokens
            rec.micro_usd += micro_usd
            rec.deadline_ms = now + _ms(lease_seconds)
            heapq.heappush(self._leases, (rec.deadline_ms, reservation.id))
            return self._reservation(reservation.id, reservation.scopes, rec, outcomes)

    async def settle(self, reservation: Reservation, actual_tokens: int, actual_micro_usd: int) -> Settlement:
        check_amounts(actual_tokens, actual_micro_usd)
        with self._lock:
            now = self._now_ms()
            self._sweep(now)
            rec = self._records.get(reservation.id)
            if rec is None:
                return Settlement(reservation.id, "unknown")
            if rec.state == "settled":
                return Settlement(reservation.id, "duplicate", rec.tokens_delta, rec.micro_usd_delta)
            outcome: Literal["late", "settled"] = "late" if rec.state == "expired" else "settled"
            dt, dm = actual_tokens - rec.tokens, actual_micro_usd - rec.micro_usd
            budgets = [(s.scope, b) for s in reservation.scopes for b in s.budgets]
            for s in reservation.scopes:
                if s.bucket is not None:
                    self._bucket_add(s.scope, s.bucket, -dt * UNIT, now)
            for (scope, b), start in zip(budgets, rec.windows, strict=True):
                key = budget_key(scope, b.period, start)
                self._spent[key] = self._spent.get(key, 0) + dm
            rec.tokens_delta, rec.micro_usd_delta = dt, dm
            self._close(reservation.id, rec, "settled", now)
            return Settlement(reservation.id, outcome, dt, dm)

    async def close(self) -> None:
        return None

    # -- limits

    def _judge(
        self, scopes: Sequence[ScopeLimits], windows: tuple[int, ...], tokens: int, micro: int, now: int
    ) -> list[_Outcome]:
        out: list[_Outcome] = []
        starts = iter(windows)
        for s in scopes:
            if s.bucket is not None:
                out.append(self._judge_bucket(s.scope, s.bucket, tokens, now))
            for b in s.budgets:
                out.append(self._judge_budget(s.scope, b, next(starts), micro, now))
        return out

    def _judge_bucket(self, scope: str, b: TokenBucket, tokens: int, now: int) -> _Outcome:
        cap, need = b.burst * UNIT, tokens * UNIT
        level = self._bucket_level(bucket_key(scope), b, now)
        if need <= level:
            after = level - need
            return _Outcome(_bucket_state(scope, b, after), target=scope, amount=need, bucket=b)
        never = tokens > b.burst
        wait = cap - level if never else need - level
        return _Outcome(_bucket_state(scope, b, level), refuses=True, retry_ms=_fill_ms(wait, b.per_minute),
                        never_fits=never, requested=tokens)

    def _judge_budget(self, scope: str, b: Budget, start: int, micro: int, now: int) -> _Outcome:
        key = budget_key(scope, b.period, start)
        spent = self._spent.get(key, 0)
        end = calendar.period_end(b.period, self._tz, start)
        if spent + micro <= b.limit_micro_usd:
            state = LimitState(scope, "money", b.period, b.limit_micro_usd, b.limit_micro_usd - spent - micro,
                               (end - now) / 1000)
            return _Outcome(state, target=key, amount=micro)
        state = LimitState(scope, "money", b.period, b.limit_micro_usd, b.limit_micro_usd - spent, (end - now) / 1000)
        return _Outcome(state, refuses=True, retry_ms=end - now, requested=micro)

    def _apply(self, outcomes: list[_Outcome], now: int) -> None:
        for o in outcomes:
            if o.bucket is not None:
                self._bucket_add(o.target, o.bucket, -o.amount, now)
            else:
                self._spent[o.target] = self._spent.get(o.target, 0) + o.amount

    def _bucket_level(self, key: str, b: TokenBucket, now: int) -> int:
        cap = b.burst * UNIT
        held = self._buckets.get(key)
        if held is None:
            return cap
        level, last = held
        if now > last:
            level += (now - last) * b.per_minute
        return min(cap, level)

    def _bucket_add(self, scope: str, b: TokenBucket, units: int, now: int) -> None:
        key = bucket_key(scope)
        self._buckets[key] = (min(b.burst * UNIT, self._bucket_level(key, b, now) + units), now)

    def _window(self, b: Budget, now: int) -> int:
        bounds = calendar.boundaries(b.period, self._tz, now / 1000)
        return bounds[calendar.window_of(bounds, now) or 1]

    # -- leases

    def _sweep(self, now: int) -> None:
        while self._leases and self._leases[0][0] <= now:
            deadline, rid = heapq.heappop(self._leases)
            rec = self._records.get(rid)
            if rec is not None and rec.state == "open" and rec.deadline_ms == deadline:
                self._close(rid, rec, "expired", now)  # the reserved amount stays charged
        while self._closed and self._closed[0][0] <= now - self._retention_ms:
            _, rid = heapq.heappop(self._closed)
            rec = self._records.get(rid)
            if rec is not None and rec.state != "open" and rec.closed_ms <= now - self._retention_ms:
                del self._records[rid]

    def _close(self, rid: str, rec: _Record, state: str, now: int) -> None:
        rec.state, rec.closed_ms = state, now
        heapq.heappush(self._closed, (now, rid))

    def _now_ms(self) -> int:
        return int(self._clock.now() * 1000)

    def _reservation(
        self, rid: str, scopes: tuple[ScopeLimits, ...], rec: _Record, outcomes: Sequence[_Outcome]
    ) -> Reservation:
        return Reservation(rid, scopes, rec.windows, rec.tokens, rec.micro_usd, rec.deadline_ms / 1000,
                           tuple(o.state for o in outcomes))


def _refusal(outcomes: list[_Outcome]) -> Rejection | None:
    refusing = [o for o in outcomes if o.refuses]
    if not refusing:
        return None
    worst = max(refusing, key=lambda o: (o.never_fits, o.retry_ms))
    s = worst.state
    return Rejection(s.scope, s.kind, s.period, worst.requested, s.limit, s.remaining,
                     max(1, math.ceil(worst.retry_ms / 1000)), worst.never_fits, tuple(o.state for o in outcomes))


def _bucket_state(scope: str, b: TokenBucket, level: int) -> LimitState:
    reset = _fill_ms(b.burst * UNIT - level, b.per_minute) if level < b.burst * UNIT else 0
    return LimitState(scope, "tokens", "minute", b.burst, level // UNIT, reset / 1000)


def _fill_ms(units: int, per_minute: int) -> int:
    """Milliseconds for a bucket of ``per_minute`` tokens/min to gain ``units`` (it gains per_minute a ms)."""
    return -(-units // per_minute)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
