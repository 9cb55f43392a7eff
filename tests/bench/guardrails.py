"""What the guardrails cost and catch (`python -m tests.bench.guardrails`).

    python -m tests.bench.guardrails --out tests/bench/guardrails.md [--quick] [--sets DIR]

1. Throughput: the base gateway and the same gateway with guardrails on (input and output, redact
   policy), side by side at concurrency 16 with a ~2 KB prompt, order rotated each round; medians. And
   the ext_proc server's own CPU per exchange for both, in-process (tests/inprocess.py).
2. Scan cost: a 2 KB and a 200 KB prompt, digit-heavy (prose with code, a date, a version, a commit hash,
   a phone, an email and a card every 250 characters, so every numeric detector works) and plain prose;
   fastest and median (the fastest is the CPU cost; the median carries the machine's load); and the
   Python CPU per streamed chunk through the sliding window (``time.process_time``).
3. Detection: recall per kind on generated valid values, false positives on near-misses and
   ordinary prompts (tests/guardrails/corpus.py), and injection detection per public source when
   the assembled sets are present (``--sets``, default /work/data/guardrails; not in the repo, see
   the README for provenance), on two halves split by a hash of the text (dev, held-out).
   ``--scans-only`` re-runs 2 and 3 and keeps the throughput sections of ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from extproc.guardrails.engine import Engine, Redactor
from extproc.guardrails.injection import injections
from extproc.guardrails.settings import GuardrailSettings, Policy, parse_guardrails, score_settings
from extproc.guardrails.stream import StreamGuard
from tests.bench.run import (
    CLIENT_KEY, KEY_ENV, PLAIN_MODEL, PROVIDER_KEY, chat_body, children, cpu_seconds, ensure_wrk, machine_facts,
    run_wrk, start_fake, stop_process, wrk_script,
)
from tests.guardrails import corpus
from tests.harness import Gateway

REDACT_POLICY = {"rules": {"private_key": "redact", "credential": "redact", "card": "redact", "iban": "redact",
                           "national_id": "redact", "email": "redact", "phone": "redact", "injection": "flag"}}


def throughput(seconds: float, rounds: int, conns: int = 16) -> list[str]:
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tollgate-guard-bench-") as name:
        tmp = Path(name)
        fake, port = start_fake(tmp, "plain", [])
        base = {"providers": {"plain": {"type": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                                        "api_key": {"env": KEY_ENV}}},
                "models": {PLAIN_MODEL: {"targets": [{"provider": "plain", "model": PLAIN_MODEL}]}}}
        variants = {"base": base, "guardrails on (input + output, redact)": {**base, "guardrails": REDACT_POLICY}}
        gateways: dict[str, tuple[Gateway, Path]] = {}
        try:
            body = chat_body(PLAIN_MODEL, stream=False)
            for i, (label, cfg) in enumerate(variants.items()):
                d = tmp / f"gw{i}"
                d.mkdir()
                gateways[label] = (Gateway(d, cfg, env={KEY_ENV: PROVIDER_KEY}).start(),
                                   wrk_script(tmp / f"wrk{i}.lua", body, CLIENT_KEY))
                results[label] = []
            labels = list(gateways)
            for r in range(rounds):
                for label in labels[r % 2:] + labels[:r % 2]:
                    gw, script = gateways[label]
                    url = f"{gw.base_url}/chat/completions"
                    run_wrk(url, script, conns, 1.0)
                    pids = [gw.proc.pid, *children(gw.proc.pid)] if gw.proc else []
                    before = sum(cpu_seconds(pid) for pid in pids)
                    w = run_wrk(url, script, conns, seconds)
                    w["cpu_us"] = (sum(cpu_seconds(pid) for pid in pids) - before) / max(1, w["requests"]) * 1e6
                    if w["non2xx"]:
                        raise RuntimeError(f"{label}: {int(w['non2xx'])} non-2xx answers")
                    results[label].append(w)
                    print(f"  round {r + 1} {label:40} {w['rps']:7,.0f} req/s", file=sys.stderr, flush=True)
        finally:
            for gw, _ in gateways.values():
                gw.stop()
            stop_process(fake)
    base_rps = statistics.median(w["rps"] for w in results["base"])
    base_cpu = statistics.median(w["cpu_us"] for w in results["base"])
    out = ["| variant | req/s (rounds) | p50 ms | ratio to base | tollgate CPU per request | ratio |",
           "|---|---:|---:|---:|---:|---:|"]
    for label, ws in results.items():
        rps = statistics.median(w["rps"] for w in ws)
        cpu = statistics.median(w["cpu_us"] for w in ws)
        rounds_ = ", ".join(f"{w['rps']:,.0f}" for w in ws)
        out.append(f"| {label} | {rps:,.0f} ({rounds_}) | {statistics.median(w['p50_us'] for w in ws) / 1000:.2f} | "
                   f"{rps / base_rps:.2f} | {cpu:,.0f} µs | {cpu / base_cpu:.2f} |")
    return out


_PROSE = ("The quick brown fox jumps over the lazy dog while the gateway counts tokens, checks quotas and "
          "forwards the request to the provider. Remember to ignore nothing important in the report. ")


async def _exchanges(guard: bool, requests: int, concurrency: int = 16) -> float:
    """Python CPU per exchange (the real servicer over a real gRPC stream, tests/inprocess.py), µs."""
    from tests.inprocess import InProcessGateway

    cfg: dict[str, Any] = {
        "providers": {"openai": {"type": "openai", "base_url": "https://api.openai.example/v1",
                                 "api_key": {"env": "OPENAI_KEY"}}},
        "models": {"gpt": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}},
    }
    if guard:
        cfg["guardrails"] = REDACT_POLICY
    answer = json.dumps({"id": "c", "object": "chat.completion", "model": "gpt-4o", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello from the fake provider, here is the answer."},
         "finish_reason": "stop"}], "usage": {"prompt_tokens": 500, "completion_tokens": 12}}).encode()
    body = chat_body("gpt", stream=False)
    with tempfile.TemporaryDirectory() as state:
        async with InProcessGateway(cfg, {"XDG_STATE_HOME": state}) as gw:
            async def one(n: int) -> None:
                await gw.plain_exchange(f"r{n}", body, answer)

            async def worker(k: int, total: int) -> None:
                for n in range(k, total, concurrency):
                    await one(n)

            await asyncio.gather(*(worker(k, 200) for k in range(concurrency)))  # warm-up
            started = time.process_time()
            await asyncio.gather(*(worker(k, requests) for k in range(concurrency)))
            took = time.process_time() - started
            await gw.settled()
    return took / requests * 1e6


def python_cost(quick: bool) -> list[str]:
    rounds, requests = (2, 1000) if quick else (4, 3000)
    got: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for guard in ((False, True) if r % 2 == 0 else (True, False)):
            got[guard].append(asyncio.run(_exchanges(guard, requests)))
    base = statistics.median(got[False])
    out = ["| variant | Python CPU per exchange (median of rounds) | ratio |", "|---|---:|---:|"]
    for guard, label in ((False, "base"), (True, "guardrails on (input + output, redact)")):
        m = statistics.median(got[guard])
        out.append(f"| {label} | {m:.0f} µs | {m / base:.2f} |")
    return out


def _prompt(size: int) -> str:
    para = ("Our service reads orders from the queue, validates them and writes invoices. def handle(order): "
            "total = sum(i.price for i in order.items); log.info('order %s total %s', order.id, total). "
            "Release 2.4.1 on 2024-03-14 fixed the rounding; see commit 9fceb02d0ae598e95dc970b74767f19372d61af8. ")
    text = (para * (size // len(para) + 1))[:size - 120]
    return text + " Contact jane.doe@example.com or +1 415-555-2671; card 4111 1111 1111 1111 on file."


def scan_costs(quick: bool) -> list[str]:
    out = ["| what | fastest | median | p95 |", "|---|---:|---:|---:|"]
    for label, s in (("redact policy, locale us", parse_guardrails(REDACT_POLICY)),
                     ("every detector, every locale", score_settings())):
        engine = Engine(s)
        for size, n, kind in ((2048, 400 if quick else 2000, "digit-heavy"), (200 * 1024, 10 if quick else 40, "digit-heavy"),
                              (200 * 1024, 10 if quick else 40, "prose")):
            text = _prompt(size) if kind == "digit-heavy" else (_PROSE * (size // len(_PROSE) + 1))[:size]
            times = []
            for _ in range(n):
                t = time.perf_counter()
                engine.scan(text, s.policy, role="user")
                times.append(time.perf_counter() - t)
            times.sort()
            unit, k = ("µs", 1e6) if size < 10000 else ("ms", 1e3)
            out.append(f"| scan a {size // 1024} KB {kind} prompt, {label} | {times[0] * k:.1f} {unit} | "
                       f"{statistics.median(times) * k:.1f} {unit} | {times[int(len(times) * 0.95)] * k:.1f} {unit} |")
    for size, n in ((2048, 400 if quick else 2000), (200 * 1024, 10 if quick else 40)):
        for kind in ("digit-heavy", "prose"):
            text = _prompt(size) if kind == "digit-heavy" else (_PROSE * (size // len(_PROSE) + 1))[:size]
            times = []
            for _ in range(n):
                t = time.perf_counter()
                list(injections(text))
                times.append(time.perf_counter() - t)
            times.sort()
            unit, k = ("µs", 1e6) if size < 10000 else ("ms", 1e3)
            out.append(f"| injection heuristics alone, {size // 1024} KB {kind} prompt | {times[0] * k:.1f} {unit} | "
                       f"{statistics.median(times) * k:.1f} {unit} | {times[int(len(times) * 0.95)] * k:.1f} {unit} |")
    engine = Engine(score_settings())
    policy = GuardrailSettings(policy=Policy(rules=REDACT_POLICY["rules"])).policy
    words = ("The deployment finished and every service reported healthy; next we rotate the logs and check "
             "the dashboards for anything unusual before the weekend. ").split()
    events = [b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": " " + w}}]}).encode() + b"\n\n" for w in words * 20]
    per = []
    for _ in range(3 if quick else 10):
        g = StreamGuard(engine, policy, Redactor(), 64)
        t = time.process_time()
        for ev in events:
            g.feed(ev, False)
        per.append((time.process_time() - t) / len(events))
    out.append(f"| Python CPU per streamed chunk (one SSE event, sliding window 64, redact policy) | "
               f"{min(per) * 1e6:.1f} µs | {statistics.median(per) * 1e6:.1f} µs | {max(per) * 1e6:.1f} µs (worst run) |")
    return out


def detection(sets: Path) -> list[str]:
    s = score_settings()
    engine = Engine(s)
    out = ["| generated set | n | caught |", "|---|---:|---:|"]
    for kind in sorted(corpus.MAKERS):
        texts = corpus.positives(kind, 1000, seed=99)
        caught = sum(kind in {f.kind for f in engine.scan(t, s.policy, role="user")} for t in texts)
        out.append(f"| {kind}: valid values in sentences (recall) | {len(texts)} | {caught / len(texts):.3f} |")
    neg = corpus.near_misses(2000, seed=99) + corpus.PROMPTS
    fired = sum(bool(engine.scan(t, s.policy, role="user")) for t in neg)
    out.append(f"| near-misses and ordinary prompts (false positives) | {len(neg)} | {fired / len(neg):.4f} |")
    path = sets / "injection_public.jsonl"
    if not path.exists():
        return out + ["", f"(public injection sets not found at {path}: skipped)"]
    return out + [""] + public_injection(path, engine, s)


def public_injection(path: Path, engine: Engine, s: GuardrailSettings) -> list[str]:
    """Per source, on two halves split by a hash of the text: the heuristics were tuned on the first (dev)
    only, so the second (held-out) is the honest figure."""
    by: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # dev n, dev hit, held n, held hit
    for line in path.read_text().splitlines():
        d = json.loads(line)
        hit = any(f.kind == "injection" for f in engine.scan(d["text"], s.policy, role="user"))
        half = 2 * (zlib.crc32(d["text"].encode()) % 2)
        b = by[(d["source"], d["label"])]
        b[half] += 1
        b[half + 1] += hit
    out = ["| public source | label | n dev | fired dev | n held-out | fired held-out |",
           "|---|---:|---:|---:|---:|---:|"]
    tot = {0: [0, 0, 0, 0], 1: [0, 0, 0, 0]}
    for (src, label), b in sorted(by.items()):
        out.append(f"| {src} | {label} | {b[0]} | {_rate(b[1], b[0])} | {b[2]} | {_rate(b[3], b[2])} |")
        tot[label] = [x + y for x, y in zip(tot[label], b, strict=True)]
    for label, name in ((1, "all attacks (detection)"), (0, "all ordinary prompts (false positives)")):
        t = tot[label]
        out.append(f"| **{name}** | {label} | {t[0]} | {_rate(t[1], t[0], 4)} | {t[2]} | {_rate(t[3], t[2], 4)} |")
    return out


def _rate(hit: int, n: int, digits: int = 3) -> str:
    return f"{hit / n:.{digits}f}" if n else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sets", type=Path, default=Path("/work/data/guardrails"))
    ap.add_argument("--scans-only", action="store_true",
                    help="re-run scan cost and detection only; keep the throughput sections of --out as they are")
    args = ap.parse_args(argv)
    if args.scans_only:
        kept = args.out.read_text().split("## Scan cost")[0] if args.out.exists() else ""
        text = kept + "\n".join(["## Scan cost", "", f"(re-run {time.strftime('%Y-%m-%d %H:%M:%S %Z')})", "",
                                *scan_costs(args.quick), "", "## Detection", "", *detection(args.sets)]) + "\n"
        args.out.write_text(text)
        print(text)
        return 0
    seconds, rounds = (2.0, 2) if args.quick else (4.0, 3)
    facts = machine_facts(ensure_wrk())
    lines = ["# Guardrails: cost and detection (`python -m tests.bench.guardrails`)", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}. Machine: {facts.get('CPU', '?')}, "
             f"{facts.get('nproc', '?')} cores, load at start {facts.get('load average at start', '?')}.", "",
             f"## Throughput (wrk, concurrency 16, ~2 KB prompt, {rounds} rounds of {seconds:.0f} s, medians)", ""]
    lines += throughput(seconds, rounds)
    lines += ["", "The ext_proc server's own CPU per exchange, in-process (real servicer and gRPC stream, "
              "the same ~2 KB prompt; `time.process_time`, so neighbours on a shared machine disturb it far "
              "less than the wrk figures above):", ""] + python_cost(args.quick)
    lines += ["", "## Scan cost", ""] + scan_costs(args.quick)
    lines += ["", "## Detection", ""] + detection(args.sets)
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
