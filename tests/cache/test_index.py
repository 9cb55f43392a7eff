"""The local index: a grown partition leaves the flat scan for IVF without losing or reviving entries."""

from __future__ import annotations

import asyncio

import numpy as np

from extproc.cache.entry import Answer
from extproc.cache.index import IVF_FROM, LocalIndex
from extproc.cache.keys import Plan, plan
from extproc.cache.semantic import SemanticCache
from extproc.cache.store import MemoryCacheStore


def unit_vectors(n: int, seed: int = 3) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def near(v: np.ndarray, seed: int) -> np.ndarray:
    """A vector at cosine ~0.95 from v: what a paraphrase looks like."""
    noise = np.random.default_rng(seed).normal(size=384).astype(np.float32)
    q = v + 0.017 * noise
    return q / np.linalg.norm(q)


def test_a_partition_that_reaches_ivf_from_is_promoted_and_still_finds_each_nearest_entry() -> None:
    vectors = unit_vectors(IVF_FROM + 10)
    index = LocalIndex()
    index.add_many([(f"e{i}", "team|alias|ctx", f"prompt {i}", v, 2e9) for i, v in enumerate(vectors)])
    assert index.wanted() == ["team|alias|ctx"]
    assert asyncio.run(index.rebuild("team|alias|ctx")) is True
    assert index.wanted() == [] and index.rebuilds == 1
    found = sum(index.search("team|alias|ctx", near(vectors[i], i), 1)[0].entry_id == f"e{i}" for i in range(200))
    assert found == 200


def test_entries_added_or_removed_while_the_ivf_is_built_are_carried_over() -> None:
    vectors = unit_vectors(IVF_FROM + 2)
    index = LocalIndex()
    scope = "team|alias|ctx"
    index.add_many([(f"e{i}", scope, f"prompt {i}", v, 2e9) for i, v in enumerate(vectors[:IVF_FROM])])

    async def rebuild_while_writing() -> None:
        task = asyncio.create_task(index.rebuild(scope))
        await asyncio.sleep(0)  # the snapshot is taken; the build runs in its thread
        index.remove("e7")
        index.add("late", scope, "a late prompt", vectors[IVF_FROM], 2e9)
        assert await task is True

    asyncio.run(rebuild_while_writing())
    assert index.search(scope, vectors[7], 1)[0].entry_id != "e7"
    assert "e7" not in index and len(index) == IVF_FROM
    assert index.search(scope, vectors[IVF_FROM], 1)[0].entry_id == "late"


def test_an_evicted_entry_is_never_returned_by_an_ivf_partition() -> None:
    vectors = unit_vectors(IVF_FROM)
    index = LocalIndex()
    index.add_many([(f"e{i}", "s", f"prompt {i}", v, 2e9) for i, v in enumerate(vectors)])
    asyncio.run(index.rebuild("s"))
    for i in range(50):
        index.remove(f"e{i}")
    assert all(c.entry_id not in {f"e{i}" for i in range(50)}
               for i in range(50) for c in index.search("s", vectors[i], 4))
    assert index.search("s", vectors[60], 1)[0].entry_id == "e60"


def test_scopes_stay_apart_after_promotion() -> None:
    vectors = unit_vectors(IVF_FROM)
    index = LocalIndex()
    index.add_many([(f"a{i}", "team-a|m|c", f"p{i}", v, 2e9) for i, v in enumerate(vectors)])
    index.add("b0", "team-b|m|c", "p0", vectors[0], 2e9)
    asyncio.run(index.rebuild("team-a|m|c"))
    assert [c.entry_id for c in index.search("team-b|m|c", vectors[0], 4)] == ["b0"]


def test_an_ivf_partition_that_grew_fourfold_is_retrained_from_its_own_vectors() -> None:
    vectors = unit_vectors(4 * IVF_FROM)
    index = LocalIndex()
    index.add_many([(f"e{i}", "s", f"p{i}", v, 2e9) for i, v in enumerate(vectors[:IVF_FROM])])
    asyncio.run(index.rebuild("s"))
    index.add_many([(f"e{i}", "s", f"p{i}", v, 2e9) for i, v in enumerate(vectors) if i >= IVF_FROM])
    assert index.wanted() == ["s"]
    assert asyncio.run(index.rebuild("s")) is True and index.rebuilds == 2
    found = sum(index.search("s", near(vectors[i], i), 1)[0].entry_id == f"e{i}"
                for i in range(0, 4 * IVF_FROM, 80))
    # an approximate search: random vectors (no clusters) are its worst case; real prompts cluster
    assert found >= 0.99 * len(range(0, 4 * IVF_FROM, 80))


def test_the_cache_promotes_a_grown_partition_by_itself_and_answers_alike_before_and_after() -> None:
    vectors = unit_vectors(IVF_FROM + 1)

    def planned(text: str) -> Plan:
        p = plan({"messages": [{"role": "user", "content": text}]}, alias="chat", namespace="team")
        assert isinstance(p, Plan)
        return p

    async def scenario() -> None:
        cache = SemanticCache(MemoryCacheStore())
        for i, v in enumerate(vectors):
            await cache.insert(planned(f"question {i}"), v, Answer(f"answer {i}", "m", 1, 1, 1),
                               ttl=3600, max_entries=10 * IVF_FROM)
        during = await cache.find(planned("question 12, reworded"), near(vectors[12], 12), 0.9)
        await cache.settle()
        after = await cache.find(planned("question 12, reworded"), near(vectors[12], 12), 0.9)
        assert cache.index.rebuilds == 1
        for d in (during, after):
            assert d.result == "hit_semantic" and d.entry is not None and d.entry.answer.content == "answer 12"

    asyncio.run(scenario())
