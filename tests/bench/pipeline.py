"""What users run, side by side in one run: the pipeline people deploy, a translated provider, and a peer.

    python -m tests.bench.pipeline --out tests/bench/pipeline.md [--quick]

Targets, all answering the same ~2 KB chat prompt from fake providers on loopback:

  base        the gateway with auth none and no quotas (OpenAI passthrough)
  full        what users run: JWT auth (cached token), quotas on a local redis-server, metrics, access log
  embedded    quotas on the embedded store, otherwise like base
  anthropic   base, but the alias's target is an Anthropic-schema provider (translated both ways)
  observe     full, with the streamed alias on ``stream_chunks: observe`` (streams only: chunks pass unheld)
  litellm     the LiteLLM proxy (../shared/peers/litellm, one worker, no database), if it is set up

Non-streaming: wrk at concurrency 16, several rounds, the order rotated every round so the machine's
noise falls on every target alike; reported as the median with the spread (min–max) of the rounds.
CPU per request is read from /proc for every process involved (Envoy, the Python server, redis-server,
the fake provider, the peer). Streaming: 50 chunks paced by the fake, first-token time added over the
fake itself at concurrency 1 and 8, and CPU per chunk.

Every process started here is stopped again; every port is free and on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.run import (
    CLIENT_KEY, KEY_ENV, STREAM_CHUNKS, TOKEN_DELAY, StreamStats, Target, chat_body, check_once,
    comm, cpu_of, descendants, ensure_wrk, machine_facts, run_wrk, start_fake, stop_process, stream_batch,
    wrk_script,
)
from tests.harness import Gateway, free_port, wait_port
from tests.quota.redis_process import RedisProcess

REPO = Path(__file__).resolve().parents[2]
PEER_DIR = REPO.parent / "shared" / "peers" / "litellm"
PEER_VENV = Path(os.environ.get("LITELLM_VENV", REPO / ".bench" / "litellm-venv"))
PEER_KEY = "sk-peer-master-1234"
PEER_MODEL = "gpt-4o-mini"
UPSTREAM_KEY = "sk-upstream-openai-fake"  # the key the peer's config sends; every fake here expects it
PLAIN, PACED = "bench-plain", "bench-stream"


@dataclass
class Subject:
    """One target: where it listens, what the client sends, and whose CPU counts for it."""

    key: str
    base: str
    stream_base: str | None
    bearer: str
    plain_model: str
    stream_model: str
    roles: dict[str, list[int]]
    streams_only: bool = False
    rounds: list[dict[str, float]] = field(default_factory=list)
    cpu_us: list[dict[str, float]] = field(default_factory=list)

    def target(self) -> Target:
        return Target(self.key, self.key, self.base, self.stream_base, self.bearer, self.roles)


def gateway_pids(gw: Gateway) -> dict[str, list[int]]:
    assert gw.proc is not None
    kids = descendants(gw.proc.pid)
    envoy = [p for p in kids if comm(p) == "envoy"]
    python = [gw.proc.pid] + [p for p in kids if p not in envoy and all(p not in descendants(e) for e in envoy)]
    return {"envoy": envoy, "python": python}


def configs(ports: dict[str, int], tmp: Path, redis_url: str) -> tuple[dict[str, dict[str, Any]], str]:
    """name -> gateway config, and the JWT the full pipeline's client sends."""
    from tests.fake_idp import FakeIdP

    def providers(kind: str) -> dict[str, Any]:
        key = {"api_key": {"env": KEY_ENV}}
        return {
            "plain": {"type": kind, "base_url": f"http://127.0.0.1:{ports[kind + '-plain']}" + ("/v1" if kind == "openai" else ""), **key},
            "paced": {"type": kind, "base_url": f"http://127.0.0.1:{ports[kind + '-paced']}" + ("/v1" if kind == "openai" else ""), **key},
        }

    def models(model: str) -> dict[str, Any]:
        return {PLAIN: {"targets": [{"provider": "plain", "model": model}]},
                PACED: {"targets": [{"provider": "paced", "model": model}]}}

    base = {"providers": providers("openai"), "models": models("gpt-4o-mini")}
    quota = {"limits": {"org": {"usd_per_day": 1_000_000}, "aliases": {"*": {"tokens_per_minute": 1_000_000_000}}}}
    idp = FakeIdP()
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps(idp.jwks()))
    token = idp.mint(iss="https://bench.idp", aud="tollgate", sub="bench-user", groups=["bench"],
                     exp=int(time.time()) + 7200)
    full = {
        **base,
        "teams": {"bench": {"models": ["*"]}},
        "auth": {"mode": "jwt",
                 "issuers": [{"issuer": "https://bench.idp", "audience": "tollgate", "jwks_file": str(jwks),
                              "claims": {"teams": "groups"}}]},
        "redis": {"url": redis_url},
        "quota": quota,
    }
    return {
        "base": base,
        "full": full,
        "embedded": {**base, "quota": quota},
        "anthropic": {"providers": providers("anthropic"), "models": models("claude-haiku-4-5")},
        "observe": {**full, "models": {**full["models"], PACED: {**full["models"][PACED], "stream_chunks": "observe"}}},
    }, token


