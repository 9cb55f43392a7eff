"""What only the shared store has to show: server time, hash tags, one round trip, outages."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.quota.clock import OffsetClock
from extproc.quota.limits import Budget, Rejection, Reservation, ScopeLimits, TokenBucket
from extproc.quota.redis_store import RedisQuotaStore, connect
from extproc.quota.store import QuotaUnavailable
from tests.harness import free_port
from tests.quota.conftest import UTC

USD = 1_000_000
TEAM = ScopeLimits("team:ml", TokenBucket(per_minute=60, burst=100), (Budget("day", 50 * USD),))
HOUR = 3600.0


async def test_sidecars_whose_clocks_differ_by_hours_charge_the_same_day(redis_client: aioredis.Redis) -> None:
    # 26 hours apart: by their own clocks these two sidecars are never on the same calendar day.
    ahead = RedisQuotaStore(redis_client, tz=UTC, clock=OffsetClock(+13 * HOUR))
    behind = RedisQuotaStore(redis_client, tz=UTC, clock=OffsetClock(-13 * HOUR))
    a = await ahead.reserve([TEAM], 0, 3 * USD, lease_seconds=30)
    b = await behind.reserve([TEAM], 0, 4 * USD, lease_seconds=30)
    assert isinstance(a, Reservation) and isinstance(b, Reservation)
    assert a.windows == b.windows
    assert [s.remaining for s in b.states if s.kind == "money"] == [43 * USD]


async def test_bucket_refill_uses_the_stores_time_not_the_sidecars(redis_client: aioredis.Redis) -> None:
    behind = RedisQuotaStore(redis_client, tz=UTC, clock=OffsetClock(-5))
    ahead = RedisQuotaStore(redis_client, tz=UTC, clock=OffsetClock(+5))
    assert isinstance(await behind.reserve([TEAM], 100, 0, lease_seconds=30), Reservation)
    # Had the sidecars' clocks been used, 10 s (10 tokens) would have "passed" in between.
    rejection = await ahead.reserve([TEAM], 5, 0, lease_seconds=30)
    assert isinstance(rejection, Rejection) and rejection.kind == "tokens"


async def test_a_clock_more_than_a_period_off_is_refused_loudly(redis_client: aioredis.Redis) -> None:
    broken = RedisQuotaStore(redis_client, tz=UTC, clock=OffsetClock(+3 * 24 * HOUR))
    with pytest.raises(QuotaUnavailable, match="clock"):
        await broken.reserve([TEAM], 1, 1, lease_seconds=30)


async def test_every_key_lives_in_one_cluster_slot(redis_client: aioredis.Redis) -> None:
    store = RedisQuotaStore(redis_client, tz=UTC, hash_tag="tenant-a")
    org = ScopeLimits("org", TokenBucket(1000, 1000), (Budget("day", USD), Budget("month", USD)))
    r = await store.reserve([TEAM, org], 10, 10, lease_seconds=0.05)
    assert isinstance(r, Reservation)
    await store.settle(r, 5, 5)
    keys = [k.decode() for k in await redis_client.keys("*")]
    assert len(keys) >= 6 and all(k.startswith("{tenant-a}:") for k in keys)
    assert len({key_slot(k.encode()) for k in keys}) == 1


async def test_a_reserve_is_one_round_trip(redis_client: aioredis.Redis) -> None:
    store = RedisQuotaStore(redis_client, tz=UTC)
    await store.reserve([TEAM], 1, 1, lease_seconds=30)  # loads the script once

    async def evalsha_calls() -> int:
        stats = await redis_client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    before = await evalsha_calls()
    await store.reserve([TEAM], 1, 1, lease_seconds=30)
    assert await evalsha_calls() == before + 1


async def test_an_unreachable_store_fails_closed() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0")
    store = RedisQuotaStore(client, tz=UTC)
    with pytest.raises(QuotaUnavailable) as caught:
        await store.reserve([TEAM], 1, 1, lease_seconds=30)
    assert caught.value.status == 503
    await store.close()


class LosesReplies(aioredis.Redis):
    """A real client whose next ``lose`` script calls run in Redis but whose replies never arrive."""

    lose = 0

    async def evalsha(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        reply = await super().evalsha(*args, **kwargs)
        if self.lose:
            self.lose -= 1
            raise RedisTimeoutError("Timeout reading from socket")
        return reply


async def test_a_reserve_whose_reply_was_lost_is_asked_again_and_holds_once(redis_server) -> None:  # type: ignore[no-untyped-def]
    client = LosesReplies.from_url(redis_server.url)
    await client.flushall()
    store = RedisQuotaStore(client, tz=UTC)
    client.lose = 1
    r = await store.reserve([TEAM], 10, 2 * USD, lease_seconds=30, reservation_id="rid-1")
    assert isinstance(r, Reservation) and client.lose == 0  # the second call found the first one's hold
    probe = await store.reserve([TEAM], 0, 0, lease_seconds=30)
    assert isinstance(probe, Reservation)
    assert [s.remaining for s in probe.states if s.kind == "money"] == [48 * USD]  # held once, not twice
    client.lose = 1
    assert (await store.settle(r, 10, 1 * USD)).outcome == "duplicate"  # the lost one settled: no second refund
    probe = await store.reserve([TEAM], 0, 0, lease_seconds=30)
    assert isinstance(probe, Reservation)
    assert [s.remaining for s in probe.states if s.kind == "money"] == [49 * USD]
    client.lose = 1
    with pytest.raises(QuotaUnavailable):  # a top-up is not repeated: a stream is cut rather than held twice
        await store.top_up(probe, 1, 0, lease_seconds=30)
    client.lose = 2
    with pytest.raises(QuotaUnavailable):  # lost twice: fail as configured
        await store.reserve([TEAM], 1, 0, lease_seconds=30, reservation_id="rid-2")
    await client.aclose()
