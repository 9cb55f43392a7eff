"""What users run, side by side in one run: the pipeline people deploy, a translated provider, a peer, the floor.

    python -m tests.bench.pipeline --out tests/bench/pipeline.md [--quick] [--no-peer] [--only a,b] [--streams-only]

Targets, all answering the same ~2 KB chat prompt from fake providers on loopback:

  floor 2m    the gateway's own rendered Envoy config in front of a do-nothing ext_proc server that answers
              as the gateway stage does for a prepared primary target: one gRPC stream, 2 messages
              (request headers, buffered body) per request. Issue 13's "one-stream floor".
  floor 4m    the same, but asking for the answer's headers and body as the gateway does: 4 messages,
              the gateway's own count, with no gateway logic behind them
  base        the gateway with auth none and no quotas (OpenAI passthrough)
  full        what users run: JWT auth (cached token), quotas on a local redis-server (AOF, fsync every
              second, as the README advises), metrics, access log
  embedded    quotas on the embedded store, otherwise like base
  anthropic   base, but the alias's target is an Anthropic-schema provider (translated both ways)
  observe     full, with the streamed alias on ``stream_chunks: observe`` (streams only)
  litellm     the LiteLLM proxy (``shared/peers/litellm``, one worker, no database), set up on first use;
              when it cannot be set up or started the report says why, in the table

Non-streaming: wrk at concurrency 16, then at concurrency 1 (for the latency each target adds over the
fake provider reached directly), several rounds, the order rotated every round so the machine's noise
falls on every target alike; reported as the median with the spread (min–max) of the rounds, and ratios
computed round by round (a target against the base measured next to it). CPU per request is read from
/proc for every process involved (Envoy, the Python server, redis-server, the peer; the fake provider
apart); Envoy's own counters give the ext_proc messages per request. Streaming: 50 chunks paced by the
fake, rotated rounds at concurrency 1 and 8: first token added over the fake itself, CPU per chunk and
per stream. The report ends with issue 13's goals, each against this run's figure.

Every process started here is stopped again; every port is free and on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import peer as litellm
from tests.bench.run import (
    CLIENT_KEY, KEY_ENV, STREAM_CHUNKS, TOKEN_DELAY, StreamStats, Target, chat_body, check_once, comm, cpu_of,
    descendants, ensure_wrk, machine_facts, run_wrk, start_fake, stop_process, stream_batch,
    wrk_script,
)
from tests.harness import ENVOY, TOLLGATE, Gateway, free_port, wait_port, wait_ready
from tests.quota.redis_process import RedisProcess

REPO = Path(__file__).resolve().parents[2]
UPSTREAM_KEY = "sk-upstream-openai-fake"  # the key the peer's config sends; every fake here expects it
PLAIN, PACED = "bench-plain", "bench-stream"
FLOORS = {"floor 2m": "g2", "floor 4m": "g4"}
WITH_REDIS = ("full", "observe")


@dataclass
class Subject:
    """One target: where it listens, what the client sends, whose CPU counts for it, and what it measured."""

    key: str
    base: str
    stream_base: str | None
    bearer: str
    plain_model: str
    stream_model: str
    roles: dict[str, list[int]]
    plain: bool = True  # takes part in the non-streaming rounds
    streams: bool = True  # takes part in the streaming rounds
    admin: int | None = None  # its Envoy's admin port, for ext_proc message counts
    log: Path | None = None  # the gateway's log, quoted when it answers anything but 200
    c16: list[dict[str, Any]] = field(default_factory=list)  # per round: wrk figures, CPU µs/req by role, msgs/req
    c1: list[dict[str, Any]] = field(default_factory=list)
    stream: dict[int, list[StreamStats]] = field(default_factory=dict)  # conns -> one StreamStats per round

    def target(self) -> Target:
        return Target(self.key, self.key, self.base, self.stream_base, self.bearer, self.roles)


# --------------------------------------------------------------------------- starting the targets


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
        suffix = "/v1" if kind == "openai" else ""
        return {"plain": {"type": kind, "base_url": f"http://127.0.0.1:{ports[kind + '-plain']}{suffix}", **key},
                "paced": {"type": kind, "base_url": f"http://127.0.0.1:{ports[kind + '-paced']}{suffix}", **key}}

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


def start_floor(tmp: Path, name: str, cfg: dict[str, Any], fake: tuple[int, int],
                procs: list[subprocess.Popen[bytes]]) -> Subject:
    """The gateway's rendered Envoy in front of a do-nothing ext_proc server (tests.bench.floor's ``serve``)."""
    d = tmp / name.replace(" ", "-")
    d.mkdir()
    gw = Gateway(d, cfg, env={KEY_ENV: UPSTREAM_KEY})  # never started: its ports, config file and env
    conf = d / "envoy.yaml"
    conf.write_bytes(subprocess.run([TOLLGATE, "render-envoy", "--config", str(gw.config_path)], check=True,
                                    capture_output=True, env=gw.env).stdout)
    fake_port, fake_pid = fake
    server = subprocess.Popen([sys.executable, "-m", "tests.bench.floor", "--serve", "grpcio", FLOORS[name],
                               str(gw.extproc_port), f"127.0.0.1:{fake_port}", PLAIN],
                              stdout=(d / "server.log").open("ab"), stderr=subprocess.STDOUT, env=gw.env, cwd=REPO)
    procs.append(server)
    envoy = subprocess.Popen([ENVOY, "-c", str(conf), "--disable-hot-restart", "--concurrency", "2", "-l", "warning"],
                             stdout=(d / "envoy.log").open("ab"), stderr=subprocess.STDOUT)
    procs.append(envoy)
    wait_ready(gw.admin_port)
    wait_port(gw.port)
    wait_port(gw.extproc_port)
    return Subject(name, f"http://127.0.0.1:{gw.port}", None, CLIENT_KEY, PLAIN, PLAIN,
                   {"envoy": [envoy.pid], "python": [server.pid], "fake": [fake_pid]},
                   streams=False, admin=gw.admin_port)


def start_gateways(tmp: Path, cfgs: dict[str, dict[str, Any]], token: str, pids: dict[str, int],
                   redis: RedisProcess, gateways: list[Gateway]) -> list[Subject]:
    subjects: list[Subject] = []
    for key, cfg in cfgs.items():
        d = tmp / f"gw-{key}"
        d.mkdir()
        gw = Gateway(d, cfg, env={KEY_ENV: UPSTREAM_KEY, "XDG_STATE_HOME": str(d / "state")}).start()
        gateways.append(gw)
        kind = "anthropic" if key == "anthropic" else "openai"
        roles = {**gateway_pids(gw), "fake": [pids[f"{kind}-plain"], pids[f"{kind}-paced"]]}
        if key in WITH_REDIS and redis.proc is not None:
            roles["redis"] = [redis.proc.pid]
        subjects.append(Subject(key, gw.base_url.removesuffix("/v1"), gw.base_url.removesuffix("/v1"),
                                token if key in WITH_REDIS else CLIENT_KEY, PLAIN, PACED, roles,
                                plain=key != "observe", admin=gw.admin_port, log=gw.log_path))
    return subjects


def start_peer(ports: dict[str, int], pids: dict[str, int], peers: list[subprocess.Popen[bytes]]
               ) -> tuple[Subject | None, str]:
    """Two proxies (the plain fake behind one, the paced fake behind the other), or None and why not."""
    peer = litellm.Peer.default()
    why = peer.setup()  # once, before the two starts (a fresh machine creates the venv here)
    if why is not None:
        return None, why
    mine = [free_port()]
    while len(mine) < 2:  # two quick picks can return the same free port
        mine += [p for p in [free_port()] if p not in mine]
    with ThreadPoolExecutor(2) as pool:  # side by side: one wait for both imports, not two in a row
        (plain, plain_port, note), (paced, paced_port, paced_note) = pool.map(
            peer.start, [ports["openai-plain"], ports["openai-paced"]], mine)
    peers += [p for p in (plain, paced) if p is not None]
    if plain is None or paced is None:
        return None, note if plain is None else paced_note
    own = [plain.pid, *descendants(plain.pid), paced.pid, *descendants(paced.pid)]
    return Subject("litellm", f"http://127.0.0.1:{plain_port}", f"http://127.0.0.1:{paced_port}", litellm.KEY,
                   litellm.MODEL, litellm.MODEL,
                   {"litellm": own, "fake": [pids["openai-plain"], pids["openai-paced"]]}), note


# --------------------------------------------------------------------------- measuring


def envoy_counters(admin: int | None) -> dict[str, int]:
    """The Envoy counters that explain an answer other than 200: ext_proc's, and the downstream status classes."""
    if admin is None:
        return {}
    out: dict[str, int] = {}
    query = "filter=(ext_proc|downstream_rq_[1-5]xx|rq_timeout|upstream_rq_[45]xx|overflow)&usedonly"
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?{query}", timeout=5) as r:
        for line in r.read().decode().splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
    return out


