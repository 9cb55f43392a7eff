"""Where a stream's first token spends its time: one stream at a time, timed at every hop.

    python -m tests.bench.streams_trace [--target base,full,observe] [--streams 40] [--gap 0] [--out FILE]

Four clocks, all the machine's wall clock (``time.time()``; Envoy's ``%START_TIME%``), so the hops
line up on one axis, measured from the moment the client sent its request:

  client   a raw HTTP/1.1 socket (TCP_NODELAY, keep-alive): request sent, response headers read,
           first content event read
  Envoy    an access log with Envoy's own timepoints (``%COMMON_DURATION%`` in µs): request read,
           first byte sent upstream, first byte from upstream, first byte to the client
  Python   the real ext_proc server (``tollgate extproc``'s code), with every message Envoy sends
           and every answer timed as the server's loop sees them (a subclass of the servicer that
           wraps its two iterators; nothing else changes)
  fake     the real fake provider (tests/fake_provider.py, 50 chunks 1.2 ms apart), with its
           request arrival and every write to the socket timed (aiohttp's writer, wrapped)

The same client also times the fake directly (no gateway) in the same run, as the reference,
alternating stream by stream. One stream at a time (c=1), back to back as in the pipeline bench
(``--gap`` adds idle time between streams): the order of events is then unambiguous. Each row is
the median over the streams of that event's time; a second table gives the server's own time per
message (the synchronous part of its handler, timed around the dispatch).

Every process started here is stopped again; every port is free and on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
ENVOY_FORMAT = (
    "%START_TIME(%s.%6f)% %COMMON_DURATION(DS_RX_BEG:DS_RX_END:us)% %COMMON_DURATION(DS_RX_BEG:US_TX_BEG:us)% "
    "%COMMON_DURATION(DS_RX_BEG:US_RX_BEG:us)% %COMMON_DURATION(DS_RX_BEG:DS_TX_BEG:us)% "
    "%COMMON_DURATION(DS_RX_BEG:US_RX_END:us)% %COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%\n"
)
ENVOY_FIELDS = ("request read", "upstream request sent", "upstream first byte", "client first byte",
                "upstream last byte", "client last byte")


# --------------------------------------------------------------------------- the traced processes


def _dump_at_exit(events: list[tuple[Any, ...]], path: str) -> None:
    def dump() -> None:
        Path(path).write_text("\n".join(json.dumps(e) for e in events) + "\n")
    atexit.register(dump)


def serve_fake(port: int, trace: str, api_key: str) -> None:
    """The fake provider with its request arrivals and socket writes timed."""
    import signal

    from aiohttp import http_writer

    sys.path.insert(0, str(REPO / "tests"))
    import fake_provider as fp

    events: list[tuple[Any, ...]] = []
    _dump_at_exit(events, trace)
    write, writelines = http_writer.StreamWriter._write, http_writer.StreamWriter._writelines

    def timed_write(self: Any, chunk: Any) -> None:  # timed as the bytes are handed to the socket
        events.append((time.time(), "fake", "write", len(chunk)))
        write(self, chunk)

    def timed_writelines(self: Any, chunks: Any) -> None:
        chunks = list(chunks)
        events.append((time.time(), "fake", "write", sum(len(c) for c in chunks)))
        writelines(self, chunks)

    http_writer.StreamWriter._write = timed_write  # type: ignore[method-assign]
    http_writer.StreamWriter._writelines = timed_writelines  # type: ignore[method-assign]
    dispatch = fp.FakeProvider._dispatch

    async def timed_dispatch(self: Any, request: Any) -> Any:
        events.append((time.time(), "fake", "request", 0))
        return await dispatch(self, request)

    fp.FakeProvider._dispatch = timed_dispatch  # type: ignore[method-assign]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fp.main(["--kind", "openai", "--port", str(port), "--api-key", api_key, "--chunks", "50",
             "--token-delay", "0.0012"])


def serve_extproc(config: str, runtime: str, trace: str) -> None:
    """``tollgate extproc`` with every message in and every answer out timed."""
    from extproc import cli
    from extproc.pipeline import server

    events: list[tuple[Any, ...]] = []
    _dump_at_exit(events, trace)

    class Traced(server.ExternalProcessor):
        async def _serve(self, ex: Any, requests: Any) -> Any:  # type: ignore[override]
            async def arriving() -> Any:
                async for req in requests:
                    phase = req.WhichOneof("request")
                    size = len(req.response_body.body) if phase == "response_body" else 0
                    events.append((time.time(), "python", "in " + phase, size))
                    yield req

            async for answer in super()._serve(ex, arriving()):
                events.append((time.time(), "python", "out " + answer.WhichOneof("response"), 0))
                yield answer

    dispatch = server.dispatch

    def timed_dispatch(p: Any, phase: str | None, req: Any) -> Any:
        started = time.perf_counter()
        try:
            return dispatch(p, phase, req)
        finally:
            events.append((time.time(), "python", f"work {phase}", int((time.perf_counter() - started) * 1e6)))

    server.dispatch = timed_dispatch
    server.ExternalProcessor = Traced  # type: ignore[misc]
    cli.main(["extproc", "--config", config, "--runtime-dir", runtime])


# --------------------------------------------------------------------------- the client


class Client:
    """One keep-alive HTTP/1.1 connection; reads a chunked SSE answer and times it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def stream(self, path: str, body: bytes, bearer: str) -> dict[str, float]:
        head = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                f"authorization: Bearer {bearer}\r\ncontent-length: {len(body)}\r\n\r\n").encode()
        t = {"client sent": time.time()}
        self.sock.sendall(head + body)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self._recv()
        t["client headers"] = time.time()
        status = buf.split(b" ", 2)[1]
        if status != b"200":
            raise RuntimeError(f"HTTP {status!r}: {buf[:500]!r}")
        while b'"content":"' not in buf.replace(b'"content":""', b""):
            buf += self._recv()
        t["client first content"] = time.time()
        while not buf.endswith(b"0\r\n\r\n"):
            buf += self._recv()
        t["client done"] = time.time()
        return t

    def _recv(self) -> bytes:
        got = self.sock.recv(65536)
        if not got:
            raise RuntimeError("connection closed")
        return got

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- the run


