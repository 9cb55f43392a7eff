"""The response cache measured: quality, lookup latency, FAISS at 100k, rebuild from Redis, throughput.

    python -m tests.bench.cache --out tests/bench/cache.md [--quick]

1. Quality: ``tollgate cache score``'s decision (the live code) on the dev pairs
   (``../shared/data/paraphrase_dev.jsonl``, read here at run time, never copied) per source, and on
   the adversarial catalogue of the specs, at the shipped threshold and around it.
2. Lookup latency of a short prompt, one at a time: the embedding in the worker pool plus the exact
   and the FAISS lookup and the guards, over 1,000 stored entries of the same scope.
3. FAISS search over 100,000 entries of one scope; memory per entry of the local index.
4. 100,000 entries written to a real redis-server, then a new sidecar's index rebuilt from its
   insert stream; Redis memory per entry.
5. Through Envoy with wrk at concurrency 16, side by side (rotated rounds): the gateway without the
   cache, with it and every request a miss (each prompt new), and with every request an exact hit;
   and a hit's latency at concurrency 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from extproc.cache.embedder import DIMENSION, Embedder
from extproc.cache.entry import Answer, Entry
from extproc.cache.index import NPROBE, LocalIndex
from extproc.cache.keys import Plan, plan
from extproc.cache.pool import EmbedPool
from extproc.cache.redis_store import RedisCacheStore
from extproc.cache.score import read_pairs, score, tallies
from extproc.cache.semantic import SemanticCache
from extproc.cache.settings import DEFAULT_THRESHOLD
from extproc.cache.store import MemoryCacheStore
from tests.bench.run import (
    CLIENT_KEY, KEY_ENV, PLAIN_MODEL, PROVIDER_KEY, ensure_wrk, machine_facts, run_wrk, start_fake, stop_process,
)
from tests.harness import Gateway
from tests.quota.redis_process import RedisProcess

REPO = Path(__file__).resolve().parents[2]
# ../shared beside the checkout (a worktree under wt/ has it two levels up)
DEV = next((p / "shared" / "data" / "paraphrase_dev.jsonl" for p in (REPO.parent, REPO.parent.parent)
            if (p / "shared" / "data" / "paraphrase_dev.jsonl").exists()), REPO.parent / "shared" / "data" / "x")
ADVERSARIAL = REPO / "tests" / "cache" / "adversarial_pairs.jsonl"
ANSWER = Answer("A cached answer of a few words.", "gpt-4o", 20, 8, 130)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Memo:
    """The embedder, each text embedded once across the threshold sweep."""

    def __init__(self, e: Embedder) -> None:
        self.e, self.seen = e, {}

    def embed(self, texts: list[str], batch: int = 32) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.seen]
        if new:
            for t, v in zip(new, self.e.embed(new, batch=batch)):
                self.seen[t] = v
        return np.stack([self.seen[t] for t in texts]) if texts else np.zeros((0, DIMENSION), np.float32)


def quality(embedder: Embedder) -> list[str]:
    memo = Memo(embedder)
    lines = ["## Quality (the live decision, `tollgate cache score`)", "",
             "| pairs | threshold | pairs | precision | recall (label-1 served) | false-hit rate (label-0 served) |",
             "|---|---:|---:|---:|---:|---:|"]
    sets = [("adversarial (tests/cache)", ADVERSARIAL)]
    if DEV.exists():
        sets.insert(0, ("dev", DEV))
    else:
        lines.insert(2, f"({DEV} not found: dev rows skipped)\n")
    started = time.perf_counter()
    for name, path in sets:
        pairs = read_pairs(path.read_text().splitlines())
        for threshold in (0.90, 0.92, DEFAULT_THRESHOLD, 0.96):
            res = asyncio.run(score(pairs, memo, threshold=threshold))  # type: ignore[arg-type]
            for src, t in tallies(res).items():
                s = t.summary()
                mark = " **(shipped)**" if threshold == DEFAULT_THRESHOLD else ""
                lines.append(f"| {name}: {src} | {threshold:.2f}{mark} | {s['pairs']} | {fmt(s['precision'])} | "
                             f"{fmt(s['recall'])} | {fmt(s['false_hit_rate'])} |")
    lines += ["", f"({len(memo.seen)} texts embedded in {time.perf_counter() - started:.1f} s, one embedding "
                  f"thread, {embedder.backend}.)", ""]
    return lines


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f} %"


def planned(text: str) -> Plan:
    p = plan({"messages": [{"role": "user", "content": text}]}, alias="chat", namespace="ml")
    assert isinstance(p, Plan)
    return p


def unit_rows(n: int, seed: int = 7) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIMENSION)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def lookup_latency(embedder: Embedder, n: int) -> list[str]:
    cache = SemanticCache(MemoryCacheStore())
    scope = planned("x").scope
    cache.index.add_many([(f"e{i}", scope, f"stored question number {i}", v, time.time() + 3600)
                          for i, v in enumerate(unit_rows(1000))])
    pool = EmbedPool(embedder, workers=1, limit=4)
    await pool.embed("warm up", timeout=None)
    prompts = ["How do I reset my password?", "What is the capital of France?", "Cancel order 1123 please",
               "Summarise this paragraph in one line."]
    total, embed = [], []
    for i in range(n):
        p = planned(prompts[i % len(prompts)])
        t0 = time.perf_counter()
        d = await cache.find(p, None, DEFAULT_THRESHOLD)
        vec, secs = await pool.embed(p.prompt, timeout=None)
        d = await cache.nearest(p, vec, DEFAULT_THRESHOLD)
        total.append(time.perf_counter() - t0)
        embed.append(secs)
    pool.close()
    assert d.result in ("miss", "hit_semantic")
    lines = ["## Lookup latency, short prompt (6-9 tokens), one at a time", "",
             "| part | p50 ms | p99 ms | goal |", "|---|---:|---:|---|",
             f"| embedding (worker thread) | {pct(embed, 50) * 1e3:.2f} | {pct(embed, 99) * 1e3:.2f} | |",
             f"| whole lookup (exact + embed + FAISS over 1,000 + guards) | {pct(total, 50) * 1e3:.2f} | "
             f"{pct(total, 99) * 1e3:.2f} | p50 <= 10, p99 <= 25 |", ""]
    return lines + await concurrent_lookups(cache, embedder, n)


async def concurrent_lookups(cache: SemanticCache, embedder: Embedder, n: int, c: int = 4) -> list[str]:
    """``c`` lookups at a time through one worker: one forward pass each, then shared passes, in rotated rounds."""
    prompts = ["How do I reset my password?", "What is the capital of France?", "Cancel order 1123 please",
               "Summarise this paragraph in one line.", "Which plan includes phone support?",
               "How long does a refund take?"]
    results: dict[int, tuple[list[float], float, int]] = {1: ([], 0.0, 0), 16: ([], 0.0, 0)}

    async def one(pool: EmbedPool, text: str, times: list[float]) -> None:
        p = planned(text)
        t0 = time.perf_counter()
        await cache.find(p, None, DEFAULT_THRESHOLD)
        vec, _ = await pool.embed(p.prompt, timeout=None)
        await cache.nearest(p, vec, DEFAULT_THRESHOLD)
        times.append(time.perf_counter() - t0)

    for _ in range(3):
        for max_batch in (1, 16):
            pool = EmbedPool(embedder, workers=1, limit=c, max_batch=max_batch)
            times, wall, passes = results[max_batch]
            t0 = time.perf_counter()
            for r in range(n // (3 * c)):
                await asyncio.gather(*(one(pool, prompts[(r * c + k) % len(prompts)], times) for k in range(c)))
            results[max_batch] = (times, wall + time.perf_counter() - t0, passes + pool.passes)
            pool.close()
    (t1, w1, p1), (tb, wb, pb) = results[1], results[16]
    return [f"## Lookups {c} at a time, one embedding worker: a pass per text, then texts sharing a pass", "",
            "| embedding | lookups/s | p50 ms | p99 ms | texts per pass |", "|---|---:|---:|---:|---:|",
            f"| one text per forward pass | {len(t1) / w1:.0f} | {pct(t1, 50) * 1e3:.2f} | {pct(t1, 99) * 1e3:.2f} | "
            f"{len(t1) / p1:.2f} |",
            f"| texts waiting share the next pass (shipped) | {len(tb) / wb:.0f} | {pct(tb, 50) * 1e3:.2f} | "
            f"{pct(tb, 99) * 1e3:.2f} | {len(tb) / pb:.2f} |",
            f"| ratio (shared / one each) | {(len(tb) / wb) / (len(t1) / w1):.2f}x | | | |", ""]


def faiss_100k(n: int = 100_000) -> list[str]:
    scope = planned("x").scope
    vectors = unit_rows(n)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = LocalIndex()
    t0 = time.perf_counter()
    index.add_many([(f"e{i}", scope, f"stored question number {i} about topic {i % 97}", v, 2e9)
                    for i, v in enumerate(vectors)])
    built = time.perf_counter() - t0
    python_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    faiss_bytes = n * DIMENSION * 4 + n * 8  # the floats and the id map (the IVF keeps its ids in a hash map)

    def near(i: int) -> np.ndarray:  # a paraphrase-like query: cosine ~0.95 to stored entry i
        q = vectors[i] + 0.017 * np.random.default_rng(i).standard_normal(DIMENSION).astype(np.float32)
        return q / np.linalg.norm(q)

    def searched(queries: int) -> tuple[list[float], list[float], float]:
        """Wall time and the searching thread's CPU time per search (their gap: time spent preempted)."""
        times, cpu, found = [], [], 0
        for i in range(0, n, n // queries):
            q = near(i)
            c0, t = time.thread_time(), time.perf_counter()
            c = index.search(scope, q, 4)
            times.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c0)
            found += c[0].entry_id == f"e{i}"
        return times, cpu, found / len(times)

    flat, flat_cpu, flat_found = searched(300)
    t0 = time.perf_counter()
    assert asyncio.run(index.rebuild(scope))
    promoted = time.perf_counter() - t0
    ivf, ivf_cpu, ivf_found = searched(3000)
    per_entry = (python_bytes + faiss_bytes) / n
    return [f"## FAISS at 100,000 entries (one scope, one OpenMP thread): flat scan, then IVF (nprobe {NPROBE})", "",
            "| measure | flat (before promotion) | IVF (shipped above 4,096 entries) | ratio | goal |",
            "|---|---:|---:|---:|---|",
            f"| search p50 | {pct(flat, 50) * 1e3:.2f} ms | {pct(ivf, 50) * 1e3:.2f} ms | "
            f"{pct(flat, 50) / pct(ivf, 50):.0f}x | <= 2 ms |",
            f"| search p99 | {pct(flat, 99) * 1e3:.2f} ms | {pct(ivf, 99) * 1e3:.2f} ms | "
            f"{pct(flat, 99) / pct(ivf, 99):.0f}x | |",
            f"| search p99, CPU time of the searching thread | {pct(flat_cpu, 99) * 1e3:.2f} ms | "
            f"{pct(ivf_cpu, 99) * 1e3:.2f} ms | | <= 2 ms |",
            f"| searches over 1 ms wall / their median CPU time | | {sum(t > 1e-3 for t in ivf)} of {len(ivf)} / "
            f"{statistics.median([c for t, c in zip(ivf, ivf_cpu) if t > 1e-3] or [0]) * 1e3:.2f} ms | | |",
            f"| a paraphrase-like query (cosine ~0.95) finds its entry first | {flat_found:.1%} | {ivf_found:.1%} | | |",
            "",
            "| measure | value | goal |", "|---|---:|---|",
            f"| index build (100k adds to the flat partition; guard features come later, per candidate) | {built:.1f} s | |",
            f"| promotion to IVF (k-means + 100k adds, in a worker thread; the flat partition serves meanwhile) | "
            f"{promoted:.1f} s | |",
            f"| local memory per entry (vector {DIMENSION * 4} B + id + guard features and bookkeeping) | "
            f"{per_entry:,.0f} B | stated |", ""], per_entry


