"""The response cache end to end: the real openai SDK -> real Envoy -> Tollgate -> a fake OpenAI.

Two sidecars (each its own Envoy and ext_proc process) share one real
redis-server, which holds the cache entries, the insert stream every sidecar's
FAISS index follows, and the usage ledger. Callers carry dev tokens of two
teams. The embedding pool admits one embedding at a time, so concurrent misses
show the saturated path too.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import redis.asyncio as aioredis
import yaml

from extproc.auth.devtoken import mint_dev_token
from extproc.config import load_config
from extproc.quota.ledger import RedisLedger, UsageRecord
from tests.conftest import KEYS, OPENAI_KEY, providers_for
from tests.fake_provider import Behaviour, FakeProvider
from tests.harness import Gateway
from tests.quota.redis_process import RedisProcess

pytestmark = pytest.mark.e2e

GPT4O_INPUT, GPT4O_OUTPUT = 2.5, 10.0  # list USD per 1M tokens, as extproc/quota/prices.py ships them


class World:
    def __init__(self, tmp: Path) -> None:
        self.redis = RedisProcess(tmp / "redis").start()
        self.fake = FakeProvider("openai", api_key=OPENAI_KEY).start()
        self.cfg: dict[str, Any] = {
            "providers": providers_for(self.fake),
            "models": {"chat": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}},
            "envoy": {"concurrency": 1},
            "teams": {"ml": {}, "research": {}},
            "auth": {"mode": "jwt", "issuers": [{
                "issuer": "tollgate-dev", "audience": "tollgate", "dev_key_file": str(tmp / "dev-key.pem"),
                "claims": {"principal": "sub", "teams": "groups"}}]},
            "redis": {"url": self.redis.url, "key_prefix": "e2e"},
            "quota": {"limits": {"org": {"usd_per_day": 100}}},
            # one embedding at a time; a budget for a busy 2-core test machine (the default is 25 ms)
            # embeddings may use a whole core here (the shipped quarter is load shedding, specified in test_pool.py)
            "cache": {"mode": "semantic", "embed_workers": 1, "embed_queue": 1, "lookup_budget": "150ms",
                      "embed_cpu": 1.0},
        }
        self.gws: list[Gateway] = []
        for i in range(2):  # one after the other: the first writes the dev key the second reads
            d = tmp / f"sidecar{i}"
            d.mkdir()
            self.gws.append(Gateway(d, self.cfg, env={**KEYS, "XDG_STATE_HOME": str(d / "state")}).start())
        issuer = load_config(self.gws[0].config_path).auth.issuers[0]
        self.tokens = {team: mint_dev_token(issuer, sub=f"{team}-user", team=team) for team in ("ml", "research")}

    def client(self, sidecar: int = 0, team: str = "ml") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gws[sidecar].base_url, api_key=self.tokens[team], max_retries=0,
                             timeout=30)

    def close(self) -> None:
        for g in self.gws:
            g.stop()
        self.fake.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("cache"))
    try:
        yield w
    finally:
        w.close()


def unique(text: str) -> str:
    """A question no earlier test asked (entries persist in the module's Redis)."""
    return f"{text} (ticket {uuid.uuid4().hex[:6]})"


def ask(c: openai.OpenAI, text: str, **kw: Any) -> tuple[str, dict[str, str]]:
    raw = c.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": text}],
                                                      **kw)
    return raw.parse().choices[0].message.content or "", dict(raw.headers)


def answered(fake: FakeProvider, n: int, timeout: float = 5.0) -> None:
    assert fake.wait_for_requests(n, timeout), f"the provider saw {len(fake.requests)} requests, not {n}"


