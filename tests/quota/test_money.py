"""Budgets and the ledger are one book: what a store charges, its ledger records, in the same step.

Run against the embedded store (its SQLite file) and a real Redis: a settlement
writes its record with the budget change; a hold whose lease runs out becomes
an ``unknown`` record of exactly what it charged, and a late settlement
replaces it; a fail-open catch-up (``charge``) counts once, and settles a
hold whose reply was lost instead of leaving it to expire; request buckets
take one per request. The embedded store also comes back after its process
is killed outright, in a real child process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.quota.ledger import Ledger, RedisLedger, SqliteLedger
from extproc.quota.limits import Budget, Rejection, Reservation, ScopeLimits, TokenBucket
from extproc.quota.memory_store import open_embedded
from extproc.quota.records import UsageRecord
from extproc.quota.redis_store import RedisQuotaStore
from extproc.quota.state_file import LAZY_SECONDS, StateFileBusy
from extproc.quota.store import QuotaStore
from tests.quota.conftest import UTC

USD = 1_000_000
TEAM = ScopeLimits("team:ml", TokenBucket(60_000, 60_000), (Budget("day", 50 * USD),))
REPO = Path(__file__).resolve().parents[2]

Books = tuple[QuotaStore, Ledger]


@pytest.fixture(params=["embedded", "redis"])
def books(request: pytest.FixtureRequest, tmp_path: Path, runner: asyncio.Runner) -> Iterator[Books]:
    if request.param == "redis":
        client = request.getfixturevalue("redis_client")
        yield RedisQuotaStore(client, tz=UTC), RedisLedger(client, owns_client=False)
        return
    path = tmp_path / "quota.sqlite3"
    store, _ = open_embedded(str(path), tz=UTC)
    yield store, SqliteLedger(path, writer=store.state_file)
    runner.run(store.close())


def provisional(rid: str, prompt: int = 100) -> UsageRecord:
    return UsageRecord(rid, "alice", "ml", "chat", "", "gpt-4o", prompt, 0, 0, 0, outcome="unknown")


def used(rid: str, inp: int, out: int, micro: int) -> UsageRecord:
    return UsageRecord(rid, "alice", "ml", "chat", "openai", "gpt-4o", inp, out, 0, micro)


def held(r: Reservation | Rejection) -> Reservation:
    assert isinstance(r, Reservation), r
    return r


async def spent(store: QuotaStore) -> int:
    probe = held(await store.reserve([TEAM], 0, 0, lease_seconds=60))
    money = next(s for s in probe.states if s.kind == "money")
    await store.settle(probe, 0, 0)
    return money.limit - money.remaining


async def ledger(books: Books) -> list[UsageRecord]:
    return [r async for r in books[1].records(since=0)]


async def test_a_settlement_writes_its_record_in_the_same_step_as_the_budget(books: Books) -> None:
    store, _ = books
    r = held(await store.reserve([TEAM], 600, 5_000, lease_seconds=60, reservation_id="a", record=provisional("a")))
    await store.settle(r, 130, 1_234, used("a", 100, 30, 1_234))
    found = await ledger(books)
    assert [(x.request_id, x.micro_usd, x.outcome) for x in found] == [("a", 1_234, "complete")]
    assert await spent(store) == 1_234
    await store.settle(r, 130, 1_234, used("a", 100, 30, 1_234))  # a retried settlement changes neither
    assert len(await ledger(books)) == 1 and await spent(store) == 1_234


async def test_an_expired_hold_becomes_an_unknown_record_of_what_it_charged(books: Books) -> None:
    store, _ = books
    await store.reserve([TEAM], 600, 5_000, lease_seconds=1, reservation_id="lost", record=provisional("lost"))
    await asyncio.sleep(1.1)
    assert await store.reap() == 1
    found = await ledger(books)
    assert [(x.request_id, x.input_tokens, x.output_tokens, x.micro_usd, x.outcome) for x in found] == [
        ("lost", 100, 500, 5_000, "unknown")]
    assert await spent(store) == sum(x.micro_usd for x in found) == 5_000


async def test_a_late_settlement_replaces_the_unknown_record(books: Books) -> None:
    store, _ = books
    r = held(await store.reserve([TEAM], 600, 5_000, lease_seconds=1, reservation_id="slow",
                                 record=provisional("slow")))
    await asyncio.sleep(1.1)
    await store.reap()
    settled = await store.settle(r, 150, 1_200, used("slow", 100, 50, 1_200))
    assert settled.outcome == "late"
    found = await ledger(books)
    assert [(x.request_id, x.micro_usd, x.outcome) for x in found] == [("slow", 1_200, "complete")]
    assert await spent(store) == 1_200


async def test_a_fail_open_catch_up_is_charged_and_recorded_once(books: Books) -> None:
    store, _ = books
    for _ in range(3):  # replays after lost replies
        await store.charge([TEAM], 130, 2_000, reservation_id="outage-1", record=used("outage-1", 100, 30, 2_000))
    found = await ledger(books)
    assert [(x.request_id, x.micro_usd) for x in found] == [("outage-1", 2_000)]
    assert await spent(store) == 2_000


async def test_a_catch_up_for_a_hold_whose_reply_was_lost_settles_that_hold_at_what_was_used(books: Books) -> None:
    """A reserve reached the store as it went down and only its reply was lost: the sidecar admitted the
    request locally (fail_open) and charges it afterwards under the same id. The hold is settled at the
    real cost and recorded now, not left to expire into an ``unknown`` record at the held amount."""
    store, _ = books
    await store.reserve([TEAM], 600, 5_000, lease_seconds=60, reservation_id="cut", record=provisional("cut"))
    caught_up = await store.charge([TEAM], 130, 2_000, reservation_id="cut", record=used("cut", 100, 30, 2_000))
    assert (caught_up.outcome, caught_up.micro_usd_delta) == ("settled", 2_000 - 5_000)
    found = await ledger(books)
    assert [(x.request_id, x.micro_usd, x.outcome) for x in found] == [("cut", 2_000, "complete")]
    assert await spent(store) == 2_000
    await store.charge([TEAM], 130, 2_000, reservation_id="cut", record=used("cut", 100, 30, 2_000))
    assert len(await ledger(books)) == 1 and await spent(store) == 2_000


async def test_a_catch_up_after_the_lost_hold_expired_replaces_its_unknown_record(books: Books) -> None:
    store, _ = books
    await store.reserve([TEAM], 600, 5_000, lease_seconds=1, reservation_id="cut", record=provisional("cut"))
    await asyncio.sleep(1.1)
    await store.reap()
    caught_up = await store.charge([TEAM], 130, 2_000, reservation_id="cut", record=used("cut", 100, 30, 2_000))
    assert caught_up.outcome == "late"
    found = await ledger(books)
    assert [(x.request_id, x.micro_usd, x.outcome) for x in found] == [("cut", 2_000, "complete")]
    assert await spent(store) == 2_000


async def test_a_request_bucket_takes_one_per_request_and_gives_nothing_back(books: Books) -> None:
    store, _ = books
    rpm = ScopeLimits("alias:chat", requests=TokenBucket(2, 2))
    first = held(await store.reserve([rpm], 5_000, 0, lease_seconds=60))
    assert [(s.kind, s.limit, s.remaining) for s in first.states] == [("requests", 2, 1)]
    await store.settle(first, 0, 0)  # a settlement returns tokens and money, not the request
    held(await store.reserve([rpm], 1, 0, lease_seconds=60))
    refused = await store.reserve([rpm], 1, 0, lease_seconds=60)
    assert isinstance(refused, Rejection) and (refused.kind, refused.code) == ("requests", "rate_limit_exceeded")
    assert refused.retry_after == 30 and "2 requests per minute" in refused.message()


async def test_the_embedded_budgets_come_back_after_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "quota.sqlite3")
    store, _ = open_embedded(path, tz=UTC)
    r = held(await store.reserve([TEAM], 600, 49 * USD, lease_seconds=60, reservation_id="big"))
    await store.settle(r, 600, 49 * USD, used("big", 500, 100, 49 * USD))
    await store.close()
    again, recovered = open_embedded(path, tz=UTC)
    assert recovered == 0
    refused = await again.reserve([TEAM], 10, 2 * USD, lease_seconds=60)
    assert isinstance(refused, Rejection) and refused.remaining == 1 * USD
    await again.close()


def test_an_embedded_store_killed_with_holds_open_records_them_as_unknown_on_restart(tmp_path: Path) -> None:
    path = tmp_path / "quota.sqlite3"
    child = textwrap.dedent(f"""
        import asyncio, os, signal
        from extproc.quota.limits import Budget, ScopeLimits, TokenBucket
        from extproc.quota.memory_store import open_embedded
        from extproc.quota.records import UsageRecord
        from zoneinfo import ZoneInfo

        async def main():
            store, _ = open_embedded({str(path)!r}, tz=ZoneInfo("UTC"))
            team = ScopeLimits("team:ml", TokenBucket(60_000, 60_000), (Budget("day", 50_000_000),))
            done = await store.reserve([team], 600, 5_000, lease_seconds=600, reservation_id="done",
                                       record=UsageRecord("done", "alice", "ml", "chat", "", "gpt-4o", 100, 0, 0, 0))
            await store.settle(done, 130, 1_000,
                               UsageRecord("done", "alice", "ml", "chat", "openai", "gpt-4o", 100, 30, 0, 1_000))
            await store.reserve([team], 900, 7_000, lease_seconds=600, reservation_id="in-flight",
                                record=UsageRecord("in-flight", "alice", "ml", "chat", "", "gpt-4o", 300, 0, 0, 0))
            os.kill(os.getpid(), signal.SIGKILL)  # the reserve returned: its hold is on disk

        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    async def after() -> None:
        store, recovered = open_embedded(str(path), tz=UTC)
        assert recovered == 1
        found = {x.request_id: x async for x in SqliteLedger(path, writer=store.state_file).records(since=0)}
        # the settled one may have died with the last lazy commit: then it is held, and recovered, as held
        assert found["in-flight"].outcome == "unknown" and found["in-flight"].micro_usd == 7_000
        assert found["in-flight"].output_tokens == 600
        assert await spent(store) == sum(x.micro_usd for x in found.values())
        await store.close()

    asyncio.run(after())
    assert os.path.exists(path)


