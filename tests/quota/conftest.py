"""Fixtures for the quota specs: a real redis-server, and stores over both backends.

Every spec here gets the ``runner`` loop (tests/conftest.py runs ``async def``
tests on it), which the fixtures use too, so clients are opened and closed on
the loop that uses them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis

from extproc.quota.memory_store import MemoryQuotaStore, open_embedded
from extproc.quota.redis_store import RedisQuotaStore
from extproc.quota.store import QuotaStore
from tests.quota.redis_process import RedisProcess

UTC = ZoneInfo("UTC")


@pytest.fixture(autouse=True)
def runner() -> Iterator[asyncio.Runner]:
    """Every quota spec shares one loop with its fixtures."""
    with asyncio.Runner() as r:
        yield r


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisProcess, runner: asyncio.Runner) -> Iterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    runner.run(client.flushall())
    yield client
    runner.run(client.aclose())


StoreFactory = Callable[..., QuotaStore]


@pytest.fixture(params=["memory", "embedded", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path, runner: asyncio.Runner) -> Iterator[StoreFactory]:
    """Builds stores of one kind (keyword arguments go to the constructor): in memory only, the
    embedded store on its SQLite file, or a real Redis."""
    if request.param == "memory":
        yield lambda **kw: MemoryQuotaStore(tz=UTC, **kw)
        return
    if request.param == "embedded":
        opened: list[MemoryQuotaStore] = []

        def embedded(**kw: Any) -> QuotaStore:
            store, _ = open_embedded(str(tmp_path / f"quota-{len(opened)}.sqlite3"), tz=UTC, **kw)
            opened.append(store)
            return store

        yield embedded
        for store in opened:
            runner.run(store.close())
        return
    client = request.getfixturevalue("redis_client")
    yield lambda **kw: RedisQuotaStore(client, tz=UTC, **kw)


@pytest.fixture
def store(make_store: StoreFactory) -> QuotaStore:
    """The same specs run against the embedded store and a real Redis."""
    return make_store()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
