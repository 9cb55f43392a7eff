"""Every completed request is recorded once and can be summed for chargeback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from extproc.quota.ledger import (
    SQLITE_TRIM_CHUNK, Ledger, RedisLedger, SqliteLedger, UsageRecord, format_totals, parse_since, totals,
)
from extproc.quota.memory_store import open_embedded
from extproc.quota.state_file import CHECKPOINT_COMMITS
from tests.quota.conftest import UTC
from extproc.quota.store import QuotaUnavailable
from tests.quota.redis_process import RedisProcess

LedgerFactory = Callable[[], Ledger]


def record(rid: str, *, team: str = "ml", model: str = "gpt-4o", micro: int = 1_000, principal: str = "alice",
           inp: int = 100, out: int = 10, cached: int = 0) -> UsageRecord:
    return UsageRecord(rid, principal, team, "chat", "openai", model, inp, out, cached, micro, "miss")


@pytest.fixture(params=["embedded", "redis"])
def make_ledger(request: pytest.FixtureRequest, tmp_path: Path, runner: asyncio.Runner) -> Iterator[LedgerFactory]:
    """Ledgers of one kind; the embedded one is the single writer of its state file, so it is shared."""
    if request.param == "redis":
        client = request.getfixturevalue("redis_client")
        yield lambda: RedisLedger(client)
        return
    store, _ = open_embedded(str(tmp_path / "quota.sqlite3"), tz=UTC)
    ledger = SqliteLedger(tmp_path / "quota.sqlite3", writer=store.state_file)
    yield lambda: ledger
    runner.run(store.close())


async def test_records_are_summed_per_model_for_one_team(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger()
    since = time.time() - 1
    await ledger.append(record("r1", model="gpt-4o", micro=2_500, inp=1_000, out=0, cached=200))
    await ledger.append(record("r2", model="gpt-4o", micro=7_500, inp=0, out=750))
    await ledger.append(record("r3", model="claude-sonnet-4-5", micro=18_000))
    await ledger.append(record("r4", team="search", micro=1_000_000))
    by_model = await totals(ledger, since=since, team="ml", by="model")
    assert list(by_model) == ["claude-sonnet-4-5", "gpt-4o"]
    gpt = by_model["gpt-4o"]
    assert (gpt.requests, gpt.input_tokens, gpt.cached_tokens, gpt.output_tokens, gpt.micro_usd) == (
        2, 1_000, 200, 750, 10_000)
    everything = await totals(ledger, since=since)
    assert everything["total"].micro_usd == 2_500 + 7_500 + 18_000 + 1_000_000
    assert (await totals(ledger, since=since, by="team"))["search"].requests == 1
    table = format_totals(by_model, "model")
    assert "gpt-4o" in table and "0.010000" in table and table.splitlines()[-1].startswith("total")


async def test_a_retried_append_is_recorded_once(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger()
    assert await ledger.append(record("same-request"))
    assert not await ledger.append(record("same-request"))
    assert not await make_ledger().append(record("same-request"))  # another sidecar (or a restarted one)
    assert (await totals(ledger, since=0))["total"].requests == 1


async def test_since_and_until_select_by_the_ledgers_time(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger()
    await ledger.append(record("old"))
    cut = time.time() + 0.05
    time.sleep(0.1)
    await ledger.append(record("new"))
    new = [r.request_id async for r in ledger.records(since=cut)]
    old = [r.request_id async for r in ledger.records(since=0, until=cut)]
    assert (new, old) == (["new"], ["old"])
    assert await totals(ledger, since=time.time() + 60) == {}


async def test_a_trim_drops_the_records_older_than_its_cut_and_keeps_the_newer(make_ledger: LedgerFactory) -> None:
    """``quota.ledger.keep``'s step: the embedded ledger drops exactly the older rows; Redis drops whole stream
    nodes (about 100 entries), so fewer than a node's worth of older records may wait for the next trim."""
    ledger = make_ledger()
    for i in range(250):
        await ledger.append(record(f"old-{i}"))
    cut = time.time() + 0.05
    time.sleep(0.1)
    await ledger.append(record("new"))
    dropped = await ledger.trim(cut)
    left = [r.request_id async for r in ledger.records(since=0)]
    assert left[-1] == "new" and dropped + len(left) - 1 == 250
    assert len(left) - 1 < 100 and (len(left) == 1 or isinstance(ledger, RedisLedger))
    assert await ledger.trim(cut - 3600) == 0  # nothing that old is left