def test_a_second_gateway_on_the_same_state_file_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = str(tmp_path / "quota.sqlite3")
    first, _ = open_embedded(path, tz=UTC)
    with pytest.raises(StateFileBusy) as caught:
        open_embedded(path, tz=UTC)
    assert "another tollgate process is using the quota state file" in str(caught.value)
    asyncio.run(first.close())
    second, _ = open_embedded(path, tz=UTC)  # free again once the first one closed
    asyncio.run(second.close())


async def test_an_embedded_settlement_nobody_waits_for_is_on_disk_within_the_lazy_delay(tmp_path: Path) -> None:
    """Settlements are committed lazily; the lazy timer outlives the commits made before it fires, so a
    settlement that came after such a commit is written when that timer fires: sooner, never later."""
    path = tmp_path / "quota.sqlite3"
    store, _ = open_embedded(str(path), tz=UTC)
    reader = SqliteLedger(path)  # another connection: sees only what was committed
    a = held(await store.reserve([TEAM], 600, 5_000, lease_seconds=60, reservation_id="a", record=provisional("a")))
    await store.settle(a, 130, 1_234, used("a", 100, 30, 1_234))  # arms the lazy commit
    b = held(await store.reserve([TEAM], 600, 5_000, lease_seconds=60, reservation_id="b", record=provisional("b")))
    assert [r.request_id async for r in reader.records(since=0)] == ["a"]  # b's reserve committed a's record
    await store.settle(b, 10, 99, used("b", 5, 5, 99))  # after that commit: nobody waits for it
    assert [r.request_id async for r in reader.records(since=0)] == ["a"]
    await asyncio.sleep(LAZY_SECONDS)  # a timer set after the lazy one: it fires after the lazy commit
    assert [(r.request_id, r.micro_usd) async for r in reader.records(since=0)] == [("a", 1_234), ("b", 99)]
    await store.close()
