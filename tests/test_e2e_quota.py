"""Quotas and budgets end to end: the real openai SDK → real Envoy → Tollgate → fake providers.

Quota state lives in a real redis-server (or the embedded store), and every
charge is checked against what the fake provider itself billed (its
``usage_log``). The fake counts prompts by its own rule (``count_chat_words``:
words and punctuation plus OpenAI's chat framing, not the gateway's
tokenizer), so where the provider reports usage the charge must equal its
bill to the micro-dollar, and where the gateway must count by itself (a
stream cut before the provider's usage arrived) the two independent counts
are held to the README's tolerance (``within``). Replies are one-token words
streamed one per chunk.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import openai
import pytest
import redis.asyncio as aioredis

from extproc.auth.devtoken import mint_dev_token
from extproc.config import load_config
from extproc.providers.base import Usage
from extproc.quota.ledger import RedisLedger, SqliteLedger, UsageRecord
from extproc.quota.limits import Budget, ScopeLimits
from extproc.quota.prices import DEFAULT_PRICES, PriceTable
from extproc.quota.redis_store import RedisQuotaStore
from extproc.quota.tokenizer import Tokenizer
from tests.conftest import OPENAI_KEY, providers_for
from tests.fake_provider import Behaviour, FakeProvider, count_chat_words
from tests.harness import TOLLGATE, Gateway
from tests.quota.redis_process import RedisProcess
from tests.test_e2e_metrics import scrape, value

pytestmark = pytest.mark.e2e

TOKENIZER = Tokenizer()
PRICES = PriceTable(DEFAULT_PRICES)
ASK = [{"role": "user", "content": "Say hello, word by word."}]
MICRO = 1_000_000


def words(n: int) -> str:
    """A reply of ``n`` words that are one o200k token each, alone or joined."""
    return " ".join(["hello"] * n)


def our_count(body: dict[str, Any]) -> int:
    """The prompt tokens the gateway counts (and holds) for a chat request: the model's tokenizer."""
    return TOKENIZER.count_chat(body["model"], body).tokens


def within(ours: int, theirs: int) -> bool:
    """The README's tolerance for a count the gateway made by itself: 4 tokens + 1 % of the provider's."""
    return abs(ours - theirs) <= 4 + theirs // 100


def cost(prompt: int, completion: int, model: str = "gpt-4o") -> int:
    return PRICES.cost(model, Usage(prompt, completion, 0))


def billed(fake: FakeProvider, model: str = "gpt-4o") -> int:
    """What the provider billed, summed over its usage log."""
    return sum(cost(u["prompt_tokens"], u["completion_tokens"], model) for u in fake.usage_log)


@pytest.fixture
def fake():
    with FakeProvider("openai", api_key=OPENAI_KEY, prompt_counter=count_chat_words) as f:
        yield f


@pytest.fixture
def redis(tmp_path: Path):
    with RedisProcess(tmp_path / "redis", appendonly=True) as r:  # AOF: state survives a restart
        yield r


def config(fake: FakeProvider, redis: RedisProcess | None = None, **quota: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": providers_for(fake),
        "models": {"gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}]},
                   "gpt-4": {"targets": [{"provider": "openai", "model": "gpt-4"}]}},
        "quota": quota,
    }
    if redis is not None:
        cfg["redis"] = {"url": redis.url, "key_prefix": "e2e"}
    return cfg