def measure(s: Subject, conns: int, seconds: float, script: Path, warm: bool) -> dict[str, Any]:
    """One wrk run. Answers other than 200 are counted and explained (Envoy's counters that moved, the
    gateway's last log lines) rather than ending the whole run: the report shows them."""
    url = f"{s.base}/v1/chat/completions"
    if warm:
        run_wrk(url, script, conns, 1.0)
    cb = envoy_counters(s.admin)  # read outside the CPU window: the admin call costs Envoy CPU too
    before = {r: cpu_of(p) for r, p in s.roles.items()}
    w = run_wrk(url, script, conns, seconds)
    after = {r: cpu_of(p) for r, p in s.roles.items()}
    ca = envoy_counters(s.admin)
    n = max(1.0, w["requests"])
    moved = {k: ca[k] - cb.get(k, 0) for k in ca if ca[k] != cb.get(k, 0)}
    sent = sum(v for k, v in moved.items() if k.endswith(".stream_msgs_sent"))
    run: dict[str, Any] = {"wrk": w, "cpu": {r: (after[r] - before[r]) / n * 1e6 for r in before},
                           "msgs": sent / n if s.admin else None, "bad": int(w["non2xx"] + w["err_timeout"])}
    if run["bad"]:
        counters = ", ".join(f"{k} +{v}" for k, v in sorted(moved.items()) if "msgs" not in k and "started" not in k)
        run["why"] = (f"{s.key}, c={conns}: {int(w['non2xx'])} non-2xx and {int(w['err_timeout'])} timed out of "
                      f"{int(w['requests'])}; Envoy: {counters or '-'}; log: {_log_tail(s.log, 3)}")
        print("  " + run["why"], file=sys.stderr, flush=True)
    return run