def start_peer(tmp: Path, upstream_port: int) -> tuple[subprocess.Popen[bytes] | None, int, str]:
    if not (PEER_VENV / "bin" / "litellm").exists():
        return None, 0, f"LiteLLM not set up ({PEER_VENV}); run `bash {PEER_DIR}/setup.sh` with VENV={PEER_VENV}"
    port = free_port()
    env = {**os.environ, "VENV": str(PEER_VENV), "PORT": str(port), "MAX_SECONDS": "1800",
           "UPSTREAM": f"http://127.0.0.1:{upstream_port}/v1"}
    p = subprocess.Popen(["bash", str(PEER_DIR / "start.sh")], env=env, start_new_session=True,
                         stdout=(tmp / f"litellm-{port}.log").open("ab"), stderr=subprocess.STDOUT)
    try:
        wait_port(port, 90)
    except TimeoutError:
        stop_process(p)
        return None, 0, "LiteLLM did not start in 90 s"
    version = subprocess.run([str(PEER_VENV / "bin" / "pip"), "show", "litellm"], capture_output=True,
                             text=True).stdout.split("Version:")[-1].split()[0]
    return p, port, f"LiteLLM {version}, 1 worker, no database"


def measure(s: Subject, conns: int, seconds: float, script: Path) -> None:
    url = f"{s.base}/v1/chat/completions"
    run_wrk(url, script, conns, 1.0)
    before = {r: cpu_of(p) for r, p in s.roles.items()}
    w = run_wrk(url, script, conns, seconds)
    after = {r: cpu_of(p) for r, p in s.roles.items()}
    if w["non2xx"] or w["err_timeout"]:
        raise RuntimeError(f"{s.key}: {int(w['non2xx'])} non-2xx answers, {int(w['err_timeout'])} timeouts")
    n = max(1.0, w["requests"])
    s.rounds.append(w)
    s.cpu_us.append({r: (after[r] - before[r]) / n * 1e6 for r in before})


