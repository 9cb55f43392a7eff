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

    def embed_one(self, text: str) -> np.ndarray:
        self.release.wait(self.seconds)
        return np.ones(384, dtype=np.float32)


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
