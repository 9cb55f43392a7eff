"""A mixed workload against one small budget, for the concurrency specs.

Each client sends plain requests (the worst case reserved up front, then
settled with what was used) and streams (input plus one output slice
reserved, topped up slice by slice while tokens are produced; a refused
top-up ends the stream; some clients walk away early). Prices are simple:
1 micro-dollar per input token, 2 per output token.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import redis.asyncio as aioredis

from extproc.quota.limits import Budget, Rejection, ScopeLimits, TokenBucket
from extproc.quota.redis_store import RedisQuotaStore
from extproc.quota.store import QuotaStore
from tests.quota.conftest import UTC

BUDGET = 300_000  # micro-dollars per day for the team
BURST = 400_000  # tokens; the bucket refills 1 token a minute, so it barely refills during a test
SLICE = 64  # output tokens per stream top-up
SCOPES = (
    ScopeLimits("team:ml", None, (Budget("day", BUDGET),)),
    ScopeLimits("alias:chat", TokenBucket(per_minute=1, burst=BURST)),
    ScopeLimits("org", None, (Budget("month", 10 * BUDGET),)),
)


@dataclass
class Outcome:
    admitted: int = 0
    rejected: int = 0
    cut: int = 0  # streams ended by a refused top-up
    tokens: int = 0  # what was actually used, summed
    micro_usd: int = 0

    def merge(self, other: Outcome) -> None:
        for name in ("admitted", "rejected", "cut", "tokens", "micro_usd"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


async def client(store: QuotaStore, seed: int, requests: int, *, streams: bool) -> Outcome:
    rng, out = random.Random(seed), Outcome()
    for _ in range(requests):
        prompt = rng.choice([rng.randint(10, 200), rng.randint(2_000, 8_000)])
        if streams and rng.random() < 0.5:
            await _stream(store, rng, prompt, out)
        else:
            await _plain(store, rng, prompt, out)
    return out


async def _plain(store: QuotaStore, rng: random.Random, prompt: int, out: Outcome) -> None:
    max_tokens = rng.randint(10, 2_000)
    r = await store.reserve(SCOPES, prompt + max_tokens, prompt + 2 * max_tokens, lease_seconds=60)
    if isinstance(r, Rejection):
        out.rejected += 1
        return
    out.admitted += 1
    await asyncio.sleep(rng.random() * 0.002)
    used = rng.randint(0, max_tokens)
    await store.settle(r, prompt + used, prompt + 2 * used)
    out.tokens += prompt + used
    out.micro_usd += prompt + 2 * used


async def _stream(store: QuotaStore, rng: random.Random, prompt: int, out: Outcome) -> None:
    r = await store.reserve(SCOPES, prompt + SLICE, prompt + 2 * SLICE, lease_seconds=60)
    if isinstance(r, Rejection):
        out.rejected += 1
        return
    out.admitted += 1
    target = rng.randint(0, 3_000)
    if rng.random() < 0.2:
        target = rng.randint(0, target)  # the client disconnects; we bill what was produced
    produced, covered = 0, SLICE
    while produced < target:
        produced += min(rng.randint(1, SLICE), target - produced)  # these tokens have reached the client
        await asyncio.sleep(0)
        if produced > covered:
            grown = await store.top_up(r, SLICE, 2 * SLICE, lease_seconds=60)
            if isinstance(grown, Rejection):
                out.cut += 1
                break
            r, covered = grown, covered + SLICE
    await store.settle(r, prompt + produced, prompt + 2 * produced)
    out.tokens += prompt + produced
    out.micro_usd += prompt + 2 * produced


async def clients(store: QuotaStore, seeds: list[int], requests: int, *, streams: bool) -> Outcome:
    total = Outcome()
    for o in await asyncio.gather(*(client(store, s, requests, streams=streams) for s in seeds)):
        total.merge(o)
    return total


def process_main(url: str, seeds: list[int], requests: int) -> Outcome:
    """One OS process (one sidecar) with its own connection pool and clients."""

    async def main() -> Outcome:
        redis = aioredis.Redis.from_url(url)
        try:
            return await clients(RedisQuotaStore(redis, tz=UTC), seeds, requests, streams=True)
        finally:
            await redis.aclose()

    return asyncio.run(main())
