"""Embeddings off the event loop, in a bounded pool that refuses instead of queueing.

An embedding is milliseconds of BLAS work; done on the event loop it would
stall every other exchange of this process. It runs in worker threads (numpy
releases the GIL in its matrix products). The pool admits at most ``limit``
embeddings at once, running or waiting: a request that finds it full is not
delayed, its lookup is skipped (``Saturated`` -> ``bypass``, counted). One
whose embedding is not done within the lookup budget stops waiting
(``TimeoutError`` -> ``bypass``); the embedding still finishes in its thread
and keeps its slot until then, so the bound holds.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from extproc.cache.embedder import Embedder


class Saturated(Exception):
    """Every slot of the pool is taken."""


class EmbedPool:
    def __init__(self, embedder: Embedder, *, workers: int = 1, limit: int = 4) -> None:
        self.embedder = embedder
        self.limit = max(limit, workers)
        self.busy = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tollgate-embed")

    def _run(self, text: str) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        vec = self.embedder.embed_one(text)
        return vec, time.perf_counter() - started

    def _done(self, _fut: object) -> None:
        self.busy -= 1

    async def embed(self, text: str, timeout: float | None) -> tuple[np.ndarray, float]:
        """(unit vector, seconds the forward pass took); Saturated or TimeoutError instead of waiting."""
        if self.busy >= self.limit:
            raise Saturated()
        self.busy += 1
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, self._run, text)
        fut.add_done_callback(self._done)
        if timeout is None:
            return await fut
        done, _ = await asyncio.wait({fut}, timeout=timeout)
        if not done:
            raise TimeoutError()
        return fut.result()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