def _wait_port(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port}")


def _wait_path(path: Path, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(str(path))
        time.sleep(0.05)


def _stop(p: subprocess.Popen[bytes] | None) -> None:
    if p is not None and p.poll() is None:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _envoy_yaml(tollgate: str, config: Path, env: dict[str, str], out: Path, log: Path) -> Path:
    rendered = subprocess.run([tollgate, "render-envoy", "--config", str(config)], check=True,
                              capture_output=True, env=env).stdout
    boot = yaml.safe_load(rendered)
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.setdefault("access_log", []).append({
        "name": "envoy.access_loggers.file",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                         "path": str(log), "log_format": {"text_format_source": {"inline_string": ENVOY_FORMAT}}},
    })
    out.write_text(yaml.safe_dump(boot))
    return out


def _events(path: Path) -> list[tuple[float, str, str, int]]:
    if not path.exists():
        return []
    return [tuple(json.loads(line)) for line in path.read_text().splitlines() if line]  # type: ignore[misc]


def _envoy_events(path: Path) -> list[tuple[float, str, str, int]]:
    out: list[tuple[float, str, str, int]] = []
    for line in path.read_text().splitlines():
        start, *durations = line.split()
        t0 = float(start)
        out.append((t0, "envoy", "request begins", 0))
        for name, d in zip(ENVOY_FIELDS, durations):
            if d != "-":
                out.append((t0 + int(d) / 1e6, "envoy", name, 0))
    return out


