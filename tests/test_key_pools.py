"""Key pools and fallback policy: several keys per provider, refused keys left out, statuses operators choose.

The pool itself is specified with an injected clock; the rest end to end: a real Envoy, the real gateway,
the real ``openai`` SDK, fake providers that check keys as the real APIs do.
"""

from __future__ import annotations

import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.credentials.key_pool import KeyPool
from tests.helpers import ANTHROPIC_KEY, OPENAI_KEY, providers_for
from tests.fake_provider import Behaviour

ASK = [{"role": "user", "content": "Say hello."}]
REVOKED = "sk-revoked-2b9e11"
OTHER = "sk-second-key-77c0d4"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pool(*values: str, quarantine: float = 60.0, clock: Clock | None = None) -> KeyPool:
    box = {f"K{i}": v for i, v in enumerate(values)}
    return KeyPool([((lambda n=n: box[n]), f"env:{n}") for n in box], quarantine, clock or Clock())


# --------------------------------------------------------------------------- the pool


def test_requests_take_the_keys_in_turn():
    p = pool("a", "b", "c")
    assert [p.pick().value for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_a_refused_key_is_left_out_until_its_quarantine_ends():
    clock = Clock()
    p = pool("a", "b", quarantine=60, clock=clock)
    assert p.quarantine(0) and not p.quarantine(0)  # the second report of the same key changes nothing
    assert {p.pick().value for _ in range(4)} == {"b"}
    assert p.pick(exclude=[1]) is None and p.insist(exclude=[1]).value == "a"  # insisting: the refused key again
    clock.now += 61
    assert {p.pick().value for _ in range(4)} == {"a", "b"}


def test_a_rotated_key_is_a_new_chance_at_once():
    box = {"v": "old"}
    p = KeyPool([(lambda: box["v"], "file:/run/key")], 600, Clock())
    p.quarantine(0)
    assert p.pick() is None
    box["v"] = "new"  # the Secret file was rotated
    assert p.pick().value == "new"


def test_a_rate_limited_key_cools_down_and_the_soonest_ready_is_used_when_all_are_cooling():
    clock = Clock()
    p = pool("a", "b", clock=clock)
    p.cool_down(0, 30)
    assert {p.pick().value for _ in range(4)} == {"b"}
    p.cool_down(1, 10)
    assert {p.pick().value for _ in range(4)} == {"b"}  # both cooling: b is ready first
    clock.now += 31
    assert {p.pick().value for _ in range(4)} == {"a", "b"}


def test_keys_this_request_already_tried_are_skipped_and_an_empty_pool_gives_none():
    p = pool("a", "b")
    assert p.pick(exclude=[0]).value == "b" and p.pick(exclude=[0, 1]) is None
    assert pool().pick() is None


# --------------------------------------------------------------------------- end to end


def scrape(gw) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def keys_sent(fake) -> list[str]:
    return [r.headers.get("authorization", "").removeprefix("Bearer ") for r in fake.requests]


def config(fake_openai, fake_anthropic, openai_keys: list[str], **alias_opts) -> tuple[dict, dict[str, str]]:
    providers = providers_for(fake_openai, None, fake_anthropic)
    env = {f"OPENAI_KEY_{i}": k for i, k in enumerate(openai_keys)}
    providers["openai"]["api_keys"] = [{"env": name} for name in env]
    del providers["openai"]["api_key"]
    return {
        "providers": providers,
        "models": {
            "gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"},
                                   {"provider": "anthropic", "model": "claude-sonnet-4-5"}],
                       "per_try_timeout": "3s", "first_byte_timeout": "1s", **alias_opts},
            "gpt-only": {"targets": [{"provider": "openai", "model": "gpt-4o"}]},
        },
    }, env


@pytest.fixture
def start(gateway, fake_openai, fake_anthropic):
    def make(openai_keys: list[str], **alias_opts):
        cfg, env = config(fake_openai, fake_anthropic, openai_keys, **alias_opts)
        gw = gateway(cfg, env=env)
        return gw, openai.OpenAI(base_url=gw.base_url, api_key="client", max_retries=0, timeout=30)
    return make


