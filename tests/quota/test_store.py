"""What every quota store promises (run against the memory store and a real Redis)."""

from __future__ import annotations

import asyncio

import pytest

from extproc.quota.limits import Budget, Rejection, Reservation, ScopeLimits, TokenBucket
from extproc.quota.store import QuotaStore
from tests.quota.conftest import StoreFactory

USD = 1_000_000
TEAM = ScopeLimits("team:ml", TokenBucket(per_minute=60_000, burst=10_000), (Budget("day", 50 * USD),))
ORG = ScopeLimits("org", None, (Budget("day", 2_000 * USD), Budget("month", 20_000 * USD)))
LEASE = 30.0


def reserved(r: Reservation | Rejection) -> Reservation:
    assert isinstance(r, Reservation), r
    return r


def refused(r: Reservation | Rejection) -> Rejection:
    assert isinstance(r, Rejection), r
    return r


def remaining(r: Reservation | Rejection, scope: str, kind: str, period: str | None = None) -> int:
    states = [s for s in r.states if s.scope == scope and s.kind == kind and period in (None, s.period)]
    assert len(states) == 1, r.states
    return states[0].remaining


async def test_reserve_deducts_from_every_scope_at_once(store: QuotaStore) -> None:
    r = reserved(await store.reserve([TEAM, ORG], 1_000, 3 * USD, lease_seconds=LEASE))
    assert (r.tokens, r.micro_usd) == (1_000, 3 * USD)
    assert remaining(r, "team:ml", "tokens") in range(9_000, 9_010)  # the bucket refills while we look
    assert remaining(r, "team:ml", "money") == 47 * USD
    assert remaining(r, "org", "money", "day") == 1_997 * USD
    assert remaining(r, "org", "money", "month") == 19_997 * USD


async def test_a_refusal_by_one_scope_deducts_from_none(store: QuotaStore) -> None:
    tight_org = ScopeLimits("org", None, (Budget("day", 2 * USD),))
    rejection = refused(await store.reserve([TEAM, tight_org], 1_000, 3 * USD, lease_seconds=LEASE))
    assert (rejection.scope, rejection.kind, rejection.code) == ("org", "money", "insufficient_quota")
    r = reserved(await store.reserve([TEAM, ORG], 0, 0, lease_seconds=LEASE))
    assert remaining(r, "team:ml", "money") == 50 * USD
    assert remaining(r, "team:ml", "tokens") == 10_000


async def test_a_money_refusal_says_how_much_is_left_and_when_the_day_ends(store: QuotaStore) -> None:
    reserved(await store.reserve([TEAM], 0, 49 * USD, lease_seconds=LEASE))
    rejection = refused(await store.reserve([TEAM], 10, 2 * USD, lease_seconds=LEASE))
    assert (rejection.scope, rejection.kind, rejection.period) == ("team:ml", "money", "day")
    assert (rejection.limit, rejection.remaining, rejection.requested) == (50 * USD, 1 * USD, 2 * USD)
    assert 1 <= rejection.retry_after <= 86_400
    err = rejection.error()
    assert (err.status, err.type, err.code) == (429, "insufficient_quota", "insufficient_quota")
    assert err.headers["retry-after"] == str(rejection.retry_after)
    assert "team:ml" in err.message and "$1.00" in err.message


async def test_a_token_refusal_is_a_rate_limit_with_the_time_to_refill(store: QuotaStore) -> None:
    slow = ScopeLimits("principal:alice", TokenBucket(per_minute=600, burst=1_000))  # 10 tokens/s
    reserved(await store.reserve([slow], 1_000, 0, lease_seconds=LEASE))
    rejection = refused(await store.reserve([slow], 100, 0, lease_seconds=LEASE))
    assert (rejection.kind, rejection.code, rejection.never_fits) == ("tokens", "rate_limit_exceeded", False)
    assert 9 <= rejection.retry_after <= 10  # 100 tokens at 10/s
    err = rejection.error()
    assert (err.status, err.type) == (429, "tokens")
    assert err.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(err.headers["x-ratelimit-remaining-tokens"]) < 100


async def test_a_request_larger_than_the_burst_never_fits(store: QuotaStore) -> None:
    rejection = refused(await store.reserve([TEAM], 10_001, 0, lease_seconds=LEASE))
    assert rejection.never_fits and rejection.kind == "tokens"
    assert "request too large" in rejection.message()


