"""The deny list: kept in Redis or a file, mirrored locally, consulted without a round trip, changed at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from extproc.auth.deny_store import FileDenyStore, RedisDenyStore, StoreUnavailable, new_entry
from extproc.auth.denylist import DenyList, DenyListSync
from extproc.auth.identity import Identity
from extproc.errors import Forbidden, Unauthenticated, Unavailable
from tests.harness import free_port
from tests.quota.redis_process import RedisProcess

ALICE = Identity("alice", "ml", None, "https://idp", "jti-1", 2e9)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisProcess(tmp_path_factory.mktemp("deny-redis")) as r:
        yield r


@pytest.fixture(params=["file", "redis"])
def make_store(request, tmp_path):
    """Stores of one kind; the same specs hold for both."""
    if request.param == "file":
        return lambda: FileDenyStore(str(tmp_path / "state" / "deny.json"))
    server = request.getfixturevalue("redis_server")
    prefix = f"t{time.monotonic_ns()}"  # a fresh key space per test
    return lambda: RedisDenyStore(server.url, prefix=prefix)


async def test_entries_are_added_listed_and_removed_and_each_change_moves_the_version(make_store):
    store = make_store()
    v0 = await store.version()
    await store.add(new_entry("principal", "mallory", "left the company"))
    await store.add(new_entry("jti", "tok-9"))
    v1 = await store.version()
    listed = {(e.kind, e.value, e.reason) for e in await store.entries()}
    removed, again = await store.remove("principal", "mallory"), await store.remove("principal", "mallory")
    left = [(e.kind, e.value) for e in await store.entries()]
    await store.close()
    assert v0 != v1
    assert listed == {("principal", "mallory", "left the company"), ("jti", "tok-9", "")}
    assert (removed, again, left) == (True, False, [("jti", "tok-9")])


async def test_a_second_sidecar_sees_a_denial_within_a_poll(make_store):
    sidecar, cli = DenyListSync(make_store(), poll_interval=0.05), make_store()
    await sidecar.start()
    assert sidecar.refusal(ALICE, time.time()) is None
    started = time.monotonic()
    await cli.add(new_entry("principal", "alice"))
    while sidecar.refusal(ALICE, time.time()) is None:
        await asyncio.sleep(0.01)
    took = time.monotonic() - started
    await cli.remove("principal", "alice")
    await asyncio.sleep(0.2)
    lifted = sidecar.refusal(ALICE, time.time()) is None
    await sidecar.close()
    await cli.close()
    assert took < 0.5 and lifted


def test_a_denied_principal_gets_403_and_a_revoked_token_401():
    snapshot = DenyList([new_entry("principal", "alice")])
    assert isinstance(snapshot.refusal(ALICE, time.time()), Forbidden)
    snapshot = DenyList([new_entry("jti", "jti-1")])
    err = snapshot.refusal(ALICE, time.time())
    assert isinstance(err, Unauthenticated) and err.code == "token_revoked"
    assert DenyList([new_entry("jti", "other")]).refusal(ALICE, time.time()) is None


def test_a_timed_denial_lapses_by_itself():
    snapshot = DenyList([new_entry("principal", "alice", duration=60)])
    assert snapshot.refusal(ALICE, time.time()) is not None
    assert snapshot.refusal(ALICE, time.time() + 61) is None


async def test_with_redis_down_the_last_known_list_keeps_applying(redis_server):
    prefix = f"t{time.monotonic_ns()}"
    store = RedisDenyStore(redis_server.url, prefix=prefix)
    await store.add(new_entry("principal", "alice"))
    sync = DenyListSync(RedisDenyStore(redis_server.url, prefix=prefix), poll_interval=0.05)
    await sync.start()
    sync.store = RedisDenyStore(f"redis://127.0.0.1:{free_port()}/0")  # the same sidecar, its Redis gone
    ok = await sync.sync()
    still = sync.refusal(ALICE, time.time())
    await sync.close()
    await store.close()
    assert ok is False and isinstance(still, Forbidden)


async def test_with_policy_refuse_an_unreachable_store_fails_closed_with_503():
    sync = DenyListSync(RedisDenyStore(f"redis://127.0.0.1:{free_port()}/0"), poll_interval=0.05,
                        refuse_when_stale=True)
    await sync.start()
    err = sync.refusal(ALICE, time.time())
    await sync.close()
    assert isinstance(err, Unavailable) and err.code == "deny_list_unavailable"


async def test_an_unreachable_redis_is_reported_as_such_to_the_cli():
    store = RedisDenyStore(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(StoreUnavailable, match="redis"):
            await store.add(new_entry("principal", "alice"))
    finally:
        await store.close()
