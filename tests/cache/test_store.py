"""One contract, two stores: what the cache keeps, for how long, and how sidecars share it.

Every spec runs against the in-process store and a real redis-server. The
sharing specs build two ``SemanticCache``s on one Redis, as two sidecars are.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from extproc.cache.redis_store import RedisCacheStore

from extproc.cache.entry import Answer
from extproc.cache.keys import Plan, plan
from extproc.cache.semantic import SemanticCache
from tests.cache.conftest import Clock, StoreFactory, _flush

ANSWER = Answer("Open Settings, then Security, then Reset.", "gpt-4o", 12, 9, 120)


def planned(text: str, *, team: str = "ml", alias: str = "chat", system: str | None = None) -> Plan:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    p = plan({"messages": messages}, alias=alias, namespace=team)
    assert isinstance(p, Plan)
    return p


async def test_an_exact_entry_is_found_until_it_expires(make_store: StoreFactory):
    clock = Clock()
    cache = SemanticCache(make_store(clock), clock=clock)
    await cache.insert(planned("How do I reset my password?"), None, ANSWER, ttl=60, max_entries=10)
    d = await cache.find(planned("How do I reset my password?"), None, 0.94)
    assert d.result == "hit_exact" and d.entry is not None and d.entry.answer == ANSWER
    clock.now += 61
    assert (await cache.find(planned("How do I reset my password?"), None, 0.94)).result == "miss"


async def test_a_similar_prompt_is_found_only_above_the_threshold_and_in_its_own_scope(make_store, embedder):
    clock = Clock()
    cache = SemanticCache(make_store(clock), clock=clock)
    stored = planned("How do I reset my password?")
    await cache.insert(stored, embedder.embed_one(stored.prompt), ANSWER, ttl=60, max_entries=10)
    ask = planned("What's the way to reset my password?")
    vec = embedder.embed_one(ask.prompt)
    hit = await cache.find(ask, vec, 0.94)
    assert hit.result == "hit_semantic" and hit.similarity is not None and hit.similarity > 0.94
    assert (await cache.find(ask, vec, 0.99)).reason == "below_threshold"
    for other in (planned(ask.prompt, team="research"), planned(ask.prompt, alias="other"),
                  planned(ask.prompt, system="Answer in French.")):
        assert (await cache.find(other, vec, 0.5)).reason == "no_candidate"


async def test_a_namespace_keeps_at_most_max_entries_evicting_the_oldest(make_store: StoreFactory):
    clock = Clock()
    cache = SemanticCache(make_store(clock), clock=clock)
    for i in range(5):
        clock.now += 1
        await cache.insert(planned(f"question {i}"), None, ANSWER, ttl=600, max_entries=3)
    found = [(await cache.find(planned(f"question {i}"), None, 0.94)).result for i in range(5)]
    assert found == ["miss", "miss", "hit_exact", "hit_exact", "hit_exact"]
    assert (await cache.store.counts()) == {"ml": 3}


async def test_clear_removes_a_namespace_or_one_alias_of_it(make_store: StoreFactory):
    clock = Clock()
    store = make_store(clock)
    cache = SemanticCache(store, clock=clock)
    for team, alias in (("ml", "chat"), ("ml", "other"), ("research", "chat")):
        await cache.insert(planned("q", team=team, alias=alias), None, ANSWER, ttl=600, max_entries=10)
    assert await store.clear("ml", "other") == 1
    assert (await cache.find(planned("q", alias="other"), None, 0.94)).result == "miss"
    assert (await cache.find(planned("q"), None, 0.94)).result == "hit_exact"
    assert await store.clear("ml") == 1
    assert await store.counts() == {"research": 1} or await store.counts() == {"ml": 0, "research": 1}


@pytest.fixture
def redis_only(redis_server, runner) -> Iterator[StoreFactory]:
    """Sharing between sidecars is what the Redis store is for: these specs run on it alone."""
    runner.run(_flush(redis_server.url))
    made: list[RedisCacheStore] = []

    def make(clock: Clock) -> RedisCacheStore:
        made.append(RedisCacheStore(aioredis.Redis.from_url(redis_server.url), prefix="t", clock=clock))
        return made[-1]
    yield make
    for s in made:
        runner.run(s.close())


async def test_an_entry_stored_by_one_sidecar_is_found_by_another_once_it_reads_the_stream(redis_only, embedder):
    clock = Clock()
    one, two = SemanticCache(redis_only(clock), clock=clock), SemanticCache(redis_only(clock), clock=clock)
    stored = planned("How do I reset my password?")
    await one.insert(stored, embedder.embed_one(stored.prompt), ANSWER, ttl=60, max_entries=10)
    ask = planned("What's the way to reset my password?")
    vec = embedder.embed_one(ask.prompt)
    assert (await two.find(ask, vec, 0.94)).result == "miss"  # not yet in two's index
    assert await two.catch_up() == 1
    assert (await two.find(ask, vec, 0.94)).result == "hit_semantic"
    assert await two.catch_up() == 0  # read once


async def test_a_new_sidecar_rebuilds_its_index_and_a_clear_reaches_every_index(redis_only, embedder):
    clock = Clock()
    one = SemanticCache(redis_only(clock), clock=clock)
    texts = [f"How do I configure feature number {i}?" for i in range(3)]
    vecs = embedder.embed(texts)
    for t, v in zip(texts, vecs):
        await one.insert(planned(t), v, ANSWER, ttl=60, max_entries=10)
    fresh = SemanticCache(redis_only(clock), clock=clock)
    await fresh.catch_up()
    assert len(fresh.index) == 3
    await fresh.store.clear("ml")
    await fresh.catch_up()
    assert len(fresh.index) == 0
    assert (await fresh.find(planned(texts[0]), vecs[0], 0.5)).result == "miss"


async def test_an_entry_gone_from_the_store_is_dropped_from_the_index_when_met(redis_only, embedder):
    clock = Clock()
    cache = SemanticCache(redis_only(clock), clock=clock)
    p = planned("How do I reset my password?")
    v = embedder.embed_one(p.prompt)
    await cache.insert(p, v, ANSWER, ttl=60, max_entries=10)
    other = SemanticCache(redis_only(clock), clock=clock)
    await other.store.clear("ml")  # by another sidecar; this one has not read the stream
    d = await cache.find(planned("What's the way to reset my password?"), embedder.embed_one(
        "What's the way to reset my password?"), 0.9)
    assert d.result == "miss" and len(cache.index) == 0


def test_a_vector_survives_the_round_trip_through_redis_bytes():
    from extproc.cache.entry import Entry
    v = np.random.default_rng(1).standard_normal(384).astype(np.float32)
    e = Entry("id1", "ml\x1fchat\x1fabc", "x", "prompt", v, ANSWER, 1.0, 2.0)
    back = Entry.from_fields("id1", {k.encode(): (v2 if isinstance(v2, bytes) else str(v2).encode())
                                     for k, v2 in e.fields().items()})
    assert np.array_equal(back.vector, v) and back.answer == ANSWER and back.expires == 2.0
