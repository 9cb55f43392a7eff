"""Fixtures for the cache specs: one embedder for the session, a real redis-server, stores over both backends.

``async def`` tests run on a fresh event loop per test (``runner``), as in the quota specs.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from extproc.cache.embedder import Embedder
from extproc.cache.redis_store import RedisCacheStore
from extproc.cache.store import CacheStore, MemoryCacheStore
from tests.quota.redis_process import RedisProcess

FIXTURES = Path(__file__).parent / "fixtures"
ADVERSARIAL = Path(__file__).parent / "adversarial_pairs.jsonl"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    runner: asyncio.Runner = pyfuncitem.funcargs["runner"]
    names = pyfuncitem._fixtureinfo.argnames
    runner.run(pyfuncitem.obj(**{n: pyfuncitem.funcargs[n] for n in names}))
    return True


@pytest.fixture(autouse=True)
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path_factory.mktemp("redis")) as r:
        yield r


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


StoreFactory = Callable[[Clock], CacheStore]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest, runner: asyncio.Runner) -> Iterator[StoreFactory]:
    """Stores of one kind; Redis ones share one server and key prefix, as sidecars do (flushed per test)."""
    made: list[CacheStore] = []
    if request.param == "redis":
        server: RedisProcess = request.getfixturevalue("redis_server")
        runner.run(_flush(server.url))

        def make(clock: Clock) -> CacheStore:
            s = RedisCacheStore(aioredis.Redis.from_url(server.url), prefix="t", clock=clock)
            made.append(s)
            return s
    else:
        shared: dict[str, MemoryCacheStore] = {}

        def make(clock: Clock) -> CacheStore:
            return shared.setdefault("one", MemoryCacheStore(clock))  # one process: one store
    yield make
    for s in made:
        runner.run(s.close())


async def _flush(url: str) -> None:
    c = aioredis.Redis.from_url(url)
    try:
        await c.flushall()
    finally:
        await c.aclose()