def _log_tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return " / ".join(line[:300] for line in path.read_text(errors="replace").splitlines()[-lines:])


def rotated(items: list[Subject], r: int) -> list[Subject]:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def plain_rounds(subjects: list[Subject], direct: Subject, scripts: dict[str, Path], rounds: int,
                 seconds: tuple[float, float]) -> None:
    for s in subjects:  # not counted: lazy set-up on first use (LiteLLM's first requests take seconds)
        run_wrk(f"{s.base}/v1/chat/completions", scripts[s.key], 16, 5.0 if s.key == "litellm" else 2.0)
    for r in range(rounds):
        for s in rotated(subjects, r):
            s.c16.append(measure(s, 16, seconds[0], scripts[s.key], warm=True))
            print(f"  round {r + 1} c=16 {s.key:10} {s.c16[-1]['wrk']['rps']:8,.0f} req/s", file=sys.stderr, flush=True)
        for s in rotated([direct, *subjects], r):  # warm from c=16 (the direct fake: from the gateways' load)
            s.c1.append(measure(s, 1, seconds[1], scripts[s.key], warm=False))
            print(f"  round {r + 1} c=1  {s.key:10} p50 {s.c1[-1]['wrk']['p50_us'] / 1000:6.2f} ms",
                  file=sys.stderr, flush=True)