async def test_buckets_refill_with_the_stores_time(store: QuotaStore) -> None:
    fast = ScopeLimits("alias:gpt-4o", TokenBucket(per_minute=600_000, burst=5_000))  # 10 tokens per ms
    reserved(await store.reserve([fast], 5_000, 0, lease_seconds=LEASE))
    assert isinstance(await store.reserve([fast], 2_000, 0, lease_seconds=LEASE), Rejection)
    await asyncio.sleep(0.25)
    r = reserved(await store.reserve([fast], 2_000, 0, lease_seconds=LEASE))
    assert 0 <= remaining(r, "alias:gpt-4o", "tokens") <= 3_000


async def test_settle_refunds_what_was_not_used(store: QuotaStore) -> None:
    r = reserved(await store.reserve([TEAM, ORG], 5_000, 10 * USD, lease_seconds=LEASE))
    s = await store.settle(r, 1_200, 2_345_678)
    assert (s.outcome, s.tokens_delta, s.micro_usd_delta) == ("settled", -3_800, -(10 * USD - 2_345_678))
    after = reserved(await store.reserve([TEAM, ORG], 0, 0, lease_seconds=LEASE))
    assert remaining(after, "team:ml", "money") == 50 * USD - 2_345_678
    assert remaining(after, "org", "money", "month") == 20_000 * USD - 2_345_678
    assert remaining(after, "team:ml", "tokens") >= 10_000 - 1_200


async def test_settle_charges_more_than_reserved_even_past_the_limit(store: QuotaStore) -> None:
    r = reserved(await store.reserve([TEAM], 100, 49 * USD, lease_seconds=LEASE))
    s = await store.settle(r, 100, 52 * USD)
    assert (s.outcome, s.micro_usd_delta) == ("settled", 3 * USD)
    rejection = refused(await store.reserve([TEAM], 1, 1, lease_seconds=LEASE))
    assert rejection.remaining == -2 * USD


async def test_a_retried_settle_never_counts_twice(store: QuotaStore) -> None:
    r = reserved(await store.reserve([TEAM], 100, 5 * USD, lease_seconds=LEASE))
    first = await store.settle(r, 50, 1 * USD)
    again = await store.settle(r, 50, 1 * USD)
    different = await store.settle(r, 500, 9 * USD)
    assert first.outcome == "settled"
    assert (again.outcome, again.micro_usd_delta) == ("duplicate", first.micro_usd_delta)
    assert different.outcome == "duplicate"
    after = reserved(await store.reserve([TEAM], 0, 0, lease_seconds=LEASE))
    assert remaining(after, "team:ml", "money") == 49 * USD


async def test_settling_an_unknown_reservation_changes_nothing(store: QuotaStore) -> None:
    r = reserved(await store.reserve([TEAM], 100, 5 * USD, lease_seconds=LEASE))
    ghost = Reservation("never-reserved", r.scopes, r.windows, 100, 5 * USD, r.lease_deadline)
    assert (await store.settle(ghost, 0, 0)).outcome == "unknown"
    after = reserved(await store.reserve([TEAM], 0, 0, lease_seconds=LEASE))
    assert remaining(after, "team:ml", "money") == 45 * USD


async def test_reserving_the_same_id_twice_holds_once(store: QuotaStore) -> None:
    a = reserved(await store.reserve([TEAM], 100, 5 * USD, lease_seconds=LEASE, reservation_id="req-1"))
    b = reserved(await store.reserve([TEAM], 100, 5 * USD, lease_seconds=LEASE, reservation_id="req-1"))
    assert (a.id, b.id, b.micro_usd) == ("req-1", "req-1", 5 * USD)
    after = reserved(await store.reserve([TEAM], 0, 0, lease_seconds=LEASE))
    assert remaining(after, "team:ml", "money") == 45 * USD


