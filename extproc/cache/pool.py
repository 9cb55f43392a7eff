"""Embeddings off the event loop, in a bounded pool that refuses instead of queueing, in shared batches.

An embedding is milliseconds of BLAS work; done on the event loop it would
stall every other exchange of this process. It runs in worker threads (numpy
releases the GIL in its matrix products). The pool admits at most ``limit``
embeddings at once, running or waiting: a request that finds it full is not
delayed, its lookup is skipped (``Saturated`` -> ``bypass``, counted). One
whose embedding is not done within the lookup budget stops waiting
(``TimeoutError`` -> ``bypass``); the embedding still finishes in its thread
and keeps its slot until then, so the bound holds.

Why batches: a short prompt's forward pass streams all ~42 MB of the model's
weights through the core for a few dozen rows of activations; texts that
arrive while a pass runs are embedded together in the next one, which reads
the weights once for all of them (measured in tests/bench/cache.md: four
prompts in one pass cost well under four passes). Nothing waits for a batch
to fill: a text that finds a worker free starts at once, alone, so a quiet
gateway pays no added latency.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

MAX_BATCH = 16  # texts in one forward pass; with the default limit (4) a batch never reaches it


class Saturated(Exception):
    """Every slot of the pool is taken."""


class TextEmbedder(Protocol):
    def embed(self, texts: list[str]) -> np.ndarray: ...


Waiter = tuple[str, "asyncio.Future[tuple[np.ndarray, float]]"]


class EmbedPool:
    def __init__(self, embedder: TextEmbedder, *, workers: int = 1, limit: int = 4,
                 max_batch: int = MAX_BATCH) -> None:
        self.embedder = embedder
        self.workers = workers
        self.limit = max(limit, workers)
        self.max_batch = max_batch
        self.busy = 0  # admitted texts, waiting or in a running pass
        self.passes = 0  # forward passes run (the specs and the bench read it)
        self._waiting: list[Waiter] = []
        self._running = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tollgate-embed")

    def _run(self, texts: list[str]) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        vectors = self.embedder.embed(texts)
        return vectors, time.perf_counter() - started

    async def embed(self, text: str, timeout: float | None) -> tuple[np.ndarray, float]:
        """(unit vector, seconds its forward pass took); Saturated or TimeoutError instead of waiting."""
        if self.busy >= self.limit:
            raise Saturated()
        self.busy += 1
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[np.ndarray, float]] = loop.create_future()
        self._waiting.append((text, fut))
        self._start(loop)
        if timeout is None:
            return await fut
        done, _ = await asyncio.wait({fut}, timeout=timeout)
        if not done:
            raise TimeoutError()
        return fut.result()

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand what waits to free workers, in batches (on the loop: no lock needed)."""
        while self._running < self.workers and self._waiting:
            batch: list[Waiter] = []
            while self._waiting and len(batch) < self.max_batch:
                item = self._waiting.pop(0)
                if item[1].done():  # its caller was cancelled before its turn: free the slot now
                    self.busy -= 1
                else:
                    batch.append(item)
            if not batch:
                return
            self._running += 1
            self.passes += 1
            work = loop.run_in_executor(self._executor, self._run, [t for t, _ in batch])
            work.add_done_callback(lambda w, b=batch: self._finished(loop, b, w))  # type: ignore[misc]

    def _finished(self, loop: asyncio.AbstractEventLoop, batch: list[Waiter],
                  work: asyncio.Future[tuple[np.ndarray, float]]) -> None:
        self._running -= 1
        self.busy -= len(batch)
        error = None if work.cancelled() else work.exception()
        for i, (_, fut) in enumerate(batch):
            if fut.done():
                continue  # a caller that stopped waiting
            if work.cancelled():  # the pool was closed
                fut.cancel()
            elif error is not None:
                fut.set_exception(error)
            else:
                vectors, seconds = work.result()
                fut.set_result((vectors[i], seconds))
        if not loop.is_closed():
            self._start(loop)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
