"""The values quota code passes around: limits, reservations, rejections.

A *scope* is who or what a limit belongs to, written ``kind:name``:
``principal:alice``, ``team:ml``, ``org``, ``alias:gpt-4o``. Each scope may
have one token bucket (tokens per minute, with a burst) and any number of
currency budgets (per calendar day or month). Money is always an integer
number of micro-dollars (1 USD = 1_000_000), so sums are exact.

Stores take ``ScopeLimits`` and answer with a ``Reservation`` (everything was
checked and deducted) or a ``Rejection`` (nothing was deducted; it names the
scope that refused and when to retry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from extproc.errors import QuotaExceeded

Kind = Literal["tokens", "requests", "money"]
Period = Literal["minute", "day", "month"]
MICROS_PER_USD = 1_000_000
MAX_TOKENS = 10_000_000_000  # per bucket: keeps the store's integer arithmetic exact in Lua's doubles


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """Refills ``per_minute`` tokens a minute, holding at most ``burst``."""

    per_minute: int
    burst: int

    def __post_init__(self) -> None:
        if not (1 <= self.per_minute <= MAX_TOKENS and 1 <= self.burst <= MAX_TOKENS):
            raise ValueError(f"a token bucket needs per_minute and burst from 1 to {MAX_TOKENS}")


@dataclass(frozen=True, slots=True)
class Budget:
    """At most ``limit_micro_usd`` spent per calendar ``period``."""

    period: Literal["day", "month"]
    limit_micro_usd: int

    def __post_init__(self) -> None:
        if self.period not in ("day", "month"):
            raise ValueError(f"a budget period is day or month, not {self.period!r}")
        if self.limit_micro_usd < 0:
            raise ValueError("a budget limit cannot be negative")


@dataclass(frozen=True, slots=True)
class ScopeLimits:
    scope: str
    bucket: TokenBucket | None = None  # tokens per minute
    budgets: tuple[Budget, ...] = ()
    requests: TokenBucket | None = None  # requests per minute (one per request, never given back)


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit as seen by the store during a call (for ``x-ratelimit-*``)."""

    scope: str
    kind: Kind
    period: Period
    limit: int  # tokens or requests (the burst) or micro-dollars
    remaining: int  # may be negative after a settle charged more than was reserved
    reset_seconds: float  # tokens: until the bucket is full; money: until the period ends


@dataclass(frozen=True, slots=True)
class Reservation:
    """Tokens and money held for one request until it is settled.

    ``windows`` holds, for each budget of each scope (in order), the start of
    the calendar period it was charged to (ms since the epoch, server time):
    top-ups and the settlement go to the same period, even after midnight.
    """

    id: str
    scopes: tuple[ScopeLimits, ...]
    windows: tuple[int, ...]
    tokens: int
    micro_usd: int
    lease_deadline: float  # server time, seconds since the epoch
    states: tuple[LimitState, ...] = ()

    def headers(self) -> dict[str, str]:
        return ratelimit_headers(self.states)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Nothing was deducted: ``scope``'s ``kind`` limit cannot take the request now."""

    scope: str
    kind: Kind
    period: Period
    requested: int  # tokens or micro-dollars
    limit: int
    remaining: int
    retry_after: int  # whole seconds, at least 1
    never_fits: bool = False  # more than the bucket's burst: waiting cannot help
    states: tuple[LimitState, ...] = ()
    reason: str | None = None  # set when the reservation itself is gone (top-up after expiry)

    @property
    def code(self) -> str:
        return "insufficient_quota" if self.kind == "money" else "rate_limit_exceeded"

    def message(self) -> str:
        if self.reason:
            return self.reason
        if self.kind == "tokens" and self.never_fits:
            return (f"request too large for {self.scope}: it needs {self.requested} tokens and the limit is "
                    f"{self.limit} tokens per minute; reduce the prompt or max_tokens")
        if self.kind in ("tokens", "requests"):
            return (f"rate limit reached for {self.scope}: limit {self.limit} {self.kind} per minute, remaining "
                    f"{max(self.remaining, 0)}, requested {self.requested}; try again in {self.retry_after}s")
        return (f"budget exhausted for {self.scope}: the {self.period}ly budget is {usd(self.limit)}, "
                f"{usd(max(self.remaining, 0))} is left and this request may cost up to {usd(self.requested)}; "
                f"it resets in {self.retry_after}s")

    def error(self) -> QuotaExceeded:
        """The 429 the client gets, in OpenAI's shape, with ``Retry-After`` and ``x-ratelimit-*``.

        When waiting cannot help soon (a spent budget resets at the end of its
        period; a request larger than the bucket never fits), ``x-should-retry:
        false`` tells the OpenAI SDKs not to retry it at once.
        """
        headers = {"retry-after": str(self.retry_after), **ratelimit_headers(self.states)}
        if self.never_fits or self.kind == "money":
            headers["x-should-retry"] = "false"
        return QuotaExceeded(self.message(), scope_kind=self.scope.split(":", 1)[0], kind=self.kind, headers=headers)


@dataclass(frozen=True, slots=True)
class Settlement:
    """What ``settle`` did.

    ``outcome``: ``settled`` (the difference was applied now), ``late`` (the
    lease had already expired into a charge of the reserved amount; the
    difference was applied now), ``duplicate`` (settled before: nothing
    changed) or ``unknown`` (no such reservation is remembered).
    """

    reservation_id: str
    outcome: Literal["settled", "late", "duplicate", "unknown"]
    tokens_delta: int = 0  # actual minus reserved: > 0 charged extra, < 0 refunded
    micro_usd_delta: int = 0
    notes: tuple[str, ...] = field(default=())


def usd(micro: int) -> str:
    return f"${micro / MICROS_PER_USD:,.2f}" if micro % 10_000 == 0 else f"${micro / MICROS_PER_USD:,.6f}"


def ratelimit_headers(states: tuple[LimitState, ...]) -> dict[str, str]:
    """OpenAI-style ``x-ratelimit-*-tokens`` (and ``-requests``) for the tightest bucket of each kind."""
    out: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        of_kind = [s for s in states if s.kind == kind]
        if not of_kind:
            continue
        tight = min(of_kind, key=lambda s: (s.remaining, -s.reset_seconds))
        out |= {
            f"x-ratelimit-limit-{kind}": str(tight.limit),
            f"x-ratelimit-remaining-{kind}": str(max(tight.remaining, 0)),
            f"x-ratelimit-reset-{kind}": format_reset(tight.reset_seconds),
        }
    return out


def format_reset(seconds: float) -> str:
    """``17ms``, ``1s``, ``6m0s``, ``1h0m0s``: the duration style OpenAI's headers use."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"