async def redis_rebuild(url: str, n: int) -> list[str]:
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    base = (await client.info("memory"))["used_memory"]
    store = RedisCacheStore(client, prefix="bench")
    vectors = unit_rows(n, seed=3)
    now = time.time()
    t0 = time.perf_counter()
    batch = 1000
    for start in range(0, n, batch):  # the same commands as RedisCacheStore.put, pipelined for the setup
        async with client.pipeline(transaction=False) as p:
            for i in range(start, min(n, start + batch)):
                pl = planned(f"stored question number {i} about topic {i % 97}")
                e = Entry(f"id{i:06d}", pl.scope, pl.exact, pl.prompt, vectors[i], ANSWER, now, now + 3600)
                f = e.fields()
                p.hset(f"{store.k}:e:{e.id}", mapping=f)
                p.pexpire(f"{store.k}:e:{e.id}", 3_600_000)
                p.set(f"{store.k}:x:{e.exact}", e.id, px=3_600_000)
                p.zadd(f"{store.k}:ns:ml", {e.id: now})
                p.xadd(f"{store.k}:inserts", {"id": e.id, "scope": e.scope, "prompt": e.prompt,
                                              "vector": f["vector"], "expires": f["expires"]})
            await p.execute()
    written = time.perf_counter() - t0
    used = (await client.info("memory"))["used_memory"] - base
    fresh = SemanticCache(RedisCacheStore(aioredis.Redis.from_url(url), prefix="bench"))
    t0 = time.perf_counter()
    while await fresh.catch_up():
        pass
    rebuilt = time.perf_counter() - t0
    assert len(fresh.index) == n, len(fresh.index)
    await fresh.store.close()
    await client.flushall()
    await client.aclose()
    return ["## Rebuild from Redis", "",
            "| measure | value | goal |", "|---|---:|---|",
            f"| write {n:,} entries (pipelined, setup) | {written:.1f} s | |",
            f"| a new sidecar's index rebuilt from the insert stream | {rebuilt:.1f} s | <= 10 s |",
            f"| Redis memory per entry (hash + exact key + age index + stream record) | {used / n:,.0f} B | stated |",
            ""]