def _steps(clients: list[dict[str, float]], others: list[tuple[float, str, str, int]]) -> list[dict[str, float]]:
    """Per stream: every event's time after the client sent, in ms; the n-th occurrence of a name is suffixed."""
    per: list[dict[str, float]] = []
    others = sorted(others)
    for i, c in enumerate(clients):
        t0 = c["client sent"]
        end = clients[i + 1]["client sent"] if i + 1 < len(clients) else float("inf")
        row = {k: (v - t0) * 1000 for k, v in c.items()}
        seen: dict[str, int] = {}
        for t, who, what, size in others:
            if what.startswith("work ") and t0 <= t < end:
                name = f"{who}: {what}"
                seen[name] = seen.get(name, 0) + 1
                if seen[name] <= 3:
                    row[f"{name} #{seen[name]} µs"] = size / 1000  # shown in µs by render
                continue
            if t0 <= t < end:
                name = f"{who}: {what}"
                seen[name] = seen.get(name, 0) + 1
                n = seen[name]
                if n > 3:  # the first three of a kind say what the first token waits for
                    continue
                row[name if n == 1 else f"{name} #{n}"] = (t - t0) * 1000
        per.append(row)
    return per


def _median_rows(per: list[dict[str, float]]) -> list[tuple[str, float, int]]:
    names: dict[str, list[float]] = {}
    for row in per:
        for k, v in row.items():
            names.setdefault(k, []).append(v)
    rows = [(k, statistics.median(v), len(v)) for k, v in names.items()]
    return sorted(rows, key=lambda r: r[1])


def run(target: str, streams: int, gap: float, tmp: Path, unix: bool = False) -> tuple[list[tuple[str, float, int]], list[tuple[str, float, int]]]:
    from tests.bench.pipeline import PACED, UPSTREAM_KEY, configs
    from tests.bench.run import KEY_ENV, chat_body
    from tests.harness import ENVOY, TOLLGATE, Gateway, free_port, wait_ready
    from tests.quota.redis_process import RedisProcess

    procs: list[subprocess.Popen[bytes]] = []
    redis = RedisProcess(tmp / "redis").start() if target in ("full", "observe") else None
    try:
        fake_port = free_port()
        fake_trace = tmp / "fake.jsonl"
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.bench.streams_trace", "--serve-fake",
                                       str(fake_port), str(fake_trace), UPSTREAM_KEY], cwd=REPO,
                                      stdout=(tmp / "fake.log").open("ab"), stderr=subprocess.STDOUT))
        _wait_port(fake_port)
        ports = {k: fake_port for k in ("openai-plain", "openai-paced", "anthropic-plain", "anthropic-paced")}
        cfgs, token = configs(ports, tmp, redis.url if redis else "redis://127.0.0.1:1")
        gdir = tmp / "gw"
        gdir.mkdir()
        cfg = {**cfgs[target], **({"extproc_unix_socket": str(tmp / "extproc.sock")} if unix else {})}
        gw = Gateway(gdir, cfg, env={KEY_ENV: UPSTREAM_KEY, "XDG_STATE_HOME": str(gdir / "state")})
        (gdir / "runtime").mkdir()
        py_trace, envoy_log = tmp / "python.jsonl", tmp / "envoy-access.log"
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.bench.streams_trace", "--serve-extproc",
                                       str(gw.config_path), str(gdir / "runtime"), str(py_trace)], cwd=REPO,
                                      env=gw.env, stdout=(tmp / "python.log").open("ab"), stderr=subprocess.STDOUT))
        if unix:
            _wait_path(tmp / "extproc.sock")
        else:
            _wait_port(gw.extproc_port)
        conf = _envoy_yaml(TOLLGATE, gw.config_path, gw.env, tmp / "envoy.yaml", envoy_log)
        procs.append(subprocess.Popen([ENVOY, "-c", str(conf), "--disable-hot-restart", "--concurrency", "2",
                                       "-l", "warning"], stdout=(tmp / "envoy.log").open("ab"), stderr=subprocess.STDOUT))
        wait_ready(gw.admin_port)
        _wait_port(gw.port)
        body = chat_body(PACED, stream=True)
        bearer = token if target in ("full", "observe") else "sk-bench-client-not-forwarded"
        via, direct = Client(gw.port), Client(fake_port)
        upstream_body = chat_body("gpt-4o-mini", stream=True)
        for _ in range(5):  # warm-up: connections, caches, the JWT
            via.stream("/v1/chat/completions", body, bearer)
            direct.stream("/v1/chat/completions", upstream_body, UPSTREAM_KEY)
        time.sleep(0.2)
        mark = time.time()
        gw_runs, direct_runs = [], []
        for _ in range(streams):  # alternate, so the machine's noise falls on both alike
            gw_runs.append(via.stream("/v1/chat/completions", body, bearer))
            time.sleep(gap)
            direct_runs.append(direct.stream("/v1/chat/completions", upstream_body, UPSTREAM_KEY))
            time.sleep(gap)
        via.close()
        direct.close()
    finally:
        for p in reversed(procs):
            _stop(p)
        if redis is not None:
            redis.stop()
    others = [e for e in _events(fake_trace) + _events(py_trace) + _envoy_events(envoy_log) if e[0] >= mark - 0.001]
    gw_others = [e for e in others if any(r["client sent"] - 0.0005 <= e[0] <= r["client done"] for r in gw_runs)]
    d_others = [e for e in others if e[1] == "fake" and
                any(r["client sent"] - 0.0005 <= e[0] <= r["client done"] for r in direct_runs)]
    return _median_rows(_steps(gw_runs, gw_others)), _median_rows(_steps(direct_runs, d_others))