def stored(world: World, n: int, timeout: float = 5.0) -> None:
    """Wait until the cache holds ``n`` entries more than at the start of the test (stores run in the background)."""
    async def count() -> int:
        c = aioredis.Redis.from_url(world.redis.url)
        try:
            return int(await c.xlen("{e2e:cache}:inserts"))
        finally:
            await c.aclose()
    deadline = time.monotonic() + timeout
    while asyncio.run(count()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert asyncio.run(count()) >= n


def inserts(world: World) -> int:
    async def count() -> int:
        c = aioredis.Redis.from_url(world.redis.url)
        try:
            return int(await c.xlen("{e2e:cache}:inserts"))
        finally:
            await c.aclose()
    return asyncio.run(count())


def test_the_same_question_twice_is_an_exact_hit_that_never_reaches_the_provider(world):
    c, q = world.client(), unique("How do I reset my password?")
    before, seen = inserts(world), len(world.fake.requests)
    first, h1 = ask(c, q)
    assert h1["x-tollgate-cache"] == "miss"
    stored(world, before + 1)
    second, h2 = ask(c, q)
    assert h2["x-tollgate-cache"] == "hit-exact" and h2["x-tollgate-cache-similarity"] == "1.0000"
    assert second == first
    assert len(world.fake.requests) == seen + 1


def test_a_paraphrase_stored_through_sidecar_one_is_a_semantic_hit_on_sidecar_two_within_a_second(world):
    before = inserts(world)
    first, _ = ask(world.client(0), "How do I reset my password on the billing portal?")
    stored(world, before + 1)
    stored_at = time.monotonic()
    while True:
        text, h = ask(world.client(1), "What's the way to reset my password on the billing portal?")
        if h["x-tollgate-cache"] == "hit-semantic" or time.monotonic() - stored_at > 1.0:
            break
        time.sleep(0.05)
    assert h["x-tollgate-cache"] == "hit-semantic", h
    assert time.monotonic() - stored_at <= 1.0 + 0.5  # the last ask itself may take a moment
    assert float(h["x-tollgate-cache-similarity"]) >= 0.94
    assert text == first


@pytest.mark.parametrize("stored_q, look_alike", [
    ("Cancel order 1123 for me", "Cancel order 1132 for me"),
    ("Find flights from Paris to Rome next Friday", "Find flights from Rome to Paris next Friday"),
    ("Is ibuprofen safe during pregnancy?", "Is ibuprofen not safe during pregnancy?"),
], ids=["changed number", "swapped order", "negation"])
def test_a_look_alike_misses_and_is_answered_by_the_provider(world, stored_q, look_alike):
    c = world.client(team="research")
    before = inserts(world)
    ask(c, stored_q)
    stored(world, before + 1)
    seen = len(world.fake.requests)
    _, h = ask(c, look_alike)
    assert h["x-tollgate-cache"] == "miss"
    assert len(world.fake.requests) == seen + 1


def test_a_streamed_hit_replays_as_sse_that_the_sdk_assembles(world):
    c, q = world.client(), unique("Explain what a hash table is")
    before = inserts(world)
    first = "".join(ch.choices[0].delta.content or "" for ch in
                    c.chat.completions.create(model="chat", messages=[{"role": "user", "content": q}], stream=True)
                    if ch.choices)
    stored(world, before + 1)
    raw = c.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": q}], stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-tollgate-cache"] == "hit-exact"
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == first
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def ledger(world: World) -> list[UsageRecord]:
    async def read() -> list[UsageRecord]:
        c = aioredis.Redis.from_url(world.redis.url)
        try:
            return [r async for r in RedisLedger(c, hash_tag="e2e").records(since=0)]
        finally:
            await c.aclose()
    return asyncio.run(read())


def test_a_hit_is_not_charged_and_the_ledger_records_what_it_saved(world):
    c, q = world.client(), unique("Write a limerick about a cautious cat")
    before = inserts(world)
    raw = c.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": q}])
    miss_id = raw.headers["x-request-id"]
    usage = raw.parse().usage
    assert usage is not None
    stored(world, before + 1)
    raw2 = c.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": q}])
    hit_id = raw2.headers["x-request-id"]
    assert raw2.headers["x-tollgate-cache"] == "hit-exact"
    assert raw2.headers["x-tollgate-cost-usd"] == "0.000000"
    # gpt-4o's list prices, per 1M tokens, applied to the provider's own usage of the first answer
    expected = math.ceil(usage.prompt_tokens * GPT4O_INPUT + usage.completion_tokens * GPT4O_OUTPUT)  # rounded up
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        recs = {r.request_id: r for r in ledger(world)}
        if miss_id in recs and hit_id in recs:
            break
        time.sleep(0.05)
    miss, hit = recs[miss_id], recs[hit_id]
    assert miss.micro_usd == expected and miss.cache_status == "miss"
    assert (hit.micro_usd, hit.input_tokens, hit.output_tokens) == (0, 0, 0)
    assert hit.cache_status == "hit_exact" and hit.provider == "cache"
    assert hit.saved_micro_usd == expected
    assert hit.saved_tokens == usage.prompt_tokens + usage.completion_tokens
    assert float(raw2.headers["x-tollgate-saved-usd"]) == pytest.approx(expected / 1e6)


def test_another_team_never_gets_this_teams_answer(world):
    q = unique("What is our on-call rotation policy?")
    before = inserts(world)
    ask(world.client(team="ml"), q)
    stored(world, before + 1)
    seen = len(world.fake.requests)
    _, h = ask(world.client(team="research"), q)
    assert h["x-tollgate-cache"] == "miss"
    assert len(world.fake.requests) == seen + 1


