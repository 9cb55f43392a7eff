"""The one interface of quota stores; ``memory_store`` and ``redis_store`` implement it.

Semantics every implementation keeps (one test suite checks both):

- ``reserve`` checks every limit of every scope and deducts from all of them,
  or from none, in one atomic step. Tokens come out of token buckets; money is
  added to the current calendar period of each budget. Time is the store's
  own (Redis ``TIME``), never the caller's.
- A reservation holds a lease. ``top_up`` adds to a live reservation (checked
  like a reserve) and renews the lease. A lease that runs out is *expired
  into a charge*: the reserved amount stays spent and is never refunded by
  the passing of time, so a crashed sidecar cannot under-charge, and the
  store forgets the reservation after ``retention`` — nothing is held forever.
- ``settle`` applies ``actual - reserved`` to the same buckets and periods
  exactly once per reservation id: a retried settle changes nothing. A settle
  after the lease expired still applies the difference (outcome ``late``).
- Settling may push a budget past its limit (a stream's last slice, a
  provider that used more than counted); the next reserve is then refused.
- A store that cannot be reached raises ``QuotaUnavailable``; it never
  answers "allowed" by itself.
- Money is never lost or invented: ``settle`` writes the request's usage
  record to the ledger in the same atomic step as the budget change, and a
  lease that expires writes the record the reserve carried (outcome
  ``unknown``, amount = what the hold charged). A late settle replaces that
  record. So the budget counters always equal the sum of the ledger.
- Request buckets (``requests_per_minute``) take one per reserve and are
  neither topped up nor given back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from extproc.errors import GatewayError
from extproc.quota.limits import Rejection, Reservation, ScopeLimits, Settlement
from extproc.quota.records import UsageRecord

DEFAULT_RETENTION_SECONDS = 24 * 3600  # settled/expired reservations are remembered this long


class QuotaUnavailable(GatewayError):
    """The shared quota store could not be asked: fail closed unless configured otherwise."""

    status = 503
    type = "api_error"
    code = "quota_store_unavailable"


class QuotaStore(Protocol):
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
        """Hold ``tokens`` and ``micro_usd`` in every scope, or refuse without holding anything.

        Reserving an id that is already reserved returns that reservation
        unchanged (a retried call does not hold twice). ``record`` is what the
        ledger gets if the lease expires unsettled (``UsageRecord.expired``).
        """

    async def top_up(
        self, reservation: Reservation, tokens: int, micro_usd: int, *, lease_seconds: float
    ) -> Reservation | Rejection:
        """Hold more for a live reservation (a stream's next slice) and renew its lease.

        A Rejection means the caller must stop producing (end the stream). A
        reservation whose lease expired or that was settled is refused too.
        """

    async def settle(
        self, reservation: Reservation, actual_tokens: int, actual_micro_usd: int,
        record: UsageRecord | None = None,
    ) -> Settlement:
        """Replace what was reserved by what was used, and append ``record`` to the ledger; at most once."""

    async def charge(
        self, scopes: Sequence[ScopeLimits], tokens: int, micro_usd: int, *, reservation_id: str,
        record: UsageRecord | None = None,
    ) -> Settlement:
        """Add a request's usage to every scope without a limit check, and record it; once per id.

        For what a sidecar admitted on its own while the store was down (fail_open).
        """

    async def reap(self) -> int:
        """Expire the leases that ran out into their ``unknown`` records; how many (some may be left)."""

    async def close(self) -> None:
        """Release connections."""


def bucket_key(scope: str) -> str:
    return f"tb:{scope}"


def requests_key(scope: str) -> str:
    return f"rb:{scope}"


def budget_key(scope: str, period: str, window_start_ms: int) -> str:
    return f"bg:{scope}:{period}:{window_start_ms}"


def check_amounts(tokens: int, micro_usd: int) -> None:
    if tokens < 0 or micro_usd < 0:
        raise ValueError("tokens and micro_usd cannot be negative")


def lease_gone(reservation: Reservation, tokens: int, state: str) -> Rejection:
    """The Rejection for a top-up of a reservation that is no longer live."""
    what = {"expired": "its lease expired", "settled": "it was already settled"}.get(state, "it is unknown")
    return Rejection(
        scope="reservation", kind="tokens", period="minute", requested=tokens, limit=0, remaining=0,
        retry_after=1, never_fits=True, reason=f"reservation {reservation.id} cannot grow: {what}",
    )