async def test_an_embedded_trim_goes_in_chunks_up_to_its_step(tmp_path: Path) -> None:
    """The embedded ledger deletes a long history a chunk at a time, giving the loop back between chunks,
    until the step is reached or nothing older is left."""
    store, _ = open_embedded(str(tmp_path / "quota.sqlite3"), tz=UTC)
    ledger = SqliteLedger(tmp_path / "quota.sqlite3", writer=store.state_file)
    n = 2 * SQLITE_TRIM_CHUNK + 500
    await asyncio.gather(*(ledger.append(record(f"old-{i}")) for i in range(n)))
    others = 0

    async def beside() -> None:  # counts how often the loop ran something else during the trim
        nonlocal others
        while True:
            others += 1
            await asyncio.sleep(0)

    counting = asyncio.ensure_future(beside())
    await asyncio.sleep(0)
    others = 0
    dropped = await ledger.trim(time.time() + 1)
    counting.cancel()
    left = [r async for r in ledger.records(since=0)]
    await store.close()
    assert (dropped, left) == (n, [])
    assert others >= 2  # the loop ran between the three chunks


def test_durations_for_since() -> None:
    assert [parse_since(s) for s in ("90s", "30m", "24h", "7d")] == [90, 1_800, 86_400, 604_800]
    with pytest.raises(ValueError):
        parse_since("yesterday")


async def test_an_embedded_record_is_on_disk_once_append_returns_and_readable_beside_the_writer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "quota.sqlite3"
    store, _ = open_embedded(str(path), tz=UTC)
    assert await SqliteLedger(path, writer=store.state_file).append(record("whole"))
    reader = SqliteLedger(path)  # what `tollgate spend` opens while the gateway runs
    assert [r.request_id async for r in reader.records(since=0)] == ["whole"]
    with pytest.raises(QuotaUnavailable):
        await reader.append(record("not-through-a-reader"))
    await store.close()


async def test_the_wal_is_copied_into_the_state_file_off_the_loop_every_few_hundred_commits(
    tmp_path: Path,
) -> None:
    """SQLite's own checkpoint would run (and fsync) inside the commit that crosses 1,000 WAL pages, on the
    event loop; the writer turns it off and a worker thread checkpoints instead, so the WAL stays bounded."""
    path = tmp_path / "quota.sqlite3"
    store, _ = open_embedded(str(path), tz=UTC)
    writer = store.state_file
    assert writer is not None
    ledger = SqliteLedger(path, writer=writer)
    for n in range(CHECKPOINT_COMMITS):  # one awaited append = one commit
        assert await ledger.append(record(f"r{n}"))
    assert writer.commits == CHECKPOINT_COMMITS
    while writer.checkpointing:
        await asyncio.sleep(0.01)
    # the database file alone (no WAL beside it) holds every record committed before the checkpoint
    alone = tmp_path / "copy" / "quota.sqlite3"
    alone.parent.mkdir()
    alone.write_bytes(path.read_bytes())
    assert len([r async for r in SqliteLedger(alone).records(since=0)]) == CHECKPOINT_COMMITS
    await store.close()
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0  # close() truncates it


async def test_records_survive_a_redis_restart_with_aof(tmp_path: Path) -> None:
    with RedisProcess(tmp_path / "aof", appendonly=True) as server:
        client = aioredis.Redis.from_url(server.url)
        ledger = RedisLedger(client)
        for i in range(50):
            await ledger.append(record(f"r{i}", micro=1_234 + i))
        await client.aclose()

        server.restart()  # SIGTERM, then start again on the same port and directory

        client = aioredis.Redis.from_url(server.url)
        again = RedisLedger(client)
        t = (await totals(again, since=0))["total"]
        assert (t.requests, t.micro_usd) == (50, sum(1_234 + i for i in range(50)))
        assert not await again.append(record("r7"))  # still remembered as recorded
        await client.aclose()