async def stream_rounds(subjects: list[Subject], conns: int, per_round: int, rounds: int) -> dict[str, StreamStats]:
    stats = {s.key: StreamStats(s.key, conns) for s in subjects}
    bodies = {s.key: chat_body(s.stream_model, stream=True) for s in subjects}
    for s in subjects:  # warm-up, not counted
        await stream_batch(s.target(), conns, max(conns, 4), bodies[s.key], None)
    for r in range(rounds):
        order = subjects[r % len(subjects):] + subjects[: r % len(subjects)]
        for s in order:
            await stream_batch(s.target(), conns, per_round, bodies[s.key], stats[s.key])
    return stats


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="short runs, for smoke-testing")
    ap.add_argument("--no-peer", action="store_true", help="leave the LiteLLM peer out")
    ap.add_argument("--only", help="a comma-separated subset of the gateway targets (e.g. full,observe)")
    ap.add_argument("--streams-only", action="store_true", help="the streaming part alone")
    ap.add_argument("--stream-rounds", type=int, default=None, help="rotated rounds of the streaming part")
    args = ap.parse_args(argv)
    seconds, rounds = (2.0, 2) if args.quick else (6.0, 3)
    stream_plan = [(1, 8), (8, 32)] if args.quick else [(1, 40), (8, 160)]
    stream_rounds_n = args.stream_rounds or rounds
    wrk = ensure_wrk()
    facts = machine_facts(wrk)
    started = time.monotonic()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tollgate-pipeline-") as name:
        tmp = Path(name)
        procs: list[subprocess.Popen[bytes]] = []
        gateways: list[Gateway] = []
        redis = RedisProcess(tmp / "redis").start()
        try:
            ports: dict[str, int] = {}
            pids: dict[str, int] = {}
            paced = ["--chunks", str(STREAM_CHUNKS), "--token-delay", str(TOKEN_DELAY)]
            for kind in ("openai", "anthropic"):
                for flavour, extra in (("plain", []), ("paced", paced)):
                    p, port = start_fake(tmp, f"{kind}-{flavour}", ["--kind", kind, "--api-key", UPSTREAM_KEY, *extra])
                    procs.append(p)
                    ports[f"{kind}-{flavour}"], pids[f"{kind}-{flavour}"] = port, p.pid
            cfgs, token = configs(ports, tmp, redis.url)
            if args.only:
                cfgs = {k: v for k, v in cfgs.items() if k in args.only.split(",")}
            subjects: list[Subject] = []
            for key, cfg in cfgs.items():
                d = tmp / f"gw-{key}"
                d.mkdir()
                gw = Gateway(d, cfg, env={KEY_ENV: UPSTREAM_KEY, "XDG_STATE_HOME": str(d / "state")}).start()
                gateways.append(gw)
                kind = "anthropic" if key == "anthropic" else "openai"
                roles = {**gateway_pids(gw), "fake": [pids[f"{kind}-plain"], pids[f"{kind}-paced"]]}
                if key in ("full", "observe"):
                    roles["redis"] = [redis.proc.pid] if getattr(redis, "proc", None) else []
                subjects.append(Subject(key, gw.base_url.removesuffix("/v1"), gw.base_url.removesuffix("/v1"),
                                        token if key in ("full", "observe") else CLIENT_KEY, PLAIN, PACED, roles,
                                        streams_only=key == "observe"))
            if not args.no_peer:
                peer, peer_port, peer_note = start_peer(tmp, ports["openai-plain"])
                peer_s, peer_s_port, _ = start_peer(tmp, ports["openai-paced"]) if peer else (None, 0, "")
                notes.append(peer_note)
                if peer is not None and peer_s is not None:
                    procs += [peer, peer_s]
                    peer_pids = [peer.pid, *descendants(peer.pid), peer_s.pid, *descendants(peer_s.pid)]
                    subjects.append(Subject("litellm", f"http://127.0.0.1:{peer_port}",
                                            f"http://127.0.0.1:{peer_s_port}", PEER_KEY, PEER_MODEL, PEER_MODEL,
                                            {"litellm": peer_pids, "fake": [pids["openai-plain"], pids["openai-paced"]]}))
            direct = Subject("fake (direct)", f"http://127.0.0.1:{ports['openai-plain']}",
                             f"http://127.0.0.1:{ports['openai-paced']}", UPSTREAM_KEY, "gpt-4o-mini",
                             "gpt-4o-mini", {"fake": [pids["openai-plain"], pids["openai-paced"]]})
            scripts: dict[str, Path] = {}
            for s in subjects:
                body = chat_body(s.plain_model, stream=False)
                status, _, obj = check_once(f"{s.base}/v1/chat/completions", body, s.bearer)
                if status != 200 or not isinstance(obj, dict) or not obj.get("choices"):
                    raise RuntimeError(f"{s.key} answered {status}: {str(obj)[:300]}")
                scripts[s.key] = wrk_script(tmp / f"wrk-{s.key}.lua", body, s.bearer)
            plain = [] if args.streams_only else [s for s in subjects if not s.streams_only]
            for r in range(rounds if plain else 0):
                order = plain[r % len(plain):] + plain[: r % len(plain)]
                for s in order:
                    measure(s, 16, seconds, scripts[s.key])
                    print(f"  round {r + 1} {s.key:10} {s.rounds[-1]['rps']:8,.0f} req/s", file=sys.stderr, flush=True)
            stream_stats: dict[tuple[str, int], StreamStats] = {}
            for conns, total in stream_plan:
                got = asyncio.run(stream_rounds([direct, *subjects], conns, max(1, total // stream_rounds_n),
                                                stream_rounds_n))
                for k, st in got.items():
                    stream_stats[(k, conns)] = st
        finally:
            for gw in gateways:
                gw.stop()
            for p in procs:
                stop_process(p)
            redis.stop()
    text = render(subjects, stream_stats, stream_plan, facts, notes, seconds, rounds, time.monotonic() - started)
    args.out.write_text(text)
    print(text)
    return 0


def render(subjects: list[Subject], streams: dict[tuple[str, int], StreamStats], plan: list[tuple[int, int]],
           facts: dict[str, str], notes: list[str], seconds: float, rounds: int, took: float) -> str:
    by = {s.key: s for s in subjects}
    ref = by["base"] if "base" in by and by["base"].rounds else next((s for s in subjects if s.rounds), None)
    base_rps = statistics.median(w["rps"] for w in ref.rounds) if ref is not None else float("nan")

    def cpu(s: Subject, role: str | None = None) -> float:
        per_round = [sum(c.values()) if role is None else c.get(role, 0.0) for c in s.cpu_us]
        return statistics.median(per_round)

    lines = [
        "# What users run, side by side (`python -m tests.bench.pipeline`)", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} in {took:.0f} s. Non-streaming: wrk at concurrency 16, "
        f"{rounds} rounds of {seconds:.0f} s per target, order rotated every round; median (min–max of the rounds).",
        "CPU per request: every process of the target, read from /proc (fake provider listed apart).", "",
        "| target | req/s c=16 | ratio to base | p50 ms | CPU ms/req (all but fake) | Envoy | Python | redis | peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in subjects:
        if not s.rounds:
            continue
        rps = [w["rps"] for w in s.rounds]
        own = statistics.median(sum(v for k, v in c.items() if k != "fake") for c in s.cpu_us) / 1000
        cells = [f"{cpu(s, r) / 1000:.2f}" if r in s.roles else "-" for r in ("envoy", "python", "redis", "litellm")]
        lines.append(f"| {s.key} | {spread(rps)} | {statistics.median(rps) / base_rps:.2f} | "
                     f"{statistics.median(w['p50_us'] for w in s.rounds) / 1000:.2f} | {own:.2f} | " + " | ".join(cells) + " |")
    if "litellm" in by and "full" in by:
        peer = by["litellm"]
        peer_rps = statistics.median(w["rps"] for w in peer.rounds)
        peer_cpu = statistics.median(sum(v for k, v in c.items() if k != "fake") for c in peer.cpu_us)
        full = by["full"]
        full_rps = statistics.median(w["rps"] for w in full.rounds)
        full_cpu = statistics.median(sum(v for k, v in c.items() if k != "fake") for c in full.cpu_us)
        lines += ["", f"Full pipeline against the peer: {full_rps / peer_rps:.1f}× its throughput, "
                  f"{full_cpu / peer_cpu:.2f}× its CPU per request."]
    lines += ["", f"## Streaming ({STREAM_CHUNKS} chunks paced {TOKEN_DELAY * 1000:.1f} ms apart by the fake)", "",
              "| target | conns | ok / failed | TTFT p50 ms | first token added ms | total p50 ms | Python CPU µs/chunk |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for conns, _ in plan:
        direct = streams.get(("fake (direct)", conns))
        d_ttft = statistics.median(direct.ttft) * 1000 if direct and direct.ttft else float("nan")
        for (key, c), st in streams.items():
            if c != conns:
                continue
            ttft = statistics.median(st.ttft) * 1000 if st.ttft else float("nan")
            total = statistics.median(st.total) * 1000 if st.total else float("nan")
            n_chunks = max(1, len(st.ttft) * STREAM_CHUNKS)
            py = st.cpu.get("python")
            py_chunk = f"{py / n_chunks * 1e6:.1f}" if py is not None else "-"
            added = f"{ttft - d_ttft:.2f}" if key != "fake (direct)" else "-"
            lines.append(f"| {key} | {conns} | {len(st.ttft)} / {len(st.failures)} | {ttft:.2f} | {added} | "
                         f"{total:.2f} | {py_chunk} |")
    for (key, c), st in streams.items():
        if st.failures:
            reasons = sorted(set(st.failures))[:3]
            notes.append(f"{key} at c={c}: {len(st.failures)} failed stream(s): " + "; ".join(reasons))
    lines += ["", "Notes:"] + [f"- {n}" for n in notes if n] + [
        f"- Machine: {facts.get('CPU', '?')}, {facts.get('nproc', '?')} cores, load at start "
        f"{facts.get('load average at start', '?')}. The machine is shared: read ratios, not absolutes."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
