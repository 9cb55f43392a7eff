"""The Grafana dashboard asks only for metrics the gateway exposes, under the names it exposes them.

Every PromQL expression in k8s/grafana-dashboard.json (panels and variables) is taken apart into metric
names; those are checked against the gateway's own registry and, end to end, against a real /metrics
scrape after a little real traffic through Envoy.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.cache.metrics import CacheMetrics
from extproc.config import parse_config
from extproc.telemetry.metrics import Metrics
from tests.conftest import providers_for
from tests.fake_provider import Behaviour

DASHBOARD = Path(__file__).resolve().parent.parent / "k8s" / "grafana-dashboard.json"
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
FUNCTIONS = {"sum", "min", "max", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "topk",
             "clamp_min", "label_values"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
MESSAGES = [{"role": "user", "content": "hello"}]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row keeps its panels inside
    return out


def expressions(d: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in all_panels(d) for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            exprs.append(v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (strings, matchers, ranges and grouping labels removed)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"\{[^{}]*\}", "{}", s)
    s = re.sub(r"\[[^\[\]]*\]", "[]", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    s = re.sub(r"\blabel_values\((.*),\s*\w+\s*\)", r"label_values(\1)", s)  # its label is not a metric
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\(?)", s):
        word, call = m.group(1), m.group(2)
        if word in KEYWORDS:
            continue
        if call:
            assert word in FUNCTIONS, f"unexpected function {word!r} in {expr}"
        else:
            names.add(word)
    return names


def balanced(expr: str) -> bool:
    stack, pairs = [], {")": "(", "}": "{", "]": "["}
    for ch in re.sub(r'"(?:\\.|[^"\\])*"', '""', expr):
        if ch in "({[":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def names_used() -> dict[str, str]:
    """metric name as queried -> an expression using it."""
    out: dict[str, str] = {}
    for expr in expressions(dashboard()):
        for name in metric_names(expr):
            out.setdefault(name, expr)
    return out


def families_used() -> set[str]:
    """The metric families the dashboard uses: histogram suffixes stripped, ``_total`` kept as exposed."""
    return {HISTOGRAM_SUFFIX.sub("", name) for name in names_used()}


def queryable(families: Any) -> set[str]:
    """The names Prometheus stores for these families: a counter only as X_total, a histogram as
    X_bucket/X_sum/X_count (never bare), a gauge as X."""
    names = set()
    for fam in families:
        if fam.type == "counter":
            names.add(fam.name + "_total")
        elif fam.type == "histogram":
            names.update(fam.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(fam.name)
    return names


def exposed_families(families: Any) -> set[str]:
    """Family names as the dashboard refers to them: counters with ``_total``, the others bare."""
    return {fam.name + "_total" if fam.type == "counter" else fam.name for fam in families}


# --------------------------------------------------------------------------- the file itself


def test_the_metric_name_extraction_itself():
    assert metric_names('histogram_quantile(0.9, sum by (le, model) (rate(a_b_bucket{x=~"$y", z!="rate"}'
                        '[$__rate_interval])))') == {"a_b_bucket"}
    assert metric_names('sum(rate(a_total{q="1"}[5m])) / on (alias) group_left sum by (alias) (b_total)') == {
        "a_total", "b_total"}
    assert metric_names('label_values(c_total{namespace=~"$namespace"}, alias)') == {"c_total"}


def test_the_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable():
    d = dashboard()
    assert d["schemaVersion"] >= 39 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"alias", "provider", "team"} <= set(variables)
    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids))
    for p in all_panels(d):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert balanced(t["expr"]), t["expr"]
            for var in re.findall(r"\$(?:\{)?(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), f"{p['title']}: unknown variable ${var}"


def test_the_dashboard_shows_what_an_sre_asks_for():
    d = dashboard()
    exprs = "\n".join(expressions(d))
    for needle in (
        'sum by (outcome) (rate(tollgate_requests_total',
        "histogram_quantile(0.5, sum by (le) (rate(gen_ai_server_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(gen_ai_server_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(gen_ai_server_request_duration_seconds_bucket",
        "sum by (le, model) (rate(gen_ai_server_time_to_first_token_seconds_bucket",
        "sum by (le, model) (rate(gen_ai_server_time_per_output_token_seconds_bucket",
        "sum by (model, token_type) (rate(tollgate_tokens_total",
        "sum by (team) (increase(tollgate_cost_usd_total",
        'result=~"hit_exact|hit_semantic"',
        "tollgate_fallback_attempts_total",
        "tollgate_quota_rejections_total",
        "tollgate_upstream_errors_total",
        "histogram_quantile(0.99, sum by (le) (rate(tollgate_gateway_overhead_seconds_bucket",
        "histogram_quantile(0.5, sum by (le) (rate(tollgate_gateway_overhead_seconds_bucket",
        "sum by (alias) (increase(tollgate_cache_saved_usd_total",
        "sum by (alias) (increase(tollgate_cache_saved_tokens_total",
    ):
        assert needle in exprs, needle
    spend = next(p for p in all_panels(d) if p["title"] == "Spend per team per day")
    assert "[1d]" in spend["targets"][0]["expr"] and spend["interval"] == "1d"


def registry(*, cache: bool = False) -> list[Any]:
    """The gateway's own series; ``cache``: with those a ``cache:`` section adds (extproc/cache/metrics.py)."""
    cfg = parse_config("providers: {p: {type: demo}}\nmodels: {m: {targets: [{provider: p, model: x}]}}\n", env={})
    metrics = Metrics(cfg)
    if cache:
        CacheMetrics(metrics.registry)
    return list(metrics.registry.collect())


