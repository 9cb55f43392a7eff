"""What the injector costs per pod: the review itself, and a whole HTTPS round trip.

    python -m tests.bench.injector --out tests/bench/injector.md

(a) ``review()`` in-process on the example app's Deployment pod: the decision, the injection and the
patch; (b) the same pod as an AdmissionReview posted over TLS to `tollgate injector` running in its own
process, one keep-alive connection, one request at a time (what the API server waits for); (c) four
client threads at once, for the throughput of one replica on this machine. (b) and (c) run with
asyncio's event loop and with uvloop (`TOLLGATE_NO_UVLOOP` chooses) in rotated rounds. Bounded: a fixed number of requests, loopback only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trustme
import yaml

from extproc.kube.admission import InjectorPolicy, review
from tests.harness import free_port
from tests.kube.test_admission import admission_review

ROOT = Path(__file__).resolve().parents[2]
HOST = "tollgate-injector.tollgate-system.svc"


def example_pod() -> dict:
    (dep,) = [d for d in yaml.safe_load_all((ROOT / "k8s/examples/app.yaml").read_text()) if d["kind"] == "Deployment"]
    t = dep["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {**t["metadata"], "generateName": "chat-app-"},
            "spec": t["spec"]}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def in_process(n: int) -> list[float]:
    policy = InjectorPolicy()
    bodies = [admission_review(example_pod()) for _ in range(n)]
    out = []
    for b in bodies:
        t = time.perf_counter()
        review(b, policy)
        out.append(time.perf_counter() - t)
    return out


def client(port: int, ca: trustme.CA, n: int) -> list[float]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    conn = http.client.HTTPSConnection(HOST, port, context=ctx, timeout=10)
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the API server's Go client does
    conn.sock = ctx.wrap_socket(raw, server_hostname=HOST)
    out = []
    for _ in range(n):
        body = admission_review(example_pod())
        t = time.perf_counter()
        conn.request("POST", "/inject", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        out.append(time.perf_counter() - t)
        assert doc["response"]["patchType"] == "JSONPatch"
    conn.close()
    return out


def over_https(n: int, threads: int, loop: str) -> tuple[list[float], float]:
    """Against `tollgate injector` in its own process (the client's threads must not share its GIL)."""
    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as tmp:
        leaf = ca.issue_cert(HOST)
        Path(tmp, "tls.crt").write_bytes(leaf.cert_chain_pems[0].bytes())
        Path(tmp, "tls.key").write_bytes(leaf.private_key_pem.bytes())
        port, health = free_port(), free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "extproc", "injector", "--tls-cert", f"{tmp}/tls.crt", "--tls-key",
             f"{tmp}/tls.key", "--host", "127.0.0.1", "--port", str(port), "--health-port", str(health),
             "--shutdown-delay", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, **({"TOLLGATE_NO_UVLOOP": "1"} if loop == "asyncio" else {})})
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=1).read()
                    break
                except OSError:
                    assert time.monotonic() < deadline and server.poll() is None, "the injector did not start"
                    time.sleep(0.1)
            client(port, ca, 50)  # warm-up
            t = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                parts = list(pool.map(lambda _: client(port, ca, n // threads), range(threads)))
            wall = time.perf_counter() - t
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(10)
    return [x for p in parts for x in p], (n // threads * threads) / wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/bench/injector.md")
    ap.add_argument("-n", type=int, default=600, help="requests per HTTPS measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    a = in_process(2000)
    ms = 1000.0
    lines = [
        "# Injector: cost per pod",
        "",
        f"`python -m tests.bench.injector` on {platform.machine()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the start (other work shares them). "
        "The example app's Deployment pod. HTTPS rows: `tollgate injector` in its own process, asyncio's and "
        f"uvloop's event loop in turn, {args.rounds} rotated rounds; the medians of the rounds' figures.",
        "",
        "| what | requests | p50 ms | p99 ms | reviews/s |",
        "|---|---:|---:|---:|---:|",
        f"| review() in-process | {len(a)} | {statistics.median(a) * ms:.2f} | {pct(a, 0.99) * ms:.2f} | "
        f"{len(a) / sum(a):,.0f} |",
    ]
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for r in range(args.rounds):
        order = ["asyncio", "uvloop"] if r % 2 == 0 else ["uvloop", "asyncio"]
        for threads in (1, 4):
            for loop in order:
                xs, rate = over_https(args.n, threads, loop)
                results.setdefault((loop, threads), []).append((statistics.median(xs), pct(xs, 0.99), rate))
    for (loop, threads), rs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        p50, p99, rate = (statistics.median(x[i] for x in rs) for i in range(3))
        lines.append(f"| HTTPS, {loop}, {threads} connection{'s' if threads > 1 else ''} | {args.n} × {len(rs)} | "
                     f"{p50 * ms:.2f} | {p99 * ms:.2f} | {rate:,.0f} |")
    lines.append("")
    lines.append(f"Load average at the end: {os.getloadavg()[0]:.1f}.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
