"""This sidecar's FAISS index of cached prompts, one partition per scope.

Only prompts of the same scope (namespace, alias, context hash) may be
compared, so each scope has its own index over unit vectors (inner product =
cosine): a search never looks at, and can never return, another team's or
another conversation's entry.

A partition starts as an exact ``IndexFlatIP``: below a few thousand entries
a flat scan costs well under a millisecond, loses nothing to approximation and
supports removal. A flat scan grows with the partition (25 ms at 100k entries
on a busy core), so a partition that reaches ``IVF_FROM`` entries is promoted
to an inverted-file index (``IndexIVFFlat``): k-means cells, and a search scans
only the ``NPROBE`` cells nearest the query. IVF was chosen over HNSW because
its adds are cheap (one nearest-centroid lookup), which keeps a sidecar's
rebuild of 100k entries from Redis within seconds, and because it supports
``remove_ids``, so eviction needs no tombstones. The k-means training and the
re-adding of every vector run in a worker thread (FAISS releases the GIL),
never on the event loop; entries added or removed meanwhile are carried over
when the new index is swapped in. A partition is retrained when it has grown
``RETRAIN_GROWTH`` times past the size it was trained at.

The guard features of a stored prompt are computed the first time it is a
candidate, not when it is added, so rebuilding 100k entries costs FAISS adds,
not 100k regex passes.

The index holds no answers: a candidate's answer is read from the store, which
is the authority (an entry gone from it - expired, evicted, cleared - is
dropped here when a search meets it).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

from extproc.cache.embedder import DIMENSION
from extproc.cache.guards import Features, features
from extproc.cache.keys import scope_parts


@dataclass(slots=True)
class _Meta:
    entry_id: str
    prompt: str
    expires: float
    features: Features | None = None  # computed when first needed


@dataclass(slots=True)
class Candidate:
    similarity: float
    meta: _Meta

    @property
    def entry_id(self) -> str:
        return self.meta.entry_id

    @property
    def expires(self) -> float:
        return self.meta.expires

    @property
    def features(self) -> Features:
        """The stored prompt's guard features, computed once, when a candidate is first checked."""
        m = self.meta
        if m.features is None:
            m.features = features(m.prompt)
        return m.features


IVF_FROM = 4096  # entries at which a partition leaves the exact flat scan for IVF
RETRAIN_GROWTH = 4  # an IVF partition is retrained when it holds this many times what it was trained on
NPROBE = 16  # IVF cells scanned per search; measured recall of the nearest entry in tests/bench/cache.md
TRAIN_PER_CELL = 40  # k-means sample size per cell (FAISS's own floor is 39)


