"""Under concurrency a budget is never overshot (beyond one slice per stream) and every token is charged once."""

from __future__ import annotations

import multiprocessing

import redis.asyncio as aioredis

from extproc.quota.redis_store import RedisQuotaStore
from extproc.quota.store import QuotaStore
from tests.quota.conftest import UTC, StoreFactory
from tests.quota.redis_process import RedisProcess
from tests.quota.workload import BUDGET, BURST, SCOPES, SLICE, Outcome, clients, process_main


async def state_of(store: QuotaStore) -> tuple[int, int]:
    """(micro-dollars spent today by the team, tokens taken from the bucket)."""
    r = await store.reserve(SCOPES, 0, 0, lease_seconds=1)  # refused once a stream pushed it past the limit
    money = next(s for s in r.states if s.scope == "team:ml")
    tokens = next(s for s in r.states if s.kind == "tokens")
    return BUDGET - money.remaining, BURST - tokens.remaining


def assert_exact(spent: int, taken: int, out: Outcome) -> None:
    assert spent == out.micro_usd  # every micro-dollar used was charged, once
    assert taken in (out.tokens, out.tokens - 1)  # the bucket may have refilled one token meanwhile


async def test_plain_requests_never_overshoot_the_budget(make_store: StoreFactory) -> None:
    store = make_store()
    out = await clients(store, list(range(8)), 30, streams=False)
    spent, taken = await state_of(store)
    assert out.rejected > 0 and out.admitted > 20, out  # the budget was contended
    assert spent <= BUDGET
    assert_exact(spent, taken, out)


async def test_streams_overshoot_by_at_most_one_slice_each(make_store: StoreFactory) -> None:
    store = make_store()
    seeds = list(range(100, 112))
    out = await clients(store, seeds, 25, streams=True)
    spent, taken = await state_of(store)
    assert out.cut > 0 and out.rejected > 0, out
    assert spent <= BUDGET + len(seeds) * 2 * SLICE
    assert_exact(spent, taken, out)


def test_four_sidecar_processes_share_one_redis_budget(redis_server: RedisProcess, runner) -> None:  # type: ignore[no-untyped-def]
    runner.run(_flush(redis_server.url))
    work = [(redis_server.url, [p * 10 + c for c in range(3)], 20) for p in range(4)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        outcomes = pool.starmap(process_main, work)
    out = Outcome()
    for o in outcomes:
        out.merge(o)
    spent, taken = runner.run(_state(redis_server.url))
    assert out.admitted > 0 and out.rejected > 0 and out.cut > 0, out
    assert spent <= BUDGET + 12 * 2 * SLICE  # 12 clients: at most 12 streams in flight
    assert_exact(spent, taken, out)


async def _flush(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    await client.aclose()


async def _state(url: str) -> tuple[int, int]:
    client = aioredis.Redis.from_url(url)
    try:
        return await state_of(RedisQuotaStore(client, tz=UTC))
    finally:
        await client.aclose()
