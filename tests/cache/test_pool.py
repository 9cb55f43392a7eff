"""The embedding pool refuses instead of queueing, and never makes a caller wait past its budget."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from extproc.cache.pool import EmbedPool, Saturated


class SlowEmbedder:
    """A real object standing in for the model: takes ``seconds`` per text, until released."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.release = threading.Event()
        self.batches: list[list[str]] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        self.release.wait(self.seconds)
        return np.stack([np.full(384, len(t), dtype=np.float32) for t in texts])


async def test_a_full_pool_refuses_at_once_and_takes_work_again_when_a_slot_frees():
    slow = SlowEmbedder(5.0)
    pool = EmbedPool(slow, workers=1, limit=2)  # type: ignore[arg-type]
    first = asyncio.ensure_future(pool.embed("a", timeout=None))
    second = asyncio.ensure_future(pool.embed("b", timeout=None))
    await asyncio.sleep(0)
    started = time.perf_counter()
    with pytest.raises(Saturated):
        await pool.embed("c", timeout=None)
    assert time.perf_counter() - started < 0.01
    slow.release.set()
    await asyncio.gather(first, second)
    vec, seconds = await pool.embed("d", timeout=1.0)
    assert vec.shape == (384,) and seconds >= 0
    pool.close()


async def test_a_caller_stops_waiting_at_its_budget_and_the_slot_stays_taken_until_the_work_ends():
    slow = SlowEmbedder(0.3)
    pool = EmbedPool(slow, workers=1, limit=1)  # type: ignore[arg-type]
    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        await pool.embed("a", timeout=0.02)
    assert time.perf_counter() - started < 0.1
    with pytest.raises(Saturated):  # the first one still runs: the bound holds
        await pool.embed("b", timeout=0.02)
    await asyncio.sleep(0.4)
    assert (await pool.embed("c", timeout=1.0))[0].shape == (384,)
    pool.close()


async def test_texts_that_arrive_while_a_pass_runs_share_the_next_pass_and_each_gets_its_own_vector():
    slow = SlowEmbedder(5.0)
    pool = EmbedPool(slow, workers=1, limit=8)  # type: ignore[arg-type]
    first = asyncio.ensure_future(pool.embed("a", timeout=None))
    await asyncio.sleep(0.05)  # the first pass has started, alone: nothing waits for a batch to fill
    later = [asyncio.ensure_future(pool.embed("b" * n, timeout=None)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    slow.release.set()
    vectors = [v for v, _ in await asyncio.gather(first, *later)]
    assert slow.batches == [["a"], ["bb", "bbb", "bbbb"]] and pool.passes == 2
    assert [int(v[0]) for v in vectors] == [1, 2, 3, 4]  # each caller its own text's vector
    assert pool.busy == 0
    pool.close()


async def test_a_caller_cancelled_before_its_turn_frees_its_slot_and_is_not_embedded():
    slow = SlowEmbedder(5.0)
    pool = EmbedPool(slow, workers=1, limit=2)  # type: ignore[arg-type]
    first = asyncio.ensure_future(pool.embed("a", timeout=None))
    await asyncio.sleep(0.05)
    gone = asyncio.ensure_future(pool.embed("never", timeout=None))
    await asyncio.sleep(0)
    gone.cancel()
    slow.release.set()
    await first
    assert (await pool.embed("c", timeout=1.0))[0][0] == 1
    assert ["never"] not in slow.batches and pool.busy == 0
    pool.close()


async def test_an_embedder_error_reaches_every_caller_of_its_pass():
    class Broken:
        def embed(self, texts: list[str]) -> np.ndarray:
            raise RuntimeError("no weights")

    pool = EmbedPool(Broken(), workers=1, limit=2)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="no weights"):
        await pool.embed("a", timeout=1.0)
    assert pool.busy == 0
    pool.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TimedEmbedder:
    """Says each pass took ``seconds`` (its measured time is what the pool charges)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def embed(self, texts: list[str]) -> np.ndarray:
        time.sleep(self.seconds)
        return np.ones((len(texts), 384), dtype=np.float32)


async def test_embeddings_use_at_most_their_share_of_a_core_then_lookups_bypass_until_it_refills():
    clock = Clock()
    pool = EmbedPool(TimedEmbedder(0.06), workers=1, limit=4, cpu_share=0.25, clock=clock)  # type: ignore[arg-type]
    await pool.embed("a", timeout=None)  # 0.1 s of burst, 0.06 used
    await pool.embed("b", timeout=None)  # 0.04 left: admitted, and now overdrawn
    with pytest.raises(Saturated) as refused:
        await pool.embed("c", timeout=None)
    assert refused.value.reason == "cpu_budget"
    clock.now += 0.5  # a quarter of a core for half a second: 0.125 s more, capped at the burst
    assert (await pool.embed("d", timeout=None))[0].shape == (384,)
    pool.rested()
    assert (await pool.embed("e", timeout=None))[0].shape == (384,)
    pool.close()


async def test_without_a_share_only_the_slots_bound_the_pool():
    pool = EmbedPool(TimedEmbedder(0.06), workers=1, limit=4)  # type: ignore[arg-type]
    for t in "abc":
        await pool.embed(t, timeout=None)
    pool.close()