def _cells(n: int) -> int:
    """IVF cells for n vectors: about 2 sqrt(n) (a cell holds tens to hundreds of vectors), at least 64,
    and few enough that k-means has its TRAIN_PER_CELL points per cell."""
    return max(64, min(4096, int(2 * math.sqrt(n)), n // TRAIN_PER_CELL))


def _flat() -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(DIMENSION))


@dataclass
class _Partition:
    index: faiss.Index = field(default_factory=_flat)
    meta: dict[int, _Meta] = field(default_factory=dict)
    trained_at: int = 0  # entries the IVF was trained on; 0 while flat
    rebuilding: bool = False

    def wants_rebuild(self) -> bool:
        if self.rebuilding:
            return False
        if self.trained_at == 0:
            return len(self.meta) >= IVF_FROM
        return len(self.meta) >= RETRAIN_GROWTH * self.trained_at


def _build_ivf(vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """k-means cells over a sample, then every vector added: seconds at 100k, so run in a worker thread.

    The IVF keeps our ids itself (no ID map around it: ``IndexIDMap`` renumbers on removal, which an IVF
    does not), and a hash-table direct map lets it remove and reconstruct by id.
    """
    cells = _cells(len(vectors))
    quantizer = faiss.IndexFlatIP(DIMENSION)
    ivf = faiss.IndexIVFFlat(quantizer, DIMENSION, cells, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.niter = 10
    ivf.cp.max_points_per_centroid = TRAIN_PER_CELL
    rng = np.random.default_rng(0)
    sample = vectors if len(vectors) <= cells * TRAIN_PER_CELL else vectors[
        rng.choice(len(vectors), cells * TRAIN_PER_CELL, replace=False)]
    ivf.train(sample)
    ivf.nprobe = NPROBE
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]  # SWIG-made
    ivf.add_with_ids(vectors, ids)
    return ivf


class LocalIndex:
    def __init__(self) -> None:
        faiss.omp_set_num_threads(1)  # searches run on the event loop; OpenMP's spinning threads would steal its core
        self._parts: dict[str, _Partition] = {}
        self._where: dict[str, tuple[str, int]] = {}  # entry id -> (scope, faiss id)
        self._next = 1
        self.rebuilds = 0  # partitions promoted or retrained (for the bench and the specs)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._where

    def add(self, entry_id: str, scope: str, prompt: str, vector: np.ndarray, expires: float) -> None:
        if entry_id in self._where:
            return
        part = self._parts.get(scope)
        if part is None:
            part = self._parts[scope] = _Partition()
        fid = self._next
        self._next += 1
        part.index.add_with_ids(vector.reshape(1, DIMENSION).astype(np.float32), np.array([fid], dtype=np.int64))
        part.meta[fid] = _Meta(entry_id, prompt, expires)
        self._where[entry_id] = (scope, fid)

    def add_many(self, rows: Sequence[tuple[str, str, str, np.ndarray, float]]) -> None:
        """Rebuild path: (entry id, scope, prompt, vector, expires) rows, added per scope in one call each."""
        by_scope: dict[str, list[tuple[str, str, np.ndarray, float]]] = {}
        for entry_id, scope, prompt, vector, expires in rows:
            if entry_id not in self._where:
                by_scope.setdefault(scope, []).append((entry_id, prompt, vector, expires))
        for scope, items in by_scope.items():
            part = self._parts.get(scope)
            if part is None:
                part = self._parts[scope] = _Partition()
            ids = np.arange(self._next, self._next + len(items), dtype=np.int64)
            self._next += len(items)
            part.index.add_with_ids(np.stack([v for _, _, v, _ in items]).astype(np.float32), ids)
            for fid, (entry_id, prompt, _, expires) in zip(ids.tolist(), items):
                part.meta[fid] = _Meta(entry_id, prompt, expires)
                self._where[entry_id] = (scope, fid)

    def search(self, scope: str, vector: np.ndarray, k: int = 4) -> list[Candidate]:
        part = self._parts.get(scope)
        if part is None or part.index.ntotal == 0:
            return []
        sims, ids = part.index.search(vector.reshape(1, DIMENSION).astype(np.float32), min(k, part.index.ntotal))
        out = []
        for sim, fid in zip(sims[0].tolist(), ids[0].tolist()):
            if fid < 0:
                continue
            out.append(Candidate(float(sim), part.meta[fid]))
        return out

    def wanted(self) -> list[str]:
        """Scopes whose partition should be promoted to IVF or retrained."""
        return [scope for scope, part in self._parts.items() if part.wants_rebuild()]

    async def rebuild(self, scope: str) -> bool:
        """Promote or retrain one partition: snapshot on the loop, build in a thread, swap on the loop."""
        part = self._parts.get(scope)
        if part is None or not part.wants_rebuild():
            return False
        part.rebuilding = True
        try:
            ids = np.fromiter(part.meta.keys(), dtype=np.int64, count=len(part.meta))
            vectors = part.index.reconstruct_batch(ids)  # type: ignore[arg-type]  # SWIG converts
            built = await asyncio.to_thread(_build_ivf, vectors, ids)
            if self._parts.get(scope) is not part:  # the scope was dropped meanwhile
                return False
            snapshot = set(ids.tolist())
            added = np.array([f for f in part.meta if f not in snapshot], dtype=np.int64)
            if len(added):
                built.add_with_ids(part.index.reconstruct_batch(added), added)  # type: ignore[arg-type]
            removed = np.array([f for f in snapshot if f not in part.meta], dtype=np.int64)
            if len(removed):
                built.remove_ids(removed)  # type: ignore[arg-type]
            part.index = built
            part.trained_at = len(ids)
            self.rebuilds += 1
            return True
        finally:
            part.rebuilding = False

    def remove(self, entry_id: str) -> None:
        where = self._where.pop(entry_id, None)
        if where is None:
            return
        scope, fid = where
        part = self._parts[scope]
        part.index.remove_ids(np.array([fid], dtype=np.int64))  # type: ignore[arg-type]  # SWIG converts
        part.meta.pop(fid, None)
        if not part.meta:
            del self._parts[scope]

    def drop(self, namespace: str, alias: str | None = None) -> int:
        """Forget a namespace (or one alias of it); how many entries went."""
        gone = 0
        for scope in list(self._parts):
            ns, a = scope_parts(scope)
            if ns == namespace and (alias is None or a == alias):
                part = self._parts.pop(scope)
                for m in part.meta.values():
                    self._where.pop(m.entry_id, None)
                gone += len(part.meta)
        return gone

    def counts(self) -> dict[str, int]:
        """Entries per namespace."""
        out: dict[str, int] = {}
        for scope, part in self._parts.items():
            ns, _ = scope_parts(scope)
            out[ns] = out.get(ns, 0) + len(part.meta)
        return out