def wrk_unique_script(path: Path, model: str, auth: str) -> Path:
    """Every request a new question (a counter in the prompt): with the cache on, every lookup misses."""
    path.write_text(
        'local n = 0\n'
        'function init(args)\n'  # each wrk thread is its own Lua state: seed each apart (a table's address)
        '  math.randomseed(os.time() + tonumber(string.match(tostring({}), "0x(%x+)") or "7", 16) % 1000003)\n'
        'end\n'
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {auth}"\n'
        'function request()\n'
        '  n = n + 1\n'
        '  local body = \'{"model":"' + model + '","max_tokens":64,"messages":[{"role":"system","content":"Be brief."},'
        '{"role":"user","content":"Question \' .. math.random(1, 1000000000) .. \'-\' .. n .. \': how do I rotate the '
        'credentials of service account number \' .. n .. \' without downtime?"}]}\'\n'
        '  return wrk.format(nil, nil, nil, body)\n'
        'end\n'
        "function done(summary, latency, requests)\n"
        "  local e = summary.errors\n"
        "  io.write(string.format(\"BENCH_RESULT %d %d %d %d %d %d %d %d %.1f %.1f %.1f %.1f %.1f %.1f\\n\",\n"
        "    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,\n"
        "    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),\n"
        "    latency.mean, latency.max))\n"
        "end\n")
    return path