def test_no_cache_skips_the_lookup_and_no_store_skips_storing(world):
    c, q = world.client(), unique("Summarise the plot of Hamlet")
    before = inserts(world)
    _, h = ask(c, q, extra_headers={"Cache-Control": "no-store"})
    assert h["x-tollgate-cache"] == "miss"
    time.sleep(0.3)
    assert inserts(world) == before  # not stored
    ask(c, q)  # stored now
    stored(world, before + 1)
    seen = len(world.fake.requests)
    _, h = ask(c, q, extra_headers={"Cache-Control": "no-cache"})
    assert h["x-tollgate-cache"] == "bypass"
    assert len(world.fake.requests) == seen + 1
    _, h = ask(c, q)
    assert h["x-tollgate-cache"] == "hit-exact"


def test_errors_and_tool_calls_are_never_stored(world):
    c = world.client()
    q1, q2 = unique("What is the weather in Oslo?"), unique("Call the weather tool for Bergen")
    world.fake.behaviours.append(Behaviour(status=500))
    with pytest.raises(openai.InternalServerError):
        ask(c, q1)
    world.fake.behaviours.append(Behaviour(tool_call={"name": "weather", "arguments": {"city": "Bergen"}}))
    c.chat.completions.create(model="chat", messages=[{"role": "user", "content": q2}])
    time.sleep(0.3)
    # Asked again (now answered plainly), neither is found: nothing was stored for them. The insert count
    # is not compared: a store from an earlier spec on this shared world may land in between.
    for q in (q1, q2):
        _, h = ask(c, q)
        assert h["x-tollgate-cache"] == "miss", q


def test_a_saturated_embedder_bypasses_the_lookup_and_never_delays_into_a_timeout(world):
    """Sixteen different questions at once, one embedding slot: the rest skip the lookup, all are answered."""
    c = world.client()
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            _, h = ask(c, unique(f"Question number {i} about saturation of worker pools"))
            with lock:
                results.append(h["x-tollgate-cache"])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 16 and set(results) <= {"miss", "bypass"}
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{world.gws[0].metrics_port}/metrics", timeout=5).read().decode()
    assert 'tollgate_cache_bypass_total{alias="chat",reason="saturated"}' in metrics


def test_the_embedded_default_caches_the_demo_model(gateway):
    """What a newcomer sees with `make run`: the same question twice is an exact hit, a paraphrase a semantic one."""
    default = yaml.safe_load(resources.files("extproc").joinpath("default_config.yaml").read_text())
    default["cache"]["lookup_budget"] = "150ms"  # the shipped 25 ms, on a 2-core machine running other suites
    default["cache"]["embed_cpu"] = 1.0  # likewise: a slow pass here would use the shipped quarter of a core up
    gw = gateway(default, env={"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": ""})
    c = openai.OpenAI(base_url=gw.base_url, api_key="anything", max_retries=0, timeout=30)
    first, h = ask_model(c, "demo", "How do I reset my password?")
    assert h["x-tollgate-cache"] in ("miss", "bypass")  # bypass: the lookup ran out of its budget on a busy machine
    deadline = time.monotonic() + 5
    while (h := ask_model(c, "demo", "How do I reset my password?")[1])["x-tollgate-cache"] == "miss":
        assert time.monotonic() < deadline, "the answer was never stored"
        time.sleep(0.05)
    assert h["x-tollgate-cache"] == "hit-exact"
    for _ in range(5):  # a lookup over its budget on a busy machine is a bypass, by design: ask again
        again, h = ask_model(c, "demo", "What's the way to reset my password?")
        if h["x-tollgate-cache"] != "bypass":
            break
    assert h["x-tollgate-cache"] == "hit-semantic" and again == first
    assert ask_model(c, "demo", "How do I reset my PIN?")[1]["x-tollgate-cache"] in ("miss", "bypass")


def ask_model(c: openai.OpenAI, model: str, text: str) -> tuple[str, dict[str, str]]:
    raw = c.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}])
    return raw.parse().choices[0].message.content or "", dict(raw.headers)


def test_an_anthropic_client_shares_the_cache_each_client_reading_its_own_shape(world):
    # entries are stored in OpenAI's shape (what the stages read) and written in the client's on the way out
    claude = anthropic.Anthropic(base_url=world.gws[0].base_url.removesuffix("/v1"), api_key=world.tokens["ml"],
                                 max_retries=0, timeout=30)
    q, seen, before = unique("What is the capital of Norway?"), len(world.fake.requests), inserts(world)
    ask_claude = [{"role": "user", "content": q}]
    first = claude.messages.with_raw_response.create(model="chat", max_tokens=100, messages=ask_claude)
    assert first.headers["x-tollgate-cache"] == "miss"
    stored(world, before + 1)
    second = claude.messages.with_raw_response.create(model="chat", max_tokens=100, messages=ask_claude)
    assert second.headers["x-tollgate-cache"].startswith("hit")
    assert second.parse().type == "message" and second.parse().content[0].text == first.parse().content[0].text
    text, headers = ask(world.client(), q, max_tokens=100)
    assert headers["x-tollgate-cache"].startswith("hit") and text == first.parse().content[0].text
    assert len(world.fake.requests) == seen + 1