async def test_top_up_holds_more_and_settle_counts_every_slice(store: QuotaStore) -> None:
    r = reserved(await store.reserve([TEAM, ORG], 300, 1 * USD, lease_seconds=LEASE))
    r = reserved(await store.top_up(r, 256, 1 * USD, lease_seconds=LEASE))
    r = reserved(await store.top_up(r, 256, 1 * USD, lease_seconds=LEASE))
    assert (r.tokens, r.micro_usd) == (812, 3 * USD)
    assert remaining(r, "team:ml", "money") == 47 * USD
    s = await store.settle(r, 700, 2_500_000)
    assert (s.tokens_delta, s.micro_usd_delta) == (-112, -500_000)
    after = reserved(await store.reserve([TEAM, ORG], 0, 0, lease_seconds=LEASE))
    assert remaining(after, "team:ml", "money") == 50 * USD - 2_500_000


async def test_a_refused_top_up_takes_nothing(store: QuotaStore) -> None:
    r = reserved(await store.reserve([TEAM], 100, 49 * USD, lease_seconds=LEASE))
    rejection = refused(await store.top_up(r, 100, 2 * USD, lease_seconds=LEASE))
    assert (rejection.scope, rejection.code) == ("team:ml", "insufficient_quota")
    s = await store.settle(r, 100, 49 * USD)
    assert s.micro_usd_delta == 0
    after = reserved(await store.reserve([TEAM], 0, 0, lease_seconds=LEASE))
    assert remaining(after, "team:ml", "money") == 1 * USD


async def test_an_expired_lease_becomes_a_charge_of_what_it_held(store: QuotaStore) -> None:
    r = reserved(await store.reserve([TEAM], 2_000, 7 * USD, lease_seconds=0.1))
    await asyncio.sleep(0.2)
    after = reserved(await store.reserve([TEAM], 0, 0, lease_seconds=LEASE))  # any call sweeps
    assert remaining(after, "team:ml", "money") == 43 * USD  # never refunded by time alone
    gone = refused(await store.top_up(r, 10, 1, lease_seconds=LEASE))
    assert gone.scope == "reservation" and "expired" in gone.message()


async def test_a_late_settle_still_applies_the_difference_once(store: QuotaStore) -> None:
    r = reserved(await store.reserve([TEAM], 2_000, 7 * USD, lease_seconds=0.1))
    await asyncio.sleep(0.2)
    late = await store.settle(r, 1_000, 3 * USD)
    assert (late.outcome, late.micro_usd_delta) == ("late", -4 * USD)
    assert (await store.settle(r, 1_000, 3 * USD)).outcome == "duplicate"
    after = reserved(await store.reserve([TEAM], 0, 0, lease_seconds=LEASE))
    assert remaining(after, "team:ml", "money") == 47 * USD


async def test_top_up_renews_the_lease(store: QuotaStore) -> None:
    r = reserved(await store.reserve([TEAM], 100, 1, lease_seconds=0.3))
    for _ in range(3):
        await asyncio.sleep(0.15)
        r = reserved(await store.top_up(r, 10, 1, lease_seconds=0.3))
    assert (await store.settle(r, 130, 4)).outcome == "settled"


async def test_closed_reservations_are_forgotten_after_the_retention(make_store: StoreFactory) -> None:
    store = make_store(retention_seconds=0.2)
    r = reserved(await store.reserve([TEAM], 100, 1 * USD, lease_seconds=LEASE))
    assert (await store.settle(r, 100, 1 * USD)).outcome == "settled"
    await asyncio.sleep(0.3)
    await store.reserve([TEAM], 0, 0, lease_seconds=LEASE)  # sweeps
    assert (await store.settle(r, 100, 1 * USD)).outcome == "unknown"


async def test_negative_amounts_are_programming_errors(store: QuotaStore) -> None:
    with pytest.raises(ValueError):
        await store.reserve([TEAM], -1, 0, lease_seconds=LEASE)


async def test_the_reservation_carries_openai_style_headers(store: QuotaStore) -> None:
    alias = ScopeLimits("alias:gpt-4o", TokenBucket(per_minute=30_000, burst=30_000))
    r = reserved(await store.reserve([TEAM, alias], 4_000, 1, lease_seconds=LEASE))
    h = r.headers()
    assert h["x-ratelimit-limit-tokens"] == "10000"  # the tighter of the two buckets
    assert int(h["x-ratelimit-remaining-tokens"]) in range(6_000, 6_010)
    assert h["x-ratelimit-reset-tokens"].endswith("s")
