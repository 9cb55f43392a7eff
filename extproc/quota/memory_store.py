"""The embedded quota store: one process, no Redis (``make run``, single sidecar).

It keeps exactly the semantics of ``redis_store`` (the same test suite runs
against both), with the injected clock playing the part of Redis ``TIME``.
Alone it is the fail-open stand-in for Redis (state in memory only); with a
``StateFile`` it is the embedded store of ``make run``: every change is also
handed to the file's next commit (see ``state_file.py``), and the state
comes back after a restart (``open_embedded``).
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
from dataclasses import dataclass, replace
from typing import Literal
from zoneinfo import ZoneInfo

from extproc.quota import calendar
from extproc.quota.clock import SYSTEM_CLOCK, Clock
from extproc.quota.limits import (
    Budget,
    Kind,
    LimitState,
    Rejection,
    Reservation,
    ScopeLimits,
    Settlement,
    TokenBucket,
)
from extproc.quota.records import UsageRecord
from extproc.quota.state_file import StateFile
from extproc.quota.store import (
    DEFAULT_RETENTION_SECONDS,
    bucket_key,
    budget_key,
    check_amounts,
    lease_gone,
    requests_key,
)

UNIT = 60_000  # bucket units per token
SCAN_MS = 250  # how often open holds are checked for an expired lease (top-up and settle check their own)

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
    ledger: UsageRecord | None = None  # written (outcome unknown) if the lease expires unsettled


@dataclass(slots=True)
class _Outcome:
    """One limit's verdict during a call: its state after the call and, if it refuses, why."""

    state: LimitState
    refuses: bool = False
    retry_ms: int = 0
    never_fits: bool = False
    requested: int = 0
    target: str = ""  # what to take from if every limit agrees: a bucket key or a period key (budget)
    amount: int = 0  # bucket units or micro-dollars
    bucket: TokenBucket | None = None