@pytest.mark.e2e
def test_a_revoked_key_in_a_pool_is_skipped_without_the_client_noticing(start, fake_openai, fake_anthropic):
    gw, client = start([REVOKED, OPENAI_KEY])
    fake_openai.default = Behaviour(reply="From OpenAI.")
    first = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK)
    assert first.parse().choices[0].message.content == "From OpenAI."
    # the refused key was retried on the provider's next key, not on the next target
    assert first.headers["x-tollgate-provider"] == "openai" and first.headers["x-tollgate-attempts"] == "2"
    assert first.headers["x-tollgate-attempt-outcomes"] == "openai=401,openai=200"
    for _ in range(5):
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert keys_sent(fake_openai) == [REVOKED] + [OPENAI_KEY] * 6  # quarantined after its one refusal
    assert fake_anthropic.requests == []
    assert scrape(gw)[("tollgate_provider_key_quarantined_total", (("key", "#0"), ("provider", "openai")))] == 1
    log = gw.log()
    assert "key #0 (env:OPENAI_KEY_0) with HTTP 401" in log and "quarantined" in log
    assert REVOKED not in log and OPENAI_KEY not in log
    record = next(r for r in gw.access_records() if r["request_id"] == first.headers["x-request-id"])
    assert record["attempt_outcomes"] == ["openai=401", "openai=200"] and record["status"] == 200


@pytest.mark.e2e
def test_requests_are_spread_over_the_pool(start, fake_openai):
    fake_openai.api_key = None  # this fake takes any key: the spread is what is checked
    _, client = start([OPENAI_KEY, OTHER])
    for _ in range(6):
        client.chat.completions.create(model="gpt-only", messages=ASK)
    sent = keys_sent(fake_openai)
    assert sorted(sent) == sorted([OPENAI_KEY, OTHER] * 3) and sent[0] != sent[1]


@pytest.mark.e2e
def test_a_429_with_retry_after_cools_that_key_down(start, fake_openai):
    fake_openai.api_key = None
    _, client = start([OPENAI_KEY, OTHER])
    fake_openai.behaviours.append(Behaviour(status=429, headers={"retry-after": "30"}))
    raw = client.chat.completions.with_raw_response.create(model="gpt-only", messages=ASK)
    assert raw.headers["x-tollgate-attempt-outcomes"] == "openai=429,openai=200"  # the other key answered
    cooled = keys_sent(fake_openai)[0]
    for _ in range(4):
        client.chat.completions.create(model="gpt-only", messages=ASK)
    assert cooled not in keys_sent(fake_openai)[1:]


@pytest.mark.e2e
def test_a_401_is_the_clients_by_default_after_one_attempt(start, fake_openai, fake_anthropic):
    _, client = start([REVOKED])
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK)
    assert caught.value.response.headers["x-tollgate-attempts"] == "1"
    assert fake_anthropic.requests == [] and len(fake_openai.requests) == 1


@pytest.mark.e2e
def test_an_alias_configured_to_fall_back_on_401_does(start, fake_openai, fake_anthropic):
    _, client = start([REVOKED], fallback_on=["5xx", "401", "403"])
    fake_anthropic.default = Behaviour(reply="Claude here.")
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK)
    assert raw.parse().choices[0].message.content == "Claude here."
    assert raw.headers["x-tollgate-provider"] == "anthropic" and raw.headers["x-tollgate-attempts"] == "2"
    assert raw.headers["x-tollgate-attempt-outcomes"] == "openai=401,anthropic=200"
    assert fake_anthropic.requests[0].headers["x-api-key"] == ANTHROPIC_KEY


