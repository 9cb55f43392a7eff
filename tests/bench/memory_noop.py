"""Where the ext_proc server's per-request growth comes from: a do-nothing grpc.aio server behind Envoy.

    python -m tests.bench.memory_noop --out tests/bench/memory_noop.md [--windows 6] [--window 10]
        [--variants reset,reset-open,graceful,graceful-open,rotate-1000] [--grpcio DIR,DIR...]

No gateway code runs here. A minimal Envoy (one listener, one ext_proc filter sending request headers,
the buffered request body, response headers and the buffered response body: the 4 messages of a plain
request through Tollgate) routes to the fake provider; its ext_proc server is a grpc.aio server that
answers CONTINUE to every message (``memory_noop_server.py``). Variants:

  reset          Envoy's default end of a stream; the server ends each stream after the last answer
  reset-open     the same, but the server waits for Envoy to end the stream (never ends it itself)
  graceful       Envoy half-closes (``ext_proc_graceful_grpc_close``); the server ends after the last answer
  graceful-open  Envoy half-closes; the server ends when it sees the half-close
  rotate-N       ``reset``, with Envoy opening a new HTTP/2 connection to the server every N streams

``--grpcio`` adds a ``reset`` variant per directory holding another grpcio release (made with
``pip install --no-deps --target DIR grpcio==X``; the server then imports it first). Each variant has its
own Envoy and server; they take turns window by window (wrk c=16, saturating). After each window the
server's RSS is read. Growth is reported per request from the end of the first window to the end of the
last, with Envoy's counts of ext_proc streams opened and reset and of connections opened. Every process
started here is stopped again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.bench.run import CLIENT_KEY, chat_body, check_once, ensure_wrk, run_wrk, start_fake, stop_process, \
    wrk_script
from tests.bench.soak import rss_mb
from tests.harness import ENVOY, free_port, wait_port, wait_ready

REPO = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).with_name("memory_noop_server.py")  # run as a script: it imports nothing of ours
GRACEFUL = {"envoy.reloadable_features.ext_proc_graceful_grpc_close": True}
FAILURES = ("non2xx", "err_timeout", "err_connect", "err_read", "err_write")


# --------------------------------------------------------------------------- Envoy


def bootstrap(port: int, admin: int, server_port: int, fake_port: int, graceful: bool, per_conn: int) -> dict[str, Any]:
    def cluster(name: str, p: int, h2: bool) -> dict[str, Any]:
        c: dict[str, Any] = {
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}]}]}}
        if h2:
            c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                **({"common_http_protocol_options": {"max_requests_per_connection": per_conn}} if per_conn else {}),
                "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 100_000}}}}
        return c

    ext_proc = {"name": "envoy.filters.http.ext_proc", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "noop"}, "timeout": "5s"},
        "message_timeout": "2s",
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                            "request_body_mode": "BUFFERED", "response_body_mode": "BUFFERED",
                            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}}}
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "noop",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "fake", "timeout": "10s"}}]}]},
        "http_filters": [ext_proc, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}
    boot: dict[str, Any] = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "in", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                           "filter_chains": [{"filters": [hcm]}]}],
            "clusters": [cluster("noop", server_port, True), cluster("fake", fake_port, False)]}}
    if graceful:
        boot["layered_runtime"] = {"layers": [{"name": "static", "static_layer": GRACEFUL}]}
    return boot


def envoy_counts(admin: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=^cluster\\.noop\\.upstream_", timeout=5) as r:
        stats = dict(line.split(": ", 1) for line in r.read().decode().splitlines() if ": " in line)
    return {"opened": int(stats["cluster.noop.upstream_rq_total"]), "reset": int(stats["cluster.noop.upstream_rq_tx_reset"]),
            "connections": int(stats["cluster.noop.upstream_cx_total"])}


# --------------------------------------------------------------------------- the comparison


def variant(name: str) -> tuple[bool, bool, int]:
    """(graceful, server ends the stream itself, streams per connection or 0)."""
    if name.startswith("rotate-"):
        return False, True, int(name.split("-", 1)[1])
    return {"reset": (False, True, 0), "reset-open": (False, False, 0), "graceful": (True, True, 0),
            "graceful-open": (True, False, 0)}[name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--variants", default="reset,reset-open,graceful,graceful-open,rotate-1000")
    ap.add_argument("--grpcio", default="", help="directories holding other grpcio releases, comma-separated")
    args = ap.parse_args(argv)
    ensure_wrk()
    load_before = os.getloadavg()
    runs = [(v, "") for v in args.variants.split(",") if v] + [("reset", d) for d in args.grpcio.split(",") if d]
    rows: dict[str, list[tuple[int, float]]] = {}
    info: dict[str, dict[str, Any]] = {}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="tollgate-memory-noop-") as name:
        tmp = Path(name)
        fake, fake_port = start_fake(tmp, "plain", ["--api-key", CLIENT_KEY])  # the client's key passes through
        try:
            subjects: dict[str, tuple[int, int, subprocess.Popen[bytes]]] = {}
            for i, (v, overlay) in enumerate(runs):
                graceful, end_itself, per_conn = variant(v)
                port, admin, server_port = free_port(), free_port(), free_port()
                d = tmp / str(i)
                d.mkdir()
                (d / "envoy.yaml").write_text(yaml.safe_dump(
                    bootstrap(port, admin, server_port, fake_port, graceful, per_conn)))
                env = {**os.environ, "PYTHONPATH": overlay}
                server = subprocess.Popen([sys.executable, str(SERVER), str(server_port), "1" if end_itself else "0"], stdout=(d / "server.log").open("ab"),
                                          stderr=subprocess.STDOUT, env=env, cwd=REPO)
                envoy = subprocess.Popen([ENVOY, "-c", str(d / "envoy.yaml"), "--disable-hot-restart", "--concurrency",
                                          "2", "-l", "warning"], stdout=(d / "envoy.log").open("ab"),
                                         stderr=subprocess.STDOUT)
                procs += [server, envoy]
                try:
                    wait_port(server_port, 60)  # the server imports grpcio and the protos first
                except TimeoutError:
                    raise RuntimeError(f"{v}: the server did not start:\n{(d / 'server.log').read_text()[-2000:]}") from None
                wait_ready(admin)
                wait_port(port)
                time.sleep(0.5)
                version = (d / "server.log").read_text().split()[-1]
                label = f"{v}, grpcio {version}"
                subjects[label] = (port, admin, server)
                rows[label] = []
                info[label] = {"failed": 0}
            body = chat_body("bench-plain", stream=False)
            script = wrk_script(tmp / "wrk.lua", body, CLIENT_KEY)
            for label, (port, _, _) in subjects.items():
                status, _, obj = check_once(f"http://127.0.0.1:{port}/v1/chat/completions", body, CLIENT_KEY)
                if status != 200:
                    raise RuntimeError(f"{label} answered {status}: {str(obj)[:300]}")
            for w in range(args.windows):
                for label, (port, _, server) in subjects.items():
                    got = run_wrk(f"http://127.0.0.1:{port}/v1/chat/completions", script, 16, args.window)
                    rows[label].append((int(got["requests"]), rss_mb([server.pid])))
                    info[label]["failed"] += int(sum(got[k] for k in FAILURES))
                    print(f"  window {w + 1} {label:32} {int(got['requests']):6} requests, RSS {rows[label][-1][1]:.1f} MB",
                          file=sys.stderr, flush=True)
            for label, (_, admin, _) in subjects.items():
                info[label].update(envoy_counts(admin))
        finally:
            for p in procs:
                stop_process(p)
            stop_process(fake)
    text = render(rows, info, load_before, os.getloadavg(), args.window)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


def render(rows: dict[str, list[tuple[int, float]]], info: dict[str, dict[str, Any]], before: tuple[float, ...],
           after: tuple[float, ...], window: float) -> str:
    lines = [
        "# A do-nothing grpc.aio ext_proc server's RSS behind Envoy",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `python -m tests.bench.memory_noop`: wrk c=16, windows "
        f"of {window:g} s taken in turn. Load average before {before[0]:.2f} / {before[1]:.2f} / {before[2]:.2f}, after "
        f"{after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f} (2 shared cores).",
        "",
        "| variant | requests after warm-up | failed | streams reset by Envoy / opened | connections | RSS after "
        "warm-up → last (MB) | bytes per request |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, got in rows.items():
        served = sum(n for n, _ in got[1:])
        first, last = got[0][1], got[-1][1]
        i = info[label]
        lines.append(f"| {label} | {served:,} | {i['failed']} | {i.get('reset', 0):,} / {i.get('opened', 0):,} | "
                     f"{i.get('connections', 0)} | {first:.1f} → {last:.1f} | {(last - first) * 1e6 / max(served, 1):.0f} |")
    lines += ["", "Per window (requests / RSS MB):", ""] + [
        f"- {label}: " + ", ".join(f"{n} / {r:.1f}" for n, r in got) for label, got in rows.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