def test_every_metric_the_dashboard_queries_is_registered_by_the_gateway():
    known = queryable(registry(cache=True))
    unknown = {name: expr for name, expr in names_used().items() if name not in known}
    assert not unknown, f"names the gateway does not expose (a counter needs _total, a histogram a suffix): {unknown}"


def test_every_metric_family_of_the_gateway_has_a_panel():
    assert exposed_families(registry()) - families_used() == set()


# --------------------------------------------------------------------------- end to end


def scrape_families(port: int) -> list[Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return list(text_string_to_metric_families(r.read().decode()))


def count(families: list[Any], sample: str) -> float:
    return sum(s.value for f in families for s in f.samples if s.name == sample)


@pytest.mark.e2e
def test_every_family_a_query_uses_is_in_a_real_scrape(gateway, fake_openai, fake_anthropic):
    gw = gateway({
        "providers": providers_for(fake_openai, None, fake_anthropic),
        "models": {"gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"},
                                          {"provider": "anthropic", "model": "claude-sonnet-4-5"}]},
                   "cached": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}},
        "cache": {"mode": "exact", "aliases": {"gpt-4o": "off"}},  # the calls below must reach the providers
    })
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    fake_openai.default = Behaviour(chunks=6, token_delay=0.01, prompt_tokens=9, completion_tokens=6)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # a plain call
    list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))  # a stream
    fake_openai.behaviours.append(Behaviour(status=503))  # a fallback from a 503
    assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content
    # every target fails: the gateway sees the last one's 503 (the upstream-error panel counts what it sees)
    fake_openai.behaviours.append(Behaviour(status=503))
    fake_anthropic.behaviours.append(Behaviour(status=503))
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert gw.raw("POST", "/v1/chat/completions", b"{not json")[0] == 400  # a bad request
    deadline = time.monotonic() + 5  # the savings panel: an answer stored, then served from the cache
    while client.chat.completions.with_raw_response.create(
            model="cached", messages=MESSAGES).headers["x-tollgate-cache"] != "hit-exact":
        assert time.monotonic() < deadline, "the answer was never stored"
        time.sleep(0.05)

    deadline = time.monotonic() + 5
    while True:
        families = scrape_families(gw.metrics_port)
        if count(families, "tollgate_requests_total") >= 7 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    missing = families_used() - exposed_families(families)
    assert not missing, f"the dashboard uses families the gateway does not expose: {missing}"
    wrong = {name: expr for name, expr in names_used().items() if name not in queryable(families)}
    assert not wrong, f"names Prometheus would not find: {wrong}"
    # and the traffic above gave the main panels something to draw
    for sample, at_least in {
        "tollgate_requests_total": 5,
        "gen_ai_server_request_duration_seconds_count": 3,
        "gen_ai_server_time_to_first_token_seconds_count": 1,
        "gen_ai_server_time_per_output_token_seconds_count": 1,
        "tollgate_tokens_total": 1,
        "gen_ai_client_token_usage_tokens_count": 1,
        "tollgate_fallback_attempts_total": 1,
        "tollgate_upstream_errors_total": 1,
        "tollgate_cache_lookups_total": 3,
        "tollgate_cache_saved_tokens_total": 1,
        "tollgate_cache_saved_usd_total": 1e-9,
        "tollgate_gateway_overhead_seconds_count": 1,
    }.items():
        assert count(families, sample) >= at_least, sample
