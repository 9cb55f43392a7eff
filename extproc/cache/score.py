"""``tollgate cache score``: the live decision, replayed on labelled pairs.

Each pair ``{"a", "b", "label"}`` is scored in a fresh, isolated cache: ``a``
is stored as a user's question, ``b`` is looked up (``SemanticCache.find``,
the data path's own code, with the same planning and guards and the alias's
threshold). Embeddings are computed up front in batches, which is what makes
thousands of pairs take seconds; only the timing budget of the live path does
not apply.

Any line is handled: blank lines are skipped; a line that is not a JSON object
with string ``a`` and ``b`` gets a ``bypass`` decision with an ``error`` (so
outputs stay aligned with inputs) and a message on stderr; a missing or
unreadable label gives a decision but counts in no metric.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from extproc.cache.embedder import Embedder
from extproc.cache.entry import Answer
from extproc.cache.keys import Bypass, Plan, plan
from extproc.cache.semantic import Decision, SemanticCache
from extproc.cache.store import MemoryCacheStore

HITS = ("hit_exact", "hit_semantic")


@dataclass(slots=True)
class Pair:
    line: int
    a: str | None
    b: str | None
    label: int | None
    source: str | None
    id: Any = None
    error: str | None = None


def _label(v: Any) -> int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)) and v in (0, 1):
        return int(v)
    if isinstance(v, str) and v.strip() in ("0", "1", "0.0", "1.0"):
        return int(float(v))
    return None


def read_pairs(lines: Iterable[str]) -> list[Pair]:
    out = []
    for n, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text:
            continue
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            out.append(Pair(n, None, None, None, None, error=f"not JSON ({e.msg})"))
            continue
        except RecursionError:
            out.append(Pair(n, None, None, None, None, error="not JSON (nested too deeply)"))
            continue
        if not isinstance(d, dict):
            out.append(Pair(n, None, None, None, None, error="not a JSON object"))
            continue
        a, b = d.get("a"), d.get("b")
        source = d.get("source") if isinstance(d.get("source"), str) else None
        if not isinstance(a, str) or not isinstance(b, str):
            out.append(Pair(n, None, None, _label(d.get("label")), source, d.get("id"),
                            error='"a" and "b" must be strings'))
            continue
        out.append(Pair(n, a, b, _label(d.get("label")), source, d.get("id")))
    return out


@dataclass(slots=True)
class Tally:
    pairs: int = 0
    labelled: int = 0
    positives: int = 0
    negatives: int = 0
    true_hits: int = 0
    false_hits: int = 0
    decisions: dict[str, int] = field(default_factory=dict)

    def add(self, label: int | None, result: str) -> None:
        self.pairs += 1
        self.decisions[result] = self.decisions.get(result, 0) + 1
        if label is None:
            return
        self.labelled += 1
        hit = result in HITS
        if label == 1:
            self.positives += 1
            self.true_hits += hit
        else:
            self.negatives += 1
            self.false_hits += hit

    def summary(self) -> dict[str, Any]:
        hits = self.true_hits + self.false_hits
        return {
            "pairs": self.pairs, "labelled": self.labelled, "positives": self.positives,
            "negatives": self.negatives, "true_hits": self.true_hits, "false_hits": self.false_hits,
            "precision": round(self.true_hits / hits, 4) if hits else None,
            "recall": round(self.true_hits / self.positives, 4) if self.positives else None,
            "false_hit_rate": round(self.false_hits / self.negatives, 4) if self.negatives else None,
            "decisions": dict(sorted(self.decisions.items())),
        }


_DUMMY = Answer("", "", 0, 0, 0)


async def _decide(p: Plan | Bypass, q: Plan | Bypass, va: np.ndarray | None, vb: np.ndarray | None,
                  threshold: float) -> Decision:
    if isinstance(q, Bypass):
        return Decision("bypass", None, q.reason)
    cache = SemanticCache(MemoryCacheStore())  # fresh and isolated for each pair
    if isinstance(p, Plan):
        await cache.insert(p, va, _DUMMY, ttl=3600.0, max_entries=10)
    return await cache.find(q, vb, threshold)


def _body(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


async def score(pairs: list[Pair], embedder: Embedder | None, *, threshold: float, alias: str = "score",
                semantic: bool = True) -> list[tuple[Pair, Decision]]:
    plans = [(plan(_body(p.a), alias=alias, namespace="score") if p.a is not None else Bypass("invalid_line"),
              plan(_body(p.b), alias=alias, namespace="score") if p.b is not None else Bypass("invalid_line"))
             for p in pairs]
    texts: dict[str, int] = {}
    for pa, pb in plans:
        for x in (pa, pb):
            if isinstance(x, Plan):
                texts.setdefault(x.prompt, len(texts))
    vectors = embedder.embed(list(texts), batch=64) if (semantic and embedder is not None and texts) else None

    def vec(x: Plan | Bypass) -> np.ndarray | None:
        return None if vectors is None or not isinstance(x, Plan) else vectors[texts[x.prompt]]

    out = []
    for pair, (pa, pb) in zip(pairs, plans):
        out.append((pair, await _decide(pa, pb, vec(pa), vec(pb), threshold)))
    return out


def run(pairs: list[Pair], embedder: Embedder | None, *, threshold: float, semantic: bool = True
        ) -> list[tuple[Pair, Decision]]:
    return asyncio.run(score(pairs, embedder, threshold=threshold, semantic=semantic))


def tallies(results: list[tuple[Pair, Decision]]) -> dict[str, Tally]:
    out = {"all": Tally()}
    for pair, d in results:
        label = None if pair.error else pair.label  # a line that is no pair counts in no metric
        out["all"].add(label, d.result)
        if pair.source:
            out.setdefault(pair.source, Tally()).add(label, d.result)
    return out
