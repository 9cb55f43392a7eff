"""Quota costs on their own: check-and-deduct latency per store, and local token counting.

    python -m tests.bench.quota >> tests/bench/results.md

One caller at a time (the latency a request sees, not the store's throughput): reserve over four
scopes (principal, team, org, alias; token buckets and day budgets), then settle, against the
embedded store and a real redis-server on loopback started here; and counting a 2 KB and a 200 KB
prompt with the GPT-4o encoding.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from extproc.quota.calendar import zone
from extproc.quota.limits import Budget, ScopeLimits, TokenBucket
from extproc.quota.memory_store import MemoryQuotaStore, open_embedded
from extproc.quota.redis_store import RedisQuotaStore, connect
from extproc.quota.store import QuotaStore
from extproc.quota.tokenizer import Tokenizer
from tests.quota.redis_process import RedisProcess

USD = 1_000_000
BIG = 10**9
SCOPES = (
    ScopeLimits("principal:alice", TokenBucket(BIG, BIG)),
    ScopeLimits("team:ml", TokenBucket(BIG, BIG), (Budget("day", 10**6 * USD),)),
    ScopeLimits("org", None, (Budget("day", 10**7 * USD), Budget("month", 10**8 * USD))),
    ScopeLimits("alias:gpt-4o", TokenBucket(BIG, BIG)),
)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def store_latency(store: QuotaStore, n: int) -> tuple[list[float], list[float]]:
    reserve, settle = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await store.reserve(SCOPES, 1500, 5000, lease_seconds=600)
        t1 = time.perf_counter()
        await store.settle(r, 1200, 4000)  # type: ignore[arg-type]
        t2 = time.perf_counter()
        reserve.append(t1 - t0)
        settle.append(t2 - t1)
    return reserve, settle


async def store_concurrent(store: QuotaStore, n: int, callers: int) -> tuple[list[float], list[float]]:
    """``callers`` requests at a time: what a reserve waits when its commit is shared with others."""
    reserve: list[float] = []
    settle: list[float] = []

    async def one() -> None:
        t0 = time.perf_counter()
        r = await store.reserve(SCOPES, 1500, 5000, lease_seconds=600)
        t1 = time.perf_counter()
        await store.settle(r, 1200, 4000)  # type: ignore[arg-type]
        reserve.append(t1 - t0)
        settle.append(time.perf_counter() - t1)

    for _ in range(n // callers):
        await asyncio.gather(*(one() for _ in range(callers)))
    return reserve, settle


def counting() -> list[tuple[str, float]]:
    tok = Tokenizer()
    sentence = "The gateway counts tokens locally before it routes the request to a provider. "
    out = []
    for label, size in (("2 KB prompt", 2_000), ("200 KB prompt", 200_000)):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": (sentence * (size // len(sentence) + 1))[:size]}]}
        tok.count_chat("gpt-4o", body)  # load the encoding
        times = []
        for _ in range(20 if size > 10_000 else 200):
            t = time.perf_counter()
            tok.count_chat("gpt-4o", body)
            times.append(time.perf_counter() - t)
        out.append((label, statistics.median(times)))
    return out


async def main() -> str:
    n = 2000
    rows = []
    tz = zone("UTC")
    mem = MemoryQuotaStore(tz=tz)
    await store_latency(mem, 200)
    r, s = await store_latency(mem, n)
    rows.append(("memory only (the fail-open stand-in)", r, s))
    r, s = await store_concurrent(mem, n, 32)
    rows.append(("memory only, 32 callers at once", r, s))
    with tempfile.TemporaryDirectory() as d:
        embedded, _ = open_embedded(str(Path(d) / "quota.sqlite3"), tz=tz)
        await store_latency(embedded, 200)
        r, s = await store_latency(embedded, n)
        rows.append(("embedded (SQLite state file)", r, s))
        r, s = await store_concurrent(embedded, n, 32)
        rows.append(("embedded, 32 callers at once", r, s))
        await embedded.close()
    with tempfile.TemporaryDirectory() as d, RedisProcess(Path(d)) as redis:
        client = connect(redis.url)
        store = RedisQuotaStore(client, tz=tz)
        await store_latency(store, 200)
        r, s = await store_latency(store, n)
        rows.append(("Redis on loopback", r, s))
        await store.close()
    lines = ["", "## Quota check-and-deduct and token counting (`python -m tests.bench.quota`)", "",
             f"One caller, {n} calls each; reserve over 4 scopes (buckets and day/month budgets), then settle.", "",
             "| store | reserve p50 ms | reserve p99 ms | settle p50 ms | settle p99 ms |", "|---|---:|---:|---:|---:|"]
    for name, r, s in rows:
        lines.append(f"| {name} | {pct(r, 50) * 1e3:.3f} | {pct(r, 99) * 1e3:.3f} | "
                     f"{pct(s, 50) * 1e3:.3f} | {pct(s, 99) * 1e3:.3f} |")
    lines += ["", "| counting a chat prompt (gpt-4o encoding) | median ms |", "|---|---:|"]
    for label, t in counting():
        lines.append(f"| {label} | {t * 1e3:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(asyncio.run(main()))
