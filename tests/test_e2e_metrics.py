"""Metrics as an SRE reads them: a real /metrics scrape after real traffic through Envoy."""

from __future__ import annotations

import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import providers_for
from tests.fake_provider import Behaviour

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "count to ten"}]


@pytest.fixture
def gw(gateway, fake_openai, fake_anthropic):
    return gateway({
        "providers": providers_for(fake_openai, None, fake_anthropic),
        "models": {
            "gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"},
                                   {"provider": "anthropic", "model": "claude-sonnet-4-5"}]},
        },
    })


def scrape(gw) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def settled(gw, name, expected, **labels):
    deadline = time.monotonic() + 5
    while True:
        samples = scrape(gw)
        if value(samples, name, **labels) >= expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def bucket_count(samples, name, le, **labels) -> float:
    return value(samples, name + "_bucket", le=le, **labels)


def test_ttft_and_tpot_land_in_the_right_buckets(gw, fake_openai):
    # 0.3 s to the first token, then 20 tokens 50 ms apart: TPOT ≈ 0.05 s
    fake_openai.default = Behaviour(reply=" ".join(f"w{i}" for i in range(20)), chunks=20, first_token_delay=0.3,
                                    token_delay=0.05, completion_tokens=20, prompt_tokens=11)
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    s = settled(gw, "gen_ai_server_time_per_output_token_seconds_count", 1)
    labels = {"alias": "gpt-4o", "provider": "openai", "model": "gpt-4o"}
    assert value(s, "gen_ai_server_time_to_first_token_seconds_count", **labels) == 1
    assert bucket_count(s, "gen_ai_server_time_to_first_token_seconds", "0.2", **labels) == 0
    assert bucket_count(s, "gen_ai_server_time_to_first_token_seconds", "0.5", **labels) == 1
    assert bucket_count(s, "gen_ai_server_time_per_output_token_seconds", "0.03", **labels) == 0
    assert bucket_count(s, "gen_ai_server_time_per_output_token_seconds", "0.075", **labels) == 1
    assert value(s, "gen_ai_server_request_duration_seconds_count", outcome="success", **labels) == 1


def test_token_counters_equal_what_the_provider_reported(gw, fake_openai):
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    fake_openai.behaviours.extend([Behaviour(prompt_tokens=100, completion_tokens=7),
                                   Behaviour(prompt_tokens=50, completion_tokens=3)])
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    s = settled(gw, "tollgate_tokens_total", 160, token_type="input")
    assert value(s, "tollgate_tokens_total", token_type="input", alias="gpt-4o") == 150
    assert value(s, "tollgate_tokens_total", token_type="output", alias="gpt-4o") == 10
    assert sum(u["prompt_tokens"] for u in fake_openai.usage_log) == 150
    assert value(s, "gen_ai_client_token_usage_tokens_count", token_type="output") == 2
    assert value(s, "tollgate_cache_lookups_total", result="bypass") == 2


def test_a_fallback_increments_the_fallback_and_upstream_error_metrics(gw, fake_openai, fake_anthropic):
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    fake_openai.behaviours.append(Behaviour(status=503))
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    s = settled(gw, "tollgate_fallback_attempts_total", 1)
    # The outcome stage reads the primary's 503 before Envoy retries: the fallback is counted with why; as
    # upstream errors the gateway counts only the answers that reach the client.
    assert value(s, "tollgate_fallback_attempts_total", alias="gpt-4o", from_provider="openai",
                 reason="5xx") == 1
    assert value(s, "tollgate_upstream_errors_total", provider="openai", kind="5xx") == 0
    assert value(s, "tollgate_requests_total", provider="anthropic", outcome="success") == 1
    # why, Envoy counted: read from its cluster stats when Prometheus scrapes
    fake_openai.behaviours.append(Behaviour(status=429))
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    s = settled(gw, "tollgate_fallback_reasons_total", 2)
    assert value(s, "tollgate_fallback_reasons_total", alias="gpt-4o", reason="5xx") == 1
    assert value(s, "tollgate_fallback_reasons_total", alias="gpt-4o", reason="429") == 1


def test_refused_requests_are_counted_without_unbounded_labels(gw):
    gw.raw("POST", "/v1/chat/completions", b'{"model": "no-such-model-123", "messages": []}')
    gw.raw("POST", "/v1/chat/completions", b"{broken")
    s = settled(gw, "tollgate_requests_total", 2, outcome="client_error")
    assert value(s, "tollgate_requests_total", outcome="client_error", error_type="model_not_found") == 1
    assert value(s, "tollgate_requests_total", outcome="client_error", error_type="invalid_json") == 1
    assert not any("no-such-model-123" in str(k) for k in s)


def test_the_gateway_overhead_is_measured(gw, fake_openai):
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    s = settled(gw, "tollgate_gateway_overhead_seconds_count", 3)
    assert value(s, "tollgate_gateway_overhead_seconds_count", alias="gpt-4o") == 3
    assert 0 < value(s, "tollgate_gateway_overhead_seconds_sum", alias="gpt-4o") < 3


def test_buffered_answers_carry_their_token_counts_in_headers(gw, fake_openai):
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    fake_openai.default = Behaviour(prompt_tokens=21, completion_tokens=4)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert (raw.headers["x-tollgate-input-tokens"], raw.headers["x-tollgate-output-tokens"]) == ("21", "4")
    assert raw.headers["x-tollgate-cache"] == "bypass"


def test_money_is_priced_from_the_providers_usage(gw, fake_openai):
    """gpt-4o at the shipped list price: $2.50 in and $10 out per 1M tokens."""
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    fake_openai.default = Behaviour(prompt_tokens=1000, completion_tokens=200)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.headers["x-tollgate-cost-usd"] == "0.004500"
    list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))  # no header, still counted
    s = settled(gw, "tollgate_cost_usd_total", 0.009)
    assert abs(value(s, "tollgate_cost_usd_total", alias="gpt-4o", provider="openai") - 0.009) < 1e-9