async def stream_rounds(subjects: list[Subject], conns: int, per_round: int, rounds: int) -> None:
    bodies = {s.key: chat_body(s.stream_model, stream=True) for s in subjects}
    for s in subjects:  # warm-up, not counted
        await stream_batch(s.target(), conns, max(conns, 4), bodies[s.key], None)
    for r in range(rounds):
        for s in rotated(subjects, r):
            st = StreamStats(s.key, conns)
            await stream_batch(s.target(), conns, per_round, bodies[s.key], st)
            s.stream.setdefault(conns, []).append(st)
            print(f"  round {r + 1} streams c={conns} {s.key:10} TTFT p50 {med(st.ttft) * 1000:6.2f} ms, "
                  f"{len(st.failures)} failed", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- figures


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(med(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def own_ms(run: dict[str, Any]) -> float:
    """CPU ms per request of every process of the target but the fake provider."""
    return sum(v for k, v in run["cpu"].items() if k != "fake") / 1000


def pairs(a: list[dict[str, Any]], b: list[dict[str, Any]], f: Callable[[dict[str, Any], dict[str, Any]], float]
          ) -> list[float]:
    """Round-by-round figures of a against b, measured next to each other (a round where either answered
    nothing is left out: it has no ratio)."""
    return [f(x, y) for x, y in zip(a, b) if x["wrk"]["requests"] and y["wrk"]["requests"]]


def rps_ratio(a: Subject, b: Subject) -> list[float]:
    return pairs(a.c16, b.c16, lambda x, y: x["wrk"]["rps"] / y["wrk"]["rps"])


def added_p50(s: Subject, direct: Subject) -> list[float]:
    return pairs(s.c1, direct.c1, lambda x, y: (x["wrk"]["p50_us"] - y["wrk"]["p50_us"]) / 1000)


def ttft_added(s: Subject, direct: Subject, conns: int) -> list[float]:
    out = []
    for x, y in zip(s.stream.get(conns, []), direct.stream.get(conns, [])):
        if x.ttft and y.ttft:
            out.append((med(x.ttft) - med(y.ttft)) * 1000)
    return out


def per_chunk_us(st: StreamStats, role: str = "python") -> float:
    return st.cpu.get(role, float("nan")) / max(1, len(st.ttft) * STREAM_CHUNKS) * 1e6


def per_stream_us(st: StreamStats) -> float:
    return sum(v for k, v in st.cpu.items() if k != "fake") / max(1, len(st.ttft)) * 1e6


# --------------------------------------------------------------------------- the report


def plain_table(subjects: list[Subject], direct: Subject) -> list[str]:
    by = {s.key: s for s in subjects}
    base = by.get("base")
    lines = ["| target | ext_proc msgs/req | req/s c=16 | × base | CPU ms/req (all but fake) | Envoy | Python | "
             "redis | LiteLLM | fake | p50 ms c=16 | added p50 ms c=1 | not 200 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in subjects:
        if not s.c16:
            continue
        msgs = [r["msgs"] for r in s.c16 if r["msgs"] is not None]
        cells = [spread([r["cpu"][k] / 1000 for r in s.c16], "{:.2f}") if k in s.roles else "-"
                 for k in ("envoy", "python", "redis", "litellm", "fake")]
        lines.append(
            f"| {s.key} | {f'{med(msgs):.2f}' if msgs else '-'} | {spread([r['wrk']['rps'] for r in s.c16])} | "
            f"{spread(rps_ratio(s, base), '{:.2f}') if base and base.c16 else '-'} | "
            f"{spread([own_ms(r) for r in s.c16], '{:.2f}')} | " + " | ".join(cells) +
            f" | {med([r['wrk']['p50_us'] / 1000 for r in s.c16]):.1f} | {spread(added_p50(s, direct), '{:.2f}')} | "
            f"{sum(r['bad'] for r in s.c16 + s.c1)} |")
    if direct.c1:
        lines.append(f"| fake (direct) | - | - | - | - | - | - | - | - | - | - | "
                     f"p50 itself {spread([r['wrk']['p50_us'] / 1000 for r in direct.c1], '{:.2f}')} | "
                     f"{sum(r['bad'] for r in direct.c1)} |")
    return lines


def per_message(subjects: list[Subject]) -> list[str]:
    """What one more ext_proc message costs with no logic behind it: floor 4m against floor 2m, round by round."""
    by = {s.key: s for s in subjects}
    two, four = by.get("floor 2m"), by.get("floor 4m")
    if two is None or four is None or not two.c16 or not four.c16:
        return []

    def each(role: str) -> list[float]:
        return pairs(four.c16, two.c16, lambda x, y: (x["cpu"][role] - y["cpu"][role]) / (x["msgs"] - y["msgs"]))

    p50 = pairs(four.c1, two.c1, lambda x, y: (x["wrk"]["p50_us"] - y["wrk"]["p50_us"]) / (x["msgs"] - y["msgs"]))
    return ["", f"One more ext_proc message, with no logic behind it (floor 4m against floor 2m, per message, round by "
            f"round): Python {spread(each('python'))} µs and Envoy {spread(each('envoy'))} µs of CPU at c=16; "
            f"{spread(p50)} µs of p50 at c=1."]


def stream_table(subjects: list[Subject], direct: Subject, plan: list[int]) -> list[str]:
    lines = ["| target | conns | ok / failed | TTFT p50 ms | first token added ms | total p50 ms | "
             "Python CPU µs/chunk | CPU µs/stream (all but fake) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for conns in plan:
        for s in [direct, *subjects]:
            rounds = s.stream.get(conns, [])
            if not rounds:
                continue
            ttft = [t for st in rounds for t in st.ttft]
            total = [t for st in rounds for t in st.total]
            failed = sum(len(st.failures) for st in rounds)
            py = spread([per_chunk_us(st) for st in rounds], "{:.0f}") if "python" in s.roles else "-"
            added = spread(ttft_added(s, direct, conns), "{:.2f}") if s is not direct else "-"
            lines.append(f"| {s.key} | {conns} | {len(ttft)} / {failed} | {med(ttft) * 1000:.2f} | {added} | "
                         f"{med(total) * 1000:.1f} | {py} | "
                         f"{spread([per_stream_us(st) for st in rounds]) if s is not direct else '-'} |")
    return lines


def translated_ratio(by: dict[str, Subject], conns: int) -> list[float]:
    a, b = by.get("anthropic"), by.get("base")
    if a is None or b is None:
        return []
    return [per_stream_us(x) / per_stream_us(y) for x, y in zip(a.stream.get(conns, []), b.stream.get(conns, []))]


@dataclass
class Goal:
    what: str
    goal: float
    unit: str  # "×", "ms", "µs"
    at_most: bool  # the figure must stay at or under the goal (else at or above)
    values: list[float]

    def verdict(self) -> str:
        if not self.values:
            return "not measured in this run"
        v = med(self.values)
        if (v <= self.goal) if self.at_most else (v >= self.goal):
            return "met"
        times = v / self.goal if self.at_most else self.goal / v
        by = f"{abs(v - self.goal):,.0f}" if self.unit == "µs" else f"{abs(v - self.goal):.2f}"
        return f"**missed** by {by} {self.unit} ({times:.1f}× {'over' if self.at_most else 'short of'} the goal)"


def goals(by: dict[str, Subject], direct: Subject) -> list[Goal]:
    """Every goal of issue 13 that this bench measures; one whose target is missing has no values (and says so)."""
    empty = Subject("-", "", None, "", "", "", {})

    def sub(k: str) -> Subject:
        return by[k] if k in by and by[k].c16 else empty

    base, full, emb, floor, peer = sub("base"), sub("full"), sub("embedded"), sub("floor 2m"), sub("litellm")
    streamed = by.get("full", empty)
    return [
        Goal("full pipeline: req/s c=16, × base", 0.8, "×", False, rps_ratio(full, base)),
        Goal("full pipeline: CPU per request (Envoy + Python + redis-server)", 1.5, "ms", True,
             [own_ms(r) for r in full.c16]),
        Goal("full pipeline: req/s c=16, × LiteLLM", 10.0, "×", False, rps_ratio(full, peer)),
        Goal("full pipeline: CPU per request, × LiteLLM's", 1 / 8, "×", True,
             pairs(full.c16, peer.c16, lambda x, y: own_ms(x) / own_ms(y))),
        Goal("base: CPU per request (Envoy + Python)", 1.0, "ms", True, [own_ms(r) for r in base.c16]),
        Goal("base: added p50 c=1", 1.2, "ms", True, added_p50(base, direct) if base.c16 else []),
        Goal("base: req/s c=16, × the one-stream floor (floor 2m)", 0.7, "×", False, rps_ratio(base, floor)),
        Goal("embedded quotas: req/s c=16, × base", 0.9, "×", False, rps_ratio(emb, base)),
        Goal("full stream: first token added c=1", 2.0, "ms", True, ttft_added(streamed, direct, 1)),
        Goal("full stream: first token added c=8", 5.0, "ms", True, ttft_added(streamed, direct, 8)),
        *(Goal(f"full stream: Python CPU per chunk c={c}", 40.0, "µs", True,
               [per_chunk_us(st) for st in streamed.stream.get(c, [])]) for c in (1, 8)),
        *(Goal(f"Anthropic stream CPU (Envoy + Python), × OpenAI passthrough, c={c}", 1.3, "×", True,
               translated_ratio(by, c)) for c in (1, 8)),
    ]


def render(subjects: list[Subject], missing: dict[str, str], direct: Subject, plan: list[int],
           facts: dict[str, str], notes: list[str], seconds: tuple[float, float], rounds: tuple[int, int],
           took: float, load_end: str) -> str:
    by = {s.key: s for s in subjects}
    lines = [
        "# What users run, side by side (`python -m tests.bench.pipeline`)", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} in {took:.0f} s; load average "
        f"{facts.get('load average at start', '?')} at the start, {load_end} at the end, on "
        f"{facts.get('nproc', '?')} shared cores ({facts.get('CPU', '?')}): read ratios, not absolutes.", "",
        f"Non-streaming: wrk, {rounds[0]} rounds, order rotated every round: {seconds[0]:.0f} s at concurrency 16, "
        f"then {seconds[1]:.0f} s at concurrency 1. Median (min–max of the rounds); ratios and added latency are "
        "computed round by round against the target measured beside it. CPU per request from /proc, per process.", "",
    ]
    if any(s.c16 for s in subjects):
        lines += plain_table(subjects, direct)
        lines += [f"| {k} | {why} |" + " |" * 11 for k, why in missing.items()]
        lines += per_message(subjects)
    else:
        notes += [f"{k}: {why}" for k, why in missing.items()]
    lines += ["", f"## Streaming ({STREAM_CHUNKS} chunks paced {TOKEN_DELAY * 1000:.1f} ms apart by the fake; "
              f"{rounds[1]} rotated rounds)", ""] + stream_table([s for s in subjects if s.streams], direct, plan)
    for c in plan:
        r = translated_ratio(by, c)
        if r:
            lines.append(f"\nTranslated stream (Anthropic target) against the OpenAI passthrough stream, c={c}: "
                         f"{spread(r, '{:.2f}')}× the CPU per stream (Envoy + Python).")
    lines += ["", "## Issue 13's goals in this run", "", "| goal | target | this run: median (min–max) | verdict |",
              "|---|---:|---:|---|"]
    for g in goals(by, direct):
        target = f"{'≤' if g.at_most else '≥'} {g.goal:.3g} {g.unit}"
        fmt = "{:,.0f}" if g.unit == "µs" else "{:.2f}"
        lines.append(f"| {g.what} | {target} | {spread(g.values, fmt)} | {g.verdict()} |")
    lines.append("| ext_proc RSS flat within 10 % over 10 minutes | ≤ 10 % | not measured here | "
                 "see README, Memory |")
    for s in [direct, *subjects]:
        notes += [r["why"] for r in s.c16 + s.c1 if r.get("why")]
        for c, rounds_ in s.stream.items():
            fails = [f for st in rounds_ for f in st.failures]
            if fails:
                notes.append(f"{s.key} at c={c}: {len(fails)} failed stream(s): " + "; ".join(sorted(set(fails))[:3]))
    lines += ["", "Notes:"] + [f"- {n}" for n in notes if n] + [
        "- floor 2m / floor 4m: the gateway's own rendered Envoy config in front of a do-nothing grpc.aio "
        "server (`tests/bench/floor.py`, variants g2 / g4) answering as the gateway stage does; plain requests only.",
        "- redis-server runs with AOF, fsync every second; its CPU counts for the full pipeline."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="short runs, for smoke-testing")
    ap.add_argument("--no-peer", action="store_true", help="leave the LiteLLM peer out")
    ap.add_argument("--only", help="a comma-separated subset of the targets (e.g. full,observe or 'floor 2m,base')")
    ap.add_argument("--streams-only", action="store_true", help="the streaming part alone")
    ap.add_argument("--stream-rounds", type=int, default=None, help="rotated rounds of the streaming part")
    args = ap.parse_args(argv)
    seconds, rounds = ((2.0, 2.0), 2) if args.quick else ((5.0, 3.0), 3)
    stream_plan = [(1, 8), (8, 32)] if args.quick else [(1, 40), (8, 160)]
    stream_rounds_n = args.stream_rounds or rounds
    wanted = (lambda k: k in args.only.split(",")) if args.only else (lambda k: True)
    facts = machine_facts(ensure_wrk())
    started = time.monotonic()
    notes: list[str] = []
    missing: dict[str, str] = {}  # target -> why it is not in this run (a row in the table says so)
    subjects: list[Subject] = []
    direct = Subject("fake (direct)", "", None, UPSTREAM_KEY, "gpt-4o-mini", "gpt-4o-mini", {})
    with tempfile.TemporaryDirectory(prefix="tollgate-pipeline-") as name:
        tmp = Path(name)
        procs: list[subprocess.Popen[bytes]] = []
        peers: list[subprocess.Popen[bytes]] = []
        gateways: list[Gateway] = []
        redis = RedisProcess(tmp / "redis", appendonly=True, appendfsync="everysec").start()
        try:
            ports: dict[str, int] = {}
            pids: dict[str, int] = {}
            paced = ["--chunks", str(STREAM_CHUNKS), "--token-delay", str(TOKEN_DELAY)]
            for kind in ("openai", "anthropic"):
                for flavour, extra in (("plain", []), ("paced", paced)):
                    p, port = start_fake(tmp, f"{kind}-{flavour}", ["--kind", kind, "--api-key", UPSTREAM_KEY, *extra])
                    procs.append(p)
                    ports[f"{kind}-{flavour}"], pids[f"{kind}-{flavour}"] = port, p.pid
            direct.base, direct.stream_base = (f"http://127.0.0.1:{ports['openai-plain']}",
                                               f"http://127.0.0.1:{ports['openai-paced']}")
            direct.roles = {"fake": [pids["openai-plain"], pids["openai-paced"]]}
            cfgs, token = configs(ports, tmp, redis.url)
            if not args.streams_only:
                subjects += [start_floor(tmp, f, cfgs["base"], (ports["openai-plain"], pids["openai-plain"]), procs)
                             for f in FLOORS if wanted(f)]
            subjects += start_gateways(tmp, {k: v for k, v in cfgs.items() if wanted(k)}, token, pids, redis, gateways)
            if not args.no_peer and wanted("litellm"):
                peer_s, note = start_peer(ports, pids, peers)
                if peer_s is not None:
                    subjects.append(peer_s)
                    notes.append(note)
                else:
                    missing["litellm"] = note
            scripts: dict[str, Path] = {}
            for s in [direct, *subjects]:
                body = chat_body(s.plain_model, stream=False)
                status, _, obj = check_once(f"{s.base}/v1/chat/completions", body, s.bearer)
                if status != 200 or not isinstance(obj, dict) or not obj.get("choices"):
                    raise RuntimeError(f"{s.key} answered {status}: {str(obj)[:300]}")
                scripts[s.key] = wrk_script(tmp / f"wrk-{s.key.replace(' ', '-')}.lua", body, s.bearer)
            if not args.streams_only:
                plain_rounds([s for s in subjects if s.plain], direct, scripts, rounds, seconds)
            for conns, total in stream_plan:
                asyncio.run(stream_rounds([direct, *[s for s in subjects if s.streams]], conns,
                                          max(1, total // stream_rounds_n), stream_rounds_n))
        finally:
            for gw in gateways:
                gw.stop()
            for peer_p in peers:
                litellm.stop(peer_p)
            for p in procs:
                stop_process(p)
            redis.stop()
    if args.no_peer:
        missing["litellm"] = "left out of this run (--no-peer)"
    load_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    text = render(subjects, missing, direct, [c for c, _ in stream_plan], facts, notes, seconds,
                  (rounds, stream_rounds_n), time.monotonic() - started, load_end)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
