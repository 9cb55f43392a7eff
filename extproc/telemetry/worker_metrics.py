"""One /metrics for several ext_proc workers: each worker exposes its own registry, the supervisor sums them.

Why not prometheus_client's multiprocess mode: it needs an environment
variable set before the first import, a directory of memory-mapped files per
process that grows with every restarted worker, and it cannot host a custom
collector (the Envoy stats reader). Here each worker keeps its ordinary
in-memory registry and answers on a unix socket in the runtime directory
(connect, read the text exposition, done); the supervisor serves the
configured metrics address and, at scrape time, reads every worker and adds
them up, on the metrics server's thread, never on an event loop.

How series combine: counters and histograms (buckets, sums, counts) are
summed, so a request counted by either worker is counted once in the total.
Gauges are per-sidecar views that workers share rather than split: cache
entries (each worker's copy of the same index) take the largest value, money
left in a budget the smallest (the freshest view of a shrinking amount). A
worker that is down (restarting) is missing from that one scrape; its
counters restart from zero in its replacement, which Prometheus's ``rate``
treats as a counter reset.
"""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import threading
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

SMALLEST_GAUGES = frozenset({"tollgate_budget_remaining_usd"})


def socket_path(runtime_dir: str, worker: int) -> str:
    return os.path.join(runtime_dir, f"metrics-{worker}.sock")


class WorkerExposition:
    """A worker's registry, answered in the text format to whoever connects to ``path``."""

    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by the worker this one replaces

        class Answer(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.sendall(generate_latest(registry))

        self._server = socketserver.ThreadingUnixStreamServer(path, Answer)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="worker-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def read_worker(path: str, timeout: float = 1.0) -> str:
    """One worker's exposition ('' if it is not there: down or restarting)."""
    chunks: list[bytes] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
    except OSError:
        return ""
    return b"".join(chunks).decode("utf-8", "replace")


class WorkerSum(Collector):
    """Every worker's series, combined (see the module's docstring for how)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._paths = list(paths)

    def collect(self) -> Iterator[Metric]:
        return iter(combine(read_worker(p) for p in self._paths))


def combine(texts: Iterator[str] | Sequence[str]) -> list[Metric]:
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            series = values.setdefault(family.name, {})
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # per-process creation times: meaningless once summed
                key = (sample.name, tuple(sorted(sample.labels.items())))
                series[key] = _merge(family, series.get(key), sample.value)
    out = []
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
        out.append(family)
    return out


def _merge(family: Metric, old: float | None, new: float) -> float:
    if old is None:
        return new
    if family.type == "gauge":
        return min(old, new) if family.name in SMALLEST_GAUGES else max(old, new)
    return old + new