def render(target: str, streams: int, gap: float, unix: bool, via: list[tuple[str, float, int]], direct: list[tuple[str, float, int]],
           load: str) -> str:
    lines = [f"## `{target}`{' (ext_proc over a unix socket)' if unix else ''}: {streams} streams, one at a time, {gap * 1000:g} ms apart, alternating with the fake "
             "alone", "",
             "| ms after the client sent (median) | through the gateway | | fake alone |",
             "|---|---:|---|---:|"]
    d = {k: v for k, v, _ in direct}
    work = [(name, v) for name, v, _ in via if name.endswith(" µs")]
    via = [r for r in via if not r[0].endswith(" µs")]
    for name, v, n in via:
        if "#" in name and "python" not in name and "fake: write" not in name:
            continue
        ref = f"{d[name]:.3f}" if name in d else ""
        lines.append(f"| {name}{'' if n == streams else f' (in {n})'} | {v:.3f} | | {ref} |")
    lines += ["", "| the Python server's own time per message (median µs; `#n`: n-th of its kind) | µs |", "|---|---:|"]
    lines += [f"| {name.removesuffix(' µs').removeprefix('python: work ')} | {v * 1000:.0f} |"
              for name, v in sorted(work)]
    first = {k: v for k, v, _ in via}.get("client first content", float("nan"))
    lines += ["", f"First content added by the gateway: {first - d.get('client first content', float('nan')):.3f} ms "
              f"(load average {load}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="base,full,observe", help="pipeline bench targets, comma-separated")
    ap.add_argument("--streams", type=int, default=40)
    ap.add_argument("--gap", type=float, default=0.0, help="seconds between streams (0: back to back, as the bench)")
    ap.add_argument("--unix", action="store_true", help="Envoy reaches the ext_proc server over a unix socket")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--serve-fake", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--serve-extproc", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_fake:
        serve_fake(int(args.serve_fake[0]), args.serve_fake[1], args.serve_fake[2])
        return 0
    if args.serve_extproc:
        serve_extproc(*args.serve_extproc)
        return 0
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    parts = ["# Where a stream's first token spends its time (`python -m tests.bench.streams_trace`)", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; load average at start {load}; 2 cores shared. "
             "Times are medians, in ms after the client sent its request; `#2` is the second of a kind.", ""]
    for target in args.target.split(","):
        with tempfile.TemporaryDirectory(prefix="tollgate-trace-") as name:
            via, direct = run(target, args.streams, args.gap, Path(name), args.unix)
        parts.append(render(target, args.streams, args.gap, args.unix, via, direct, " ".join(f"{x:.2f}" for x in os.getloadavg())))
    text = "\n".join(parts)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