class MemoryQuotaStore:
    def __init__(
        self,
        *,
        tz: ZoneInfo,
        clock: Clock = SYSTEM_CLOCK,
        retention_seconds: float = DEFAULT_RETENTION_SECONDS,
        state: StateFile | None = None,
    ) -> None:
        self._tz = tz
        self._clock = clock
        self._retention_ms = int(retention_seconds * 1000)
        self._lock = threading.Lock()
        self._state = state  # None: memory only
        self._buckets: dict[str, tuple[int, int]] = {}  # key -> (units, last refill ms)
        self._spent: dict[str, int] = {}  # budget period key -> micro-dollars
        self._records: dict[str, _Record] = {}
        # Open holds by id (their deadline is on the record): as many as requests in flight. A heap of
        # deadlines would keep a settled hold's entry until its lease ran out: 10 minutes of traffic.
        self._open: set[str] = set()
        self._next_scan = 0  # ms: open holds are scanned for expiry at most every SCAN_MS
        self._closed: list[tuple[int, str]] = []  # heap of (closed at ms, id)
        # period -> (start, end) ms of the current window: the zone arithmetic once a period, not per request
        self._windows: dict[str, tuple[int, int]] = {}

    @property
    def state_file(self) -> StateFile | None:
        """Where the state is kept (None: memory only)."""
        return self._state

    # -- the QuotaStore interface

    async def reserve(
        self,
        scopes: Sequence[ScopeLimits],
        tokens: int,
        micro_usd: int,
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
        record: UsageRecord | None = None,
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
            outcomes = self._judge(scopes, windows, tokens, micro_usd, now, requests=True)
            refusal = _refusal(outcomes)
            if refusal is not None:
                return refusal
            self._apply(outcomes, now)
            rec = _Record("open", tokens, micro_usd, now + _ms(lease_seconds), windows, ledger=record)
            self._records[rid] = rec
            self._open.add(rid)
            if self._state is not None:
                self._state.hold(rid, tokens, micro_usd, record)
                durable = self._state.waiter()
            result = self._reservation(rid, scopes, rec, outcomes)
        if self._state is not None:
            await durable  # the hold is on disk before the request can reach a provider
        return result

    async def top_up(
        self, reservation: Reservation, tokens: int, micro_usd: int, *, lease_seconds: float
    ) -> Reservation | Rejection:
        check_amounts(tokens, micro_usd)
        with self._lock:
            now = self._now_ms()
            self._sweep(now)
            rec = self._records.get(reservation.id)
            self._expire_if_due(reservation.id, rec, now)
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
            if self._state is not None:
                self._state.hold(reservation.id, rec.tokens, rec.micro_usd, rec.ledger)
            return self._reservation(reservation.id, reservation.scopes, rec, outcomes)

    async def settle(
        self, reservation: Reservation, actual_tokens: int, actual_micro_usd: int,
        record: UsageRecord | None = None,
    ) -> Settlement:
        check_amounts(actual_tokens, actual_micro_usd)
        with self._lock:
            now = self._now_ms()
            self._sweep(now)
            rec = self._records.get(reservation.id)
            self._expire_if_due(reservation.id, rec, now)
            if rec is None:
                return Settlement(reservation.id, "unknown")
            if rec.state == "settled":
                return Settlement(reservation.id, "duplicate", rec.tokens_delta, rec.micro_usd_delta)
            return self._close_hold(reservation.id, reservation.scopes, rec, actual_tokens, actual_micro_usd,
                                    record, now)

    async def charge(
        self, scopes: Sequence[ScopeLimits], tokens: int, micro_usd: int, *, reservation_id: str,
        record: UsageRecord | None = None,
    ) -> Settlement:
        """Add what a request used to every scope without checking limits, once per id (fail-open catch-up)."""
        check_amounts(tokens, micro_usd)
        with self._lock:
            now = self._now_ms()
            self._sweep(now)
            rec = self._records.get(reservation_id)
            self._expire_if_due(reservation_id, rec, now)
            if rec is not None and rec.state == "settled":
                return Settlement(reservation_id, "duplicate", rec.tokens_delta, rec.micro_usd_delta)
            if rec is not None:  # its reserve went through and only the reply was lost: settle that hold
                return self._close_hold(reservation_id, scopes, rec, tokens, micro_usd, record, now)
            windows = tuple(self._window(b, now) for s in scopes for b in s.budgets)
            starts = iter(windows)
            for s in scopes:
                if s.bucket is not None:
                    self._bucket_add(bucket_key(s.scope), s.bucket, -tokens * UNIT, now)
                for b in s.budgets:
                    self._spend(budget_key(s.scope, b.period, next(starts)), micro_usd)
            rec = _Record("settled", tokens, micro_usd, now, windows, tokens, micro_usd)
            self._records[reservation_id] = rec
            self._close(reservation_id, rec, "settled", now)
            if self._state is not None and record is not None:
                self._state.record(replace(record, time=now / 1000))
            return Settlement(reservation_id, "settled", tokens, micro_usd)

    def _close_hold(
        self, rid: str, scopes: Sequence[ScopeLimits], rec: _Record, tokens: int, micro_usd: int,
        record: UsageRecord | None, now: int,
    ) -> Settlement:
        """Settle an open or expired hold at what was used, on its own buckets and periods (lock held)."""
        outcome: Literal["late", "settled"] = "late" if rec.state == "expired" else "settled"
        dt, dm = tokens - rec.tokens, micro_usd - rec.micro_usd
        budgets = [(s.scope, b) for s in scopes for b in s.budgets]
        for s in scopes:
            if s.bucket is not None:
                self._bucket_add(bucket_key(s.scope), s.bucket, -dt * UNIT, now)
        for (scope, b), start in zip(budgets, rec.windows, strict=True):
            self._spend(budget_key(scope, b.period, start), dm)
        rec.tokens_delta, rec.micro_usd_delta = dt, dm
        self._close(rid, rec, "settled", now)
        if self._state is not None and record is not None:
            # late: the expiry wrote an ``unknown`` record for this request; the settlement replaces it
            self._state.record(replace(record, time=now / 1000), replace=outcome == "late")
        return Settlement(rid, outcome, dt, dm)

    async def reap(self) -> int:
        """Expire the leases that ran out (each into its ``unknown`` record); how many."""
        with self._lock:
            return self._sweep(self._now_ms(), force=True)

    async def close(self) -> None:
        if self._state is not None:
            self._state.close()  # the last commit, on the loop: nothing may change the store meanwhile

    # -- limits

    def _judge(
        self, scopes: Sequence[ScopeLimits], windows: tuple[int, ...], tokens: int, micro: int, now: int,
        *, requests: bool = False,
    ) -> list[_Outcome]:
        """Every limit's verdict; request buckets only when ``requests`` (a new request, not a top-up)."""
        out: list[_Outcome] = []
        starts = iter(windows)
        for s in scopes:
            if requests and s.requests is not None:
                out.append(self._judge_bucket(s.scope, "requests", s.requests, 1, now))
            if s.bucket is not None:
                out.append(self._judge_bucket(s.scope, "tokens", s.bucket, tokens, now))
            for b in s.budgets:
                out.append(self._judge_budget(s.scope, b, next(starts), micro, now))
        return out

    def _judge_bucket(self, scope: str, kind: Kind, b: TokenBucket, amount: int, now: int) -> _Outcome:
        key = requests_key(scope) if kind == "requests" else bucket_key(scope)
        cap, need = b.burst * UNIT, amount * UNIT
        level = self._bucket_level(key, b, now)
        if need <= level:
            after = level - need
            return _Outcome(_bucket_state(scope, kind, b, after), target=key, amount=need, bucket=b)
        never = amount > b.burst
        wait = cap - level if never else need - level
        return _Outcome(_bucket_state(scope, kind, b, level), refuses=True, retry_ms=_fill_ms(wait, b.per_minute),
                        never_fits=never, requested=amount)

    def _judge_budget(self, scope: str, b: Budget, start: int, micro: int, now: int) -> _Outcome:
        key = budget_key(scope, b.period, start)
        spent = self._spent.get(key, 0)
        current = self._windows.get(b.period)
        end = current[1] if current is not None and current[0] == start else calendar.period_end(
            b.period, self._tz, start)
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
                self._spend(o.target, o.amount)

    def _spend(self, key: str, micro: int) -> None:
        spent = self._spent[key] = self._spent.get(key, 0) + micro
        if self._state is not None:
            self._state.spend(key, spent)

    def _bucket_level(self, key: str, b: TokenBucket, now: int) -> int:
        cap = b.burst * UNIT
        held = self._buckets.get(key)
        if held is None:
            return cap
        level, last = held
        if now > last:
            level += (now - last) * b.per_minute
        return min(cap, level)

    def _bucket_add(self, key: str, b: TokenBucket, units: int, now: int) -> None:
        level = self._buckets[key] = (min(b.burst * UNIT, self._bucket_level(key, b, now) + units), now)
        if self._state is not None:
            self._state.bucket(key, *level)

    def _window(self, b: Budget, now: int) -> int:
        current = self._windows.get(b.period)
        if current is not None and current[0] <= now < current[1]:
            return current[0]
        bounds = calendar.boundaries(b.period, self._tz, now / 1000)
        i = calendar.window_of(bounds, now) or 1
        self._windows[b.period] = (bounds[i], bounds[i + 1])
        return bounds[i]

    # -- leases

    def _sweep(self, now: int, *, force: bool = False) -> int:
        """Expire the holds whose lease ran out (scanning the open ones at most every ``SCAN_MS``, so the
        cost per call stays constant) and forget closed reservations after the retention."""
        expired = 0
        if force or now >= self._next_scan:
            self._next_scan = now + SCAN_MS
            for rid in [rid for rid in self._open if self._records[rid].deadline_ms <= now]:
                self._expire_if_due(rid, self._records[rid], now)
                expired += 1
        while self._closed and self._closed[0][0] <= now - self._retention_ms:
            _, rid = heapq.heappop(self._closed)
            rec = self._records.get(rid)
            if rec is not None and rec.state != "open" and rec.closed_ms <= now - self._retention_ms:
                del self._records[rid]
        return expired

    def _expire_if_due(self, rid: str, rec: _Record | None, now: int) -> None:
        """An open hold past its deadline becomes a charge of what it holds, and its ``unknown`` record."""
        if rec is None or rec.state != "open" or rec.deadline_ms > now:
            return
        self._close(rid, rec, "expired", now)  # the reserved amount stays charged
        if self._state is not None and rec.ledger is not None:
            self._state.record(replace(rec.ledger.expired(rec.tokens, rec.micro_usd), time=now / 1000))

    def _close(self, rid: str, rec: _Record, state: str, now: int) -> None:
        rec.state, rec.closed_ms = state, now
        self._open.discard(rid)
        heapq.heappush(self._closed, (now, rid))
        if self._state is not None:
            self._state.release(rid)

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


def _bucket_state(scope: str, kind: Kind, b: TokenBucket, level: int) -> LimitState:
    reset = _fill_ms(b.burst * UNIT - level, b.per_minute) if level < b.burst * UNIT else 0
    return LimitState(scope, kind, "minute", b.burst, level // UNIT, reset / 1000)


def _fill_ms(units: int, per_minute: int) -> int:
    """Milliseconds for a bucket of ``per_minute`` tokens/min to gain ``units`` (it gains per_minute a ms)."""
    return -(-units // per_minute)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def open_embedded(
    path: str, *, tz: ZoneInfo, clock: Clock = SYSTEM_CLOCK, retention_seconds: float = 60.0,
) -> tuple[MemoryQuotaStore, int]:
    """The embedded store of ``path`` (SQLite, created if missing) and how many dead holds it recovered.

    Settled reservations are remembered ``retention_seconds`` (a minute), not
    a day as in Redis: here only this process settles, once per request, so
    a duplicate settle can only come soon after the first, and a day of ids
    in memory would grow with the traffic.
    """
    state = StateFile(path)
    loaded = state.load(clock.now())
    store = MemoryQuotaStore(tz=tz, clock=clock, retention_seconds=retention_seconds, state=state)
    store._buckets.update(loaded.buckets)
    store._spent.update(loaded.spent)
    return store, loaded.recovered
