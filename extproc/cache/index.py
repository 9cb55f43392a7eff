"""This sidecar's FAISS index of cached prompts, one partition per scope.

Only prompts of the same scope (namespace, alias, context hash) may be
compared, so each scope has its own ``IndexFlatIP`` over unit vectors (inner
product = cosine): a search never looks at, and can never return, another
team's or another conversation's entry. Flat indexes are exact (no recall lost
to approximation) and a search over 100k vectors of 384 floats stays within a
few milliseconds on an idle core (``make bench``). The guard features of a
stored prompt are computed the first time it is a candidate, not when it is
added, so rebuilding 100k entries costs FAISS adds, not 100k regex passes.

The index holds no answers: a candidate's answer is read from the store, which
is the authority (an entry gone from it - expired, evicted, cleared - is
dropped here when a search meets it).
"""

from __future__ import annotations

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


@dataclass
class _Partition:
    index: faiss.IndexIDMap2 = field(default_factory=lambda: faiss.IndexIDMap2(faiss.IndexFlatIP(DIMENSION)))
    meta: dict[int, _Meta] = field(default_factory=dict)


class LocalIndex:
    def __init__(self) -> None:
        faiss.omp_set_num_threads(1)  # searches run on the event loop; OpenMP's spinning threads would steal its core
        self._parts: dict[str, _Partition] = {}
        self._where: dict[str, tuple[str, int]] = {}  # entry id -> (scope, faiss id)
        self._next = 1

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