@pytest.mark.e2e
def test_when_every_key_is_refused_the_policy_decides(start, fake_openai, fake_anthropic):
    gw, client = start([REVOKED, "sk-also-revoked"], fallback_on=["5xx", "401"])
    fake_anthropic.default = Behaviour(reply="Claude here.")
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK)
    assert raw.headers["x-tollgate-attempt-outcomes"] == "openai=401,openai=401,anthropic=200"
    assert sorted(keys_sent(fake_openai)) == sorted([REVOKED, "sk-also-revoked"])
    # with the whole pool quarantined its keys are still tried (the provider says whether one works again)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK)
    assert raw.headers["x-tollgate-attempt-outcomes"] == "openai=401,openai=401,anthropic=200"
    quarantined = scrape(gw)
    assert sum(v for (n, _), v in quarantined.items() if n == "tollgate_provider_key_quarantined_total") == 2


@pytest.mark.e2e
def test_a_5xx_gets_one_more_try_with_the_providers_other_key_then_the_next_target(start, fake_openai, fake_anthropic):
    fake_openai.api_key = None
    _, client = start([OPENAI_KEY, OTHER])
    fake_openai.behaviours.append(Behaviour(status=503))
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK)
    assert raw.headers["x-tollgate-attempt-outcomes"] == "openai=503,openai=200"
    assert sorted(keys_sent(fake_openai)) == sorted([OPENAI_KEY, OTHER]) and fake_anthropic.requests == []
    fake_openai.behaviours.extend([Behaviour(status=500), Behaviour(status=502)])
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK)
    assert raw.headers["x-tollgate-attempt-outcomes"] == "openai=500,openai=502,anthropic=200"
    assert raw.headers["x-tollgate-attempts"] == "3"


@pytest.mark.e2e
def test_a_timeout_is_tried_once_more_per_key_then_the_next_target(start, fake_openai, fake_anthropic):
    fake_openai.api_key = None
    _, client = start([OPENAI_KEY, OTHER])
    fake_openai.behaviours.extend([Behaviour(header_delay=5), Behaviour(header_delay=5)])
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK)
    assert raw.headers["x-tollgate-provider"] == "anthropic" and time.monotonic() - started < 4.5  # 2 x 1 s
    assert raw.headers["x-tollgate-attempt-outcomes"] == "openai=none,openai=none,anthropic=200"
    assert sorted(keys_sent(fake_openai)) == sorted([OPENAI_KEY, OTHER])


@pytest.mark.e2e
def test_an_answer_that_is_not_an_answer_falls_back_when_the_alias_says_so(start, fake_openai, fake_anthropic):
    _, client = start([OPENAI_KEY], fallback_on=["5xx", "invalid_answer"])
    fake_openai.behaviours.append(Behaviour(headers={"Content-Type": "text/html"}))
    fake_anthropic.default = Behaviour(reply="Claude here.")
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK)
    assert raw.parse().choices[0].message.content == "Claude here."
    assert raw.headers["x-tollgate-attempt-outcomes"] == "openai=200,anthropic=200"


@pytest.mark.e2e
def test_429_is_left_out_of_the_policy_and_returned_as_is(start, fake_openai, fake_anthropic):
    _, client = start([OPENAI_KEY], fallback_on=["5xx"])
    fake_openai.behaviours.append(Behaviour(status=429))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert fake_anthropic.requests == []


def ext_proc_streams(gw) -> dict[str, int]:
    """Envoy's count of ext_proc streams: the router-level filter's, and the upstream filters' together."""
    stats = dict(line.split(": ", 1) for line in gw.admin("/stats").splitlines() if ": " in line)
    return {"gateway": int(stats["http.tollgate.ext_proc.streams_started"]),
            "upstream": int(stats.get("http.tollgateext_proc.streams_started", 0))}


@pytest.mark.e2e
def test_an_answer_that_succeeds_opens_no_outcome_stream(start, fake_openai):
    gw, client = start([OPENAI_KEY], fallback_on=["5xx", "401"])
    for _ in range(4):
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert ext_proc_streams(gw) == {"gateway": 4, "upstream": 0}
    fake_openai.behaviours.append(Behaviour(status=503))
    client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert ext_proc_streams(gw) == {"gateway": 5, "upstream": 2}  # the failure's outcome, the fallback's attempt
