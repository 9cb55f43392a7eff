"""Why attempts failed over, as Envoy counted it, read at scrape time.

A failed attempt goes straight to Envoy's retry without passing through the
ext_proc server, so the gateway cannot see why it failed; Envoy's own cluster
statistics can. This collector reads them from the Envoy admin endpoint (on
loopback) when Prometheus scrapes, on the metrics thread, never on the gRPC
event loop, and exposes them as ``tollgate_fallback_reasons_total{alias,reason}``:

* ``5xx`` / ``429``: the status of answers that made Envoy retry (the alias cluster's
  ``retry.upstream_rq_5xx`` and ``retry.upstream_rq_429``);
* ``timeout``: no response headers within the per-try timeout;
* ``first_byte_timeout``: no byte within the per-try idle timeout;
* ``connect_failure``: a target refused or did not accept the connection.

An Envoy that does not answer within half a second costs the scrape nothing but
this family's samples.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from extproc.config import GatewayConfig

NAME = "tollgate_fallback_reasons"
HELP = "Failed attempts that made Envoy try the next target, by alias and why (from Envoy's cluster stats)."
_ALIAS_STATS = {
    "retry.upstream_rq_5xx": "5xx",
    "retry.upstream_rq_429": "429",
    "upstream_rq_per_try_timeout": "timeout",
    "upstream_rq_per_try_idle_timeout": "first_byte_timeout",
}


def _stat_name(cluster: str) -> str:
    return cluster.replace(":", "_")  # Envoy's stat names cannot hold ':'


class FallbackReasons(Collector):
    def __init__(self, cfg: GatewayConfig, timeout: float = 0.5) -> None:
        admin = cfg.envoy.admin
        self._url = None if admin.unix_socket else f"http://{admin.host}:{admin.port}/stats?format=json&filter=%5Ecluster%5C."
        self._timeout = timeout
        self._aliases = {_stat_name(f"alias:{a}"): a for a in cfg.models}
        self._targets = {_stat_name(f"target:{a}#{i}"): a for a, m in cfg.models.items() for i in range(len(m.targets))}

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(NAME, HELP, labels=("alias", "reason"))

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(NAME, HELP, labels=("alias", "reason"))
        for (alias, reason), value in sorted(self.read().items()):
            family.add_metric((alias, reason), value)
        yield family

    def read(self) -> dict[tuple[str, str], float]:
        if self._url is None:
            return {}
        try:
            with urllib.request.urlopen(self._url, timeout=self._timeout) as r:
                stats = json.load(r).get("stats", [])
        except (OSError, ValueError):
            return {}
        out: dict[tuple[str, str], float] = {}
        for s in stats:
            name, value = s.get("name", ""), s.get("value")
            if not isinstance(value, (int, float)) or not name.startswith("cluster."):
                continue
            cluster, _, stat = name[len("cluster."):].partition(".")
            if cluster in self._aliases and stat in _ALIAS_STATS:
                key = (self._aliases[cluster], _ALIAS_STATS[stat])
            elif cluster in self._targets and stat == "upstream_cx_connect_fail":
                key = (self._targets[cluster], "connect_failure")
            else:
                continue
            out[key] = out.get(key, 0.0) + value
        return out
