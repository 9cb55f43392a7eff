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

Why a CPU share: under sustained load the pool is never empty, so without a
bound the embedding thread would take a whole core from Envoy and the gateway
on a small machine (measured: the all-miss gateway at half the throughput of
the gateway without the cache on 2 cores). Embeddings may use ``cpu_share``
of one core, a token bucket of forward-pass seconds refilled at that rate
(with a burst of ``BURST`` s); past it a lookup is a ``bypass``
(``cpu_budget``) until the bucket refills. A quiet gateway never meets it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from typing import Protocol

import numpy as np

MAX_BATCH = 16  # texts in one forward pass; with the default limit (4) a batch never reaches it
BURST = 0.1  # seconds of forward passes the CPU bucket holds: a dozen short prompts at once after a pause


class Saturated(Exception):
    """Every slot of the pool is taken (``saturated``), or embeddings used their share of a core (``cpu_budget``)."""

    def __init__(self, reason: str = "saturated") -> None:
        super().__init__(reason)
        self.reason = reason


class TextEmbedder(Protocol):
    def embed(self, texts: list[str]) -> np.ndarray: ...


Waiter = tuple[str, "asyncio.Future[tuple[np.ndarray, float]]"]


class EmbedPool:
    def __init__(self, embedder: TextEmbedder, *, workers: int = 1, limit: int = 4,
                 max_batch: int = MAX_BATCH, cpu_share: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.embedder = embedder
        self.workers = workers
        self.limit = max(limit, workers)
        self.max_batch = max_batch
        self.busy = 0  # admitted texts, waiting or in a running pass
        self.passes = 0  # forward passes run (the specs and the bench read it)
        self._waiting: list[Waiter] = []
        self._running = 0
        self.cpu_share = cpu_share
        self.clock = clock
        self._tokens = BURST  # seconds of forward passes that may start now
        self._refilled = clock()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tollgate-embed")

    def _run(self, texts: list[str]) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        vectors = self.embedder.embed(texts)
        return vectors, time.perf_counter() - started

    async def embed(self, text: str, timeout: float | None) -> tuple[np.ndarray, float]:
        """(unit vector, seconds its forward pass took); Saturated or TimeoutError instead of waiting."""
        if self.busy >= self.limit:
            raise Saturated()
        if self.cpu_share is not None and self._bucket() <= 0:
            raise Saturated("cpu_budget")
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

    def rested(self) -> None:
        """A full bucket (after the start-up warm-up pass, which no request asked for)."""
        self._tokens, self._refilled = BURST, self.clock()

    def _bucket(self) -> float:
        now = self.clock()
        assert self.cpu_share is not None
        self._tokens = min(BURST, self._tokens + (now - self._refilled) * self.cpu_share)
        self._refilled = now
        return self._tokens

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
        if not work.cancelled() and error is None:
            self._tokens -= work.result()[1]  # the pass's time, charged once for the whole batch
        if not loop.is_closed():
            self._start(loop)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