def wrk_fixed_script(path: Path, model: str, auth: str) -> Path:
    body = json.dumps({"model": model, "max_tokens": 64, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I rotate the credentials of a service account without downtime?"}]})
    from tests.bench.run import wrk_script
    return wrk_script(path, body.encode(), auth)


def through_envoy(tmp: Path, seconds: float, rounds: int) -> list[str]:
    fake, port = start_fake(tmp, "plain", [])
    base = {"providers": {"plain": {"type": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                                    "api_key": {"env": KEY_ENV}}},
            "models": {PLAIN_MODEL: {"targets": [{"provider": "plain", "model": PLAIN_MODEL}]}}}
    cached = {**base, "cache": {"mode": "semantic"}}
    unique = wrk_unique_script(tmp / "unique.lua", PLAIN_MODEL, CLIENT_KEY)
    fixed = wrk_fixed_script(tmp / "fixed.lua", PLAIN_MODEL, CLIENT_KEY)
    variants = {"cache off": (base, fixed), "cache on, every request a miss": (cached, unique),
                "cache on, every request an exact hit": (cached, fixed)}
    gws: dict[str, Gateway] = {}
    results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    try:
        for i, (label, (cfg, _)) in enumerate(variants.items()):
            d = tmp / f"gw{i}"
            d.mkdir()
            gws[label] = Gateway(d, cfg, env={KEY_ENV: PROVIDER_KEY}).start()
        hit_url = f"{gws['cache on, every request an exact hit'].base_url}/chat/completions"
        run_wrk(hit_url, fixed, 1, 1.0)  # stores the answer
        time.sleep(0.5)
        labels = list(variants)
        for r in range(rounds):
            for label in labels[r % 3:] + labels[:r % 3]:
                url = f"{gws[label].base_url}/chat/completions"
                run_wrk(url, variants[label][1], 16, 1.0)
                w = run_wrk(url, variants[label][1], 16, seconds)
                if w["non2xx"]:
                    raise RuntimeError(f"{label}: {int(w['non2xx'])} non-2xx answers")
                results[label].append(w)
                print(f"  round {r + 1} {label:40} {w['rps']:7,.0f} req/s", file=sys.stderr, flush=True)
        single = [run_wrk(hit_url, fixed, 1, seconds) for _ in range(2)]
        split = _results(gws["cache on, every request a miss"])
        reasons = _bypass_reasons(gws["cache on, every request a miss"])
    finally:
        for g in gws.values():
            g.stop()
        stop_process(fake)
    base_rps = statistics.median(w["rps"] for w in results["cache off"])
    lines = ["## Through Envoy (wrk, concurrency 16, non-streaming)", "",
             "| variant | req/s | p50 ms | p99 ms | ratio to cache off | goal |", "|---|---:|---:|---:|---:|---|"]
    goals = {"cache off": "", "cache on, every request a miss": ">= 0.7", "cache on, every request an exact hit": ">= 1.0"}
    for label, ws in results.items():
        rps = statistics.median(w["rps"] for w in ws)
        lines.append(f"| {label} | {rps:,.0f} | {statistics.median(w['p50_us'] for w in ws) / 1e3:.2f} | "
                     f"{statistics.median(w['p99_us'] for w in ws) / 1e3:.2f} | {rps / base_rps:.2f} | "
                     f"{goals[label]} |")
    hit_p50 = statistics.median(w["p50_us"] for w in single) / 1e3
    lines += ["", f"A hit end to end through Envoy, one client at a time: p50 {hit_p50:.2f} ms "
              f"(goal <= 15 ms), p99 {statistics.median(w['p99_us'] for w in single) / 1e3:.2f} ms.", "",
              f"What the all-miss gateway's lookups were (access log): {split}; its bypasses by reason "
              f"(metrics): {reasons}. A lookup that finds the embedding pool full (saturated), or embeddings "
              "past their share of a core (cpu_budget, `cache.embed_cpu`), is skipped rather than queued, by "
              "design.", ""]
    return lines


def _bypass_reasons(gw: Gateway) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, int] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "tollgate_cache_bypass_total":
                reason = sample.labels.get("reason", "?")
                out[reason] = out.get(reason, 0) + int(sample.value)
    return out


def _results(gw: Gateway) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in gw.access_records():
        out[rec.get("cache", "?")] = out.get(rec.get("cache", "?"), 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="fewer samples, shorter runs")
    ap.add_argument("--only", nargs="+", choices=["quality", "lookup", "faiss", "redis", "envoy"],
                    help="run only these parts")
    args = ap.parse_args(argv)
    facts = machine_facts(ensure_wrk())
    embedder = Embedder()
    lines = ["# The response cache (`python -m tests.bench.cache`)", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}. Machine: {facts.get('CPU', '?')}, "
             f"{facts.get('nproc', '?')} cores, load at start {facts.get('load average at start', '?')} "
             "(shared with other work).", ""]
    parts = set(args.only or ["quality", "lookup", "faiss", "redis", "envoy"])
    if "quality" in parts:
        lines += quality(embedder)
    if "lookup" in parts:
        lines += asyncio.run(lookup_latency(embedder, 100 if args.quick else 400))
    if "faiss" in parts:
        lines += faiss_100k()[0]
    with tempfile.TemporaryDirectory(prefix="tollgate-cache-bench-") as name:
        tmp = Path(name)
        if "redis" in parts:
            with RedisProcess(tmp / "redis") as redis:
                lines += asyncio.run(redis_rebuild(redis.url, 20_000 if args.quick else 100_000))
        if "envoy" in parts:
            lines += through_envoy(tmp, 2.0 if args.quick else 5.0, 2 if args.quick else 3)
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
