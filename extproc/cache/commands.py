"""``tollgate cache stats | clear | score``: look at, empty, and tune the response cache."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from extproc.cache.build import open_store
from extproc.cache.control import ControlError, ask_all
from extproc.cache.embedder import Embedder
from extproc.cache.score import read_pairs, run, tallies
from extproc.cache.settings import DEFAULT_THRESHOLD
from extproc.config import GatewayConfig, environment
from extproc.credentials.secrets import redis_password


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("cache", help="the response cache: entries per namespace, clear, score labelled pairs")
    csub = p.add_subparsers(dest="cache_command", required=True)
    stats = csub.add_parser("stats", help="live entries per namespace (from Redis, or "
                                                   "from the running gateways)")
    stats.add_argument("--config")  # without redis: summed over the running gateway processes
    stats.add_argument("--namespace", help="only this namespace (a team, or shared)")
    clear = csub.add_parser("clear", help="remove a namespace's entries (or one alias's) on every sidecar")
    clear.add_argument("--config")
    clear.add_argument("--namespace", required=True)
    clear.add_argument("--alias")
    score = csub.add_parser("score", help="run the cache's decision on labelled pairs: precision, recall, "
                                          "false-hit rate")
    score.add_argument("--config")
    score.add_argument("--pairs", required=True, help='JSON lines {"a": ..., "b": ..., "label": 0|1}; - for stdin')
    score.add_argument("--alias", help="use this alias's cache settings (default: the section's own)")
    score.add_argument("--threshold", type=float, help="override the configured threshold (for tuning)")
    score.add_argument("--json", action="store_true", help="one JSON object per pair on stdout, summary on stderr")


def cache_command(cfg: GatewayConfig, args: argparse.Namespace) -> int:
    if args.cache_command == "score":
        return _score(cfg, args)
    c = cfg.cache
    if c is None:
        print(f"tollgate: {cfg.source} has no cache: section", file=sys.stderr)
        return 2
    if c.store != "redis":
        return _local(c, args)
    password = redis_password(cfg.redis, environment())
    try:
        return asyncio.run(_stats(c, password, args) if args.cache_command == "stats" else _clear(c, password, args))
    except Exception as e:  # noqa: BLE001 - redis-py's errors: Redis is down or refuses
        print(f"tollgate: the cache store cannot be reached: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


async def _stats(c: Any, password: str | None, args: argparse.Namespace) -> int:
    store = open_store(c, password)
    try:
        counts = await store.counts()
    finally:
        await store.close()
    _print_counts(counts, args.namespace)
    return 0


async def _clear(c: Any, password: str | None, args: argparse.Namespace) -> int:
    store = open_store(c, password)
    try:
        gone = await store.clear(args.namespace, args.alias)
    finally:
        await store.close()
    what = f"namespace {args.namespace}" + (f", alias {args.alias}" if args.alias else "")
    print(f"removed {gone} entries of {what}")
    return 0


def _local(c: Any, args: argparse.Namespace) -> int:
    """Without Redis: ask every running gateway process through its control socket (``control.py``)."""
    if args.cache_command == "stats":
        request: dict[str, Any] = {"op": "stats"}
    else:
        request = {"op": "clear", "namespace": args.namespace, "alias": args.alias}
    try:
        replies = asyncio.run(ask_all(c.control_dir, request))
    except ControlError as e:
        print(f"tollgate: {e} (is the gateway running with this config?)", file=sys.stderr)
        return 1
    for failure in replies.failed:
        print(f"tollgate: a gateway process did not answer: {failure}", file=sys.stderr)
    n = len(replies.answers)
    if args.cache_command == "clear":
        gone = sum(int(a.get("removed", 0)) for a in replies.answers)
        what = f"namespace {args.namespace}" + (f", alias {args.alias}" if args.alias else "")
        print(f"removed {gone} entries of {what} from {n} gateway process{'es' if n != 1 else ''}")
    else:
        counts: dict[str, int] = {}
        for a in replies.answers:
            for ns, k in a.get("counts", {}).items():
                counts[ns] = counts.get(ns, 0) + int(k)
        _print_counts(counts, args.namespace)
    return 1 if replies.failed else 0


def _print_counts(counts: dict[str, int], namespace: str | None) -> None:
    if namespace:
        counts = {namespace: counts.get(namespace, 0)}
    print(f"{'namespace':<32} {'entries':>9}")
    for ns, n in sorted(counts.items()):
        print(f"{ns:<32} {n:>9}")
    if not counts:
        print("no entries")


def _threshold(cfg: GatewayConfig, args: argparse.Namespace) -> tuple[float, bool]:
    """(threshold, semantic?) the live cache would use."""
    if args.threshold is not None:
        return args.threshold, True
    c = cfg.cache
    if c is None:
        return DEFAULT_THRESHOLD, True
    a = c.for_alias(args.alias) if args.alias else None
    if a is not None:
        return a.threshold, a.mode == "semantic"
    return c.threshold, True


def _score(cfg: GatewayConfig, args: argparse.Namespace) -> int:
    if args.alias and args.alias not in cfg.models:
        print(f"tollgate: --alias: no model alias {args.alias!r} in {cfg.source}", file=sys.stderr)
        return 2
    try:
        if args.pairs == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.pairs, encoding="utf-8-sig", errors="replace") as f:  # a BOM is no part of line 1
                lines = f.read().splitlines()
    except OSError as e:
        print(f"tollgate: --pairs: {e}", file=sys.stderr)
        return 2
    pairs = read_pairs(lines)
    for p in pairs:
        if p.error:
            print(f"tollgate: {args.pairs}:{p.line}: {p.error}; scored as bypass", file=sys.stderr)
    threshold, semantic = _threshold(cfg, args)
    started = time.perf_counter()
    backend = cfg.cache.embedder if cfg.cache is not None else "onnxruntime"
    results = run(pairs, Embedder(backend=backend) if semantic else None, threshold=threshold, semantic=semantic)
    seconds = time.perf_counter() - started
    out = sys.stdout
    for pair, d in results:
        rec = {"line": pair.line, "id": pair.id, "label": pair.label, "source": pair.source, "decision": d.result,
               "similarity": round(d.similarity, 4) if d.similarity is not None else None, "reason": d.reason}
        if pair.error:
            rec["error"] = pair.error
        if args.json:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            sim = f"{d.similarity:.4f}" if d.similarity is not None else "-"
            out.write(f"line {pair.line:>6}  label {pair.label if pair.label is not None else '-'}  "
                      f"{d.result:<12} {sim:>7}  {d.reason}\n")
    summary = {name: t.summary() for name, t in tallies(results).items()}
    report = sys.stderr if args.json else sys.stdout
    print(f"threshold {threshold} ({'semantic' if semantic else 'exact only'}); {len(results)} pairs in "
          f"{seconds:.1f} s", file=report)
    for name, s in summary.items():
        print(f"{name:<28} pairs {s['pairs']:>6}  precision {_pct(s['precision'])}  recall {_pct(s['recall'])}  "
              f"false-hit rate {_pct(s['false_hit_rate'])}  ({s['true_hits']} right hits, "
              f"{s['false_hits']} wrong)", file=report)
    return 0


def _pct(v: float | None) -> str:
    return "     -" if v is None else f"{v * 100:5.1f}%"