def client(gw: Gateway, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(**{"base_url": gw.base_url, "api_key": "unused", "max_retries": 0, "timeout": 30, **kw})


def records(gw: Gateway, redis: RedisProcess | None = None, n: int = 0, timeout: float = 5) -> list[UsageRecord]:
    """The ledger (Redis stream, else the gateway's file), once it holds at least ``n`` records."""
    async def read() -> list[UsageRecord]:
        if redis is None:
            ledger = SqliteLedger(gw.tmp / "state" / "tollgate" / "quota.sqlite3")
            return [r async for r in ledger.records(since=0)]
        c = aioredis.Redis.from_url(redis.url)
        try:
            return [r async for r in RedisLedger(c, hash_tag="e2e").records(since=0)]
        finally:
            await c.aclose()

    deadline = time.monotonic() + timeout
    while True:
        found = asyncio.run(read())
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def spent(redis: RedisProcess, scope: ScopeLimits) -> int:
    """Micro-dollars charged to ``scope``'s daily budget, as the shared store holds it."""
    async def probe() -> int:
        c = aioredis.Redis.from_url(redis.url)
        try:
            r = await RedisQuotaStore(c, tz=ZoneInfo("UTC"), hash_tag="e2e").reserve([scope], 0, 0, lease_seconds=1)
        finally:
            await c.aclose()
        money = next(s for s in r.states if s.kind == "money")
        return money.limit - money.remaining

    return asyncio.run(probe())


def org(usd: float) -> ScopeLimits:
    return ScopeLimits("org", None, (Budget("day", int(usd * MICRO)),))


def raw_stream(gw: Gateway, body: dict[str, Any]) -> bytes:
    """Everything the client receives on a stream (the decoded body), however the stream ends."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    data = b""
    try:
        while part := resp.read1(65536):
            data += part
    except http.client.IncompleteRead as e:  # the stream was reset after its last event
        data += e.partial
    except ConnectionError:
        pass
    conn.close()
    return data


def logged(gw: Gateway, text: str, timeout: float = 5) -> bool:
    """Whether the gateway logs ``text`` soon (log lines leave through a writer thread)."""
    deadline = time.monotonic() + timeout
    while text not in gw.log():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def access_log(gw: Gateway, n: int, timeout: float = 5) -> list[dict[str, Any]]:
    """The access-log lines, once there are at least ``n``."""
    deadline = time.monotonic() + timeout
    while len(found := gw.access_records()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_one_token_words_are_what_the_fake_streams() -> None:
    assert TOKENIZER.count_text("gpt-4o", words(300)) == 300
    assert TOKENIZER.count_text("gpt-4o", " hello") == 1


# --------------------------------------------------------------------------- hard stop and headers


def test_a_spent_budget_is_a_429_insufficient_quota_that_reaches_no_provider(gateway, fake):
    fake.default = Behaviour(reply=words(20))
    gw = gateway(config(fake, limits={"org": {"usd_per_day": 0.002}}))
    c, admitted = client(gw), 0
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(20):
            c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=100)
            admitted += 1
    e = caught.value
    assert (e.status_code, e.code, e.type) == (429, "insufficient_quota", "insufficient_quota")
    assert "budget exhausted for org" in e.message
    assert int(e.response.headers["retry-after"]) > 0  # until midnight UTC
    assert e.response.headers["x-should-retry"] == "false"
    assert admitted >= 3 and len(fake.requests) == admitted  # the refused call never left the gateway
    # the SDK's own retries respect x-should-retry: one more refused call is one more 429, not three
    with pytest.raises(openai.RateLimitError):
        client(gw, max_retries=2).chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=100)
    assert len(records(gw, n=admitted)) == admitted
    assert sum(r.micro_usd for r in records(gw)) == billed(fake) <= 2000
    refusals = [r for r in access_log(gw, admitted + 2) if r["status"] == 429]
    assert len(refusals) == 2 and refusals[0]["error"] == "insufficient_quota"


def test_a_token_bucket_says_rate_limit_exceeded_and_every_answer_shows_the_headers(gateway, fake):
    fake.default = Behaviour(reply=words(10))
    gw = gateway(config(fake, stream_slice_tokens=50, limits={"aliases": {"gpt-4o": {"tokens_per_minute": 300}}}))
    c = client(gw)
    plain = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK, max_tokens=200)
    assert plain.headers["x-ratelimit-limit-tokens"] == "300"
    assert int(plain.headers["x-ratelimit-remaining-tokens"]) <= 300 - 200  # the worst case was held
    with c.chat.completions.with_streaming_response.create(model="gpt-4o", messages=ASK, stream=True) as s:
        assert s.headers["x-ratelimit-limit-tokens"] == "300"
        assert sum(1 for _ in s.iter_lines()) > 10
    fake.behaviours.append(Behaviour(status=400))
    with pytest.raises(openai.BadRequestError) as provider_error:  # the provider's own error: headers too
        c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=20)
    assert provider_error.value.response.headers["x-ratelimit-limit-tokens"] == "300"
    with pytest.raises(openai.RateLimitError) as caught:
        c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=280)
    e = caught.value
    assert (e.code, e.type) == ("rate_limit_exceeded", "tokens")
    assert 1 <= int(e.response.headers["retry-after"]) <= 60
    assert "x-should-retry" not in e.response.headers  # worth retrying: the bucket refills
    assert int(e.response.headers["x-ratelimit-remaining-tokens"]) < 280
    with pytest.raises(openai.RateLimitError) as never:
        c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=1000)
    assert "request too large" in never.value.message
    assert never.value.response.headers["x-should-retry"] == "false"
    assert len(fake.requests) == 3


def test_a_prompt_over_the_context_window_is_refused_with_its_count(gateway, fake):
    gw = gateway(config(fake))
    huge = [{"role": "user", "content": "hello " * 9000}]
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).chat.completions.create(model="gpt-4", messages=huge, max_tokens=10)  # 8,192 tokens
    e = caught.value
    assert e.code == "context_length_exceeded" and e.param == "messages"
    assert f"the messages have {our_count({'model': 'gpt-4', 'messages': huge})} tokens" in e.message
    assert not fake.requests


# --------------------------------------------------------------------------- reconciliation


def test_the_output_cap_reaches_whichever_target_answers(gateway, fake, fake_anthropic):
    # the primary is prepared by the router-level stage, a fallback by the per-attempt one: both send the cap
    cfg = config(fake, default_max_tokens=300, limits={"aliases": {"gpt-4o": {"tokens_per_minute": 5000}}})
    cfg["providers"] = providers_for(fake, None, fake_anthropic)
    cfg["models"]["gpt-4o"]["targets"].append({"provider": "anthropic", "model": "claude-sonnet-4-5"})
    gw = gateway(cfg)
    fake.behaviours.append(Behaviour(status=503))
    fake_anthropic.default = Behaviour(reply="Claude here.")
    raw = client(gw).chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK)
    assert raw.headers["x-tollgate-provider"] == "anthropic"
    assert raw.headers["x-ratelimit-limit-tokens"] == "5000"
    assert fake.requests[0].json["max_completion_tokens"] == 300
    assert fake_anthropic.requests[0].json["max_tokens"] == 300


def test_a_plain_call_holds_its_worst_case_while_it_runs_then_pays_what_it_used(gateway, fake, redis):
    fake.default = Behaviour(reply=words(30), first_token_delay=0.6)
    gw = gateway(config(fake, redis, default_max_tokens=1000, limits={"org": {"usd_per_day": 1}}))
    c, answers = client(gw), []
    t = threading.Thread(target=lambda: answers.append(
        c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=500)))
    t.start()
    assert fake.wait_for_requests(1)
    held = our_count(fake.requests[0].json)
    assert spent(redis, org(1)) == PRICES.estimate("gpt-4o", held, 500)  # held while the provider works
    t.join()
    prompt = count_chat_words(fake.requests[0].json)
    assert answers[0].usage.prompt_tokens == prompt
    assert [r.micro_usd for r in records(gw, redis, n=1)] == [cost(prompt, 30)] == [billed(fake)]
    assert spent(redis, org(1)) == cost(prompt, 30)  # the unused hold was refunded
    # without a cap the configured default is held, and sent upstream so the provider keeps to it
    c.chat.completions.create(model="gpt-4o", messages=ASK)
    assert fake.requests[1].json["max_completion_tokens"] == 1000
    record = records(gw, redis, n=2)[-1]  # written in the same step as the budget's settlement
    assert spent(redis, org(1)) == billed(fake)
    assert (record.alias, record.model, record.provider, record.output_tokens) == ("gpt-4o", "gpt-4o", "openai", 30)
    assert access_log(gw, 2)[-1]["cost_usd"] == pytest.approx(record.micro_usd / MICRO)


def test_a_stream_holds_a_slice_at_a_time_and_pays_what_it_used(gateway, fake, redis):
    fake.default = Behaviour(reply=words(120), token_delay=0.005)
    gw = gateway(config(fake, redis, stream_slice_tokens=16, limits={"org": {"usd_per_day": 1}}))
    stream = client(gw).chat.completions.create(model="gpt-4o", messages=ASK, stream=True)
    got, held_mid = [], 0
    for chunk in stream:
        got.append(chunk)
        if len(got) == 60:
            held_mid = spent(redis, org(1))
    prompt = count_chat_words(fake.requests[0].json)  # the provider's usage arrived: its count is billed
    assert within(our_count(fake.requests[0].json), prompt)
    # mid-stream the hold covered what had passed, and at most two slices more
    assert PRICES.estimate("gpt-4o", prompt, 55) <= held_mid <= PRICES.estimate("gpt-4o", prompt, 62 + 2 * 16)
    assert all(ch.usage is None for ch in got)  # the gateway asked for usage, the client did not: stripped
    assert fake.requests[0].json["stream_options"] == {"include_usage": True}
    assert "max_completion_tokens" not in fake.requests[0].json  # a stream is metered, not capped
    assert [r.micro_usd for r in records(gw, redis, n=1)] == [cost(prompt, 120)] == [billed(fake)]
    assert spent(redis, org(1)) == cost(prompt, 120)


def test_a_stream_cut_by_its_budget_ends_with_an_error_event_and_pays_exactly_what_was_produced(gateway, fake, redis):
    fake.default = Behaviour(reply=words(400), token_delay=0.01)
    budget = 0.0015  # prompt + ~140 output tokens at gpt-4o prices
    gw = gateway(config(fake, redis, stream_slice_tokens=16, limits={"org": {"usd_per_day": budget}}))
    data = raw_stream(gw, {"model": "gpt-4o", "messages": ASK, "stream": True})
    events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    assert '"code": "insufficient_quota"' in events[-1] or '"code":"insufficient_quota"' in events[-1]
    assert "the stream was ended here" in events[-1]
    shown = sum(1 for e in events if '"content":"hello"' in e or '"content":" hello"' in e)
    assert fake.wait_for_usage(1)
    produced = fake.usage_log[0]
    assert not produced["completed"] and shown <= produced["completion_tokens"] < 400
    record = records(gw, redis, n=1)[0]
    # no usage arrived: the gateway counted by itself, and its two counts stand beside the provider's
    assert within(record.input_tokens, produced["prompt_tokens"])
    assert record.output_tokens == produced["completion_tokens"]
    assert abs(record.micro_usd - billed(fake)) <= cost(4 + produced["prompt_tokens"] // 100, 0)
    assert record.micro_usd == spent(redis, org(budget))  # the budget was charged what the ledger says
    assert spent(redis, org(budget)) <= budget * MICRO + PRICES.estimate("gpt-4o", 0, 16)  # at most a slice over
    cut = access_log(gw, 1)[-1]
    assert (cut["status"], cut["error"], cut["output_tokens"]) == (200, "insufficient_quota", record.output_tokens)
    assert value(scrape(gw), "tollgate_quota_rejections_total", scope="org", kind="money") == 1


def test_a_client_that_walks_away_mid_stream_pays_for_what_the_provider_produced(gateway, fake):
    fake.default = Behaviour(reply=words(300), token_delay=0.02)
    gw = gateway(config(fake, limits={"org": {"usd_per_day": 1}}))
    stream = client(gw).chat.completions.create(model="gpt-4o", messages=ASK, stream=True)
    seen = 0
    for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 25:
            break
    stream.close()
    assert fake.wait_for_usage(1)
    produced = fake.usage_log[0]
    assert not produced["completed"] and 25 <= produced["completion_tokens"] < 300
    record = records(gw, n=1)[0]
    assert within(record.input_tokens, produced["prompt_tokens"])
    assert record.output_tokens == produced["completion_tokens"] and record.outcome == "partial"
    assert abs(record.micro_usd - billed(fake)) <= cost(4 + produced["prompt_tokens"] // 100, 0)


def test_a_plain_call_whose_client_leaves_before_the_answer_is_charged_its_hold(gateway, fake):
    fake.default = Behaviour(reply=words(30), first_token_delay=1.0)
    gw = gateway(config(fake, limits={"org": {"usd_per_day": 1}}))
    with pytest.raises(openai.APITimeoutError):
        client(gw, timeout=0.4).chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=200)
    assert fake.wait_for_usage(1)  # the provider did the work and bills it
    held = our_count(fake.requests[0].json)
    record = records(gw, n=1)[0]
    # the gateway never saw the answer: it charges what it held, never less than the provider billed
    assert record.micro_usd == PRICES.estimate("gpt-4o", held, 200) >= billed(fake)
    assert record.outcome == "unknown"


# --------------------------------------------------------------------------- Redis unavailable


def test_redis_down_fails_closed_with_a_503_and_recovers_without_double_charge(gateway, fake, redis):
    fake.default = Behaviour(reply=words(10))
    gw = gateway(config(fake, redis, limits={"org": {"usd_per_day": 1}}))
    c = client(gw)
    c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=50)
    redis.stop()
    with pytest.raises(openai.InternalServerError) as caught:
        c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=50)
    e = caught.value
    assert (e.status_code, e.code) == (503, "quota_store_unavailable") and "Redis" in e.message
    assert len(fake.requests) == 1  # fail closed: nothing reached the provider
    assert logged(gw, "refusing request")
    assert value(scrape(gw), "tollgate_quota_store_errors_total", operation="reserve", policy="fail_closed") >= 1
    redis.restart()
    c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=50)  # recovered, no restart of ours
    assert len(records(gw, redis, n=2)) == 2
    assert spent(redis, org(1)) == billed(fake) == sum(r.micro_usd for r in records(gw, redis))


def test_fail_open_admits_against_local_shares_and_records_the_outage_once_redis_is_back(gateway, fake, redis):
    fake.default = Behaviour(reply=words(10))
    gw = gateway(config(fake, redis, on_store_error="fail_open", replicas=2,
                        limits={"org": {"usd_per_day": 0.01}}))  # alone: $0.005 while Redis is down
    c = client(gw)
    c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=50)
    before = fake.usage_log[0]
    redis.stop()
    c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=50)  # admitted locally
    with pytest.raises(openai.RateLimitError):  # beyond this sidecar's share of the budget
        c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=600)
    assert logged(gw, "admitting request") and "fail_open" in gw.log()
    assert value(scrape(gw), "tollgate_quota_store_errors_total", policy="fail_open") >= 2
    redis.restart()
    c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=50)
    found = records(gw, redis, n=3)
    assert len(found) == 3 and sum(r.micro_usd for r in found) == billed(fake)  # the outage call is recorded
    # the outage call, held and settled locally, was charged to the shared budget once Redis was back
    assert spent(redis, org(0.01)) == billed(fake) == cost(before["prompt_tokens"], 10) * 3


# --------------------------------------------------------------------------- the worked example


def test_team_ml_spends_its_50_dollars_a_day_across_gpt4o_and_claude_and_tollgate_spend_shows_it(
        gateway, fake, redis, fake_anthropic, tmp_path):
    fake.default = Behaviour(reply=words(20))
    fake_anthropic.default = Behaviour(reply=words(20))
    budget = 0.005  # $50 in the README; a few requests' worth here
    cfg = {
        "providers": providers_for(fake, None, fake_anthropic),
        "models": {"gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}]},
                   "claude-sonnet": {"targets": [{"provider": "anthropic", "model": "claude-sonnet-4-5"}]}},
        "teams": {"ml": {}, "research": {}},
        "auth": {"mode": "jwt", "issuers": [{
            "issuer": "tollgate-dev", "audience": "tollgate", "dev_key_file": str(tmp_path / "dev-key.pem"),
            "claims": {"principal": "sub", "teams": "groups"}}]},
        "redis": {"url": redis.url, "key_prefix": "e2e"},
        "quota": {"limits": {"teams": {"ml": {"tokens_per_minute": 2_000_000, "usd_per_day": budget}},
                             "org": {"usd_per_day": 2000}}},
    }
    gw = gateway(cfg)
    issuer = load_config(gw.config_path).auth.issuers[0]
    ml = client(gw, api_key=mint_dev_token(issuer, sub="alice", team="ml"))
    calls = 0
    with pytest.raises(openai.RateLimitError) as caught:
        for i in range(40):
            model = ("gpt-4o", "claude-sonnet")[i % 2]
            if i % 3 == 2:
                for _ in ml.chat.completions.create(model=model, messages=ASK, stream=True):
                    pass
            else:
                ml.chat.completions.create(model=model, messages=ASK, max_tokens=50)
            calls += 1
    assert caught.value.code == "insufficient_quota" and "team:ml" in caught.value.message
    assert calls >= 4
    research = client(gw, api_key=mint_dev_token(issuer, sub="bob", team="research"))
    research.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=50)  # another team's money
    found = records(gw, redis, n=calls + 1)
    team_ml = [r for r in found if r.team == "ml"]
    assert {r.model for r in team_ml} == {"gpt-4o", "claude-sonnet-4-5"} and {r.principal for r in team_ml} == {"alice"}
    assert sum(r.micro_usd for r in found) == billed(fake) + billed(fake_anthropic, "claude-sonnet-4-5")
    ml_spent = sum(r.micro_usd for r in team_ml)
    assert ml_spent <= budget * MICRO + PRICES.estimate("claude-sonnet-4-5", 0, 256)  # a stream may pass it by a slice
    out = subprocess.run([TOLLGATE, "spend", "--config", str(gw.config_path), "--team", "ml", "--since", "1h",
                          "--by", "model"], capture_output=True, text=True, env=gw.env, check=True).stdout
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert int(lines["gpt-4o"][1]) + int(lines["claude-sonnet-4-5"][1]) == len(team_ml)
    assert float(lines["total"][-1]) == pytest.approx(ml_spent / MICRO, abs=1e-6)
    gauge = value(scrape(gw), "tollgate_budget_remaining_usd", team="ml")
    assert 0 <= budget - gauge <= budget * 2
