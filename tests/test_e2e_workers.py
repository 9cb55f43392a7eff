"""Two ext_proc workers behind one Envoy (``extproc.workers: 2``): everything holds as with one.

The real openai SDK drives a real Envoy whose ext_proc cluster has two
endpoints, two worker processes of ``tollgate run``, a real redis-server
(quotas, ledger and cache entries) and fake providers. Envoy balances every
gRPC stream by itself, so a fallback attempt's stream lands on either worker;
the one that does not hold the request relays it to the one that does
(``extproc/pipeline/relay.py``). Which worker served what is read from the
log, never chosen by the test.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis

from extproc.providers.base import Usage
from extproc.quota.ledger import RedisLedger, UsageRecord
from extproc.quota.prices import DEFAULT_PRICES, PriceTable
from tests.conftest import ANTHROPIC_KEY, KEYS, OPENAI_KEY, providers_for
from tests.fake_provider import Behaviour, FakeProvider
from tests.harness import Gateway
from tests.quota.redis_process import RedisProcess
from tests.test_e2e_metrics import scrape, value

pytestmark = pytest.mark.e2e

ASK = [{"role": "user", "content": "Say hello, word by word."}]


def ask(tag: object) -> list[dict[str, str]]:
    """A prompt no other request sent (the gateway caches exact answers)."""
    return [{"role": "user", "content": f"Say hello, word by word ({tag})."}]
PRICES = PriceTable(DEFAULT_PRICES)


class World:
    """One gateway with two workers, its Redis and its two fake providers, shared by the specs below."""

    def __init__(self, tmp: Path) -> None:
        self.redis = RedisProcess(tmp / "redis").start()
        self.openai = FakeProvider("openai", api_key=OPENAI_KEY).start()
        self.anthropic = FakeProvider("anthropic", api_key=ANTHROPIC_KEY).start()
        self.cfg: dict[str, Any] = {
            "extproc_workers": 2,
            "providers": providers_for(self.openai, None, self.anthropic),
            "models": {
                "gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"},
                                       {"provider": "anthropic", "model": "claude-sonnet-4-5"}]},
            },
            "redis": {"url": self.redis.url, "key_prefix": "e2e"},
            "quota": {"limits": {"org": {"usd_per_day": 100}}},
            "cache": {"mode": "exact"},
        }
        (tmp / "gw").mkdir(exist_ok=True)
        self.gw = Gateway(tmp / "gw", self.cfg, env={**KEYS, "XDG_STATE_HOME": str(tmp / "state")}).start()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gw.base_url, api_key="unused", max_retries=0, timeout=30)

    def close(self) -> None:
        self.gw.stop()
        self.openai.stop()
        self.anthropic.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("workers"))
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(autouse=True)
def fresh_fakes(world: World) -> None:
    for fake in (world.openai, world.anthropic):
        fake.behaviours.clear()
        fake.default = Behaviour()


def worker_pids(gw: Gateway) -> list[int]:
    """The serving ext_proc children (the standby listens on nothing), once both serve."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-P", str(gw.proc.pid), "-f", "extproc extproc"], capture_output=True,
                             text=True).stdout.split()
        listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        serving = [int(p) for p in out if f"pid={p}," in listening]
        if len(serving) == 2:
            return serving
        time.sleep(0.2)
    raise AssertionError("two serving workers never showed up")


def ledger(redis: RedisProcess) -> list[UsageRecord]:
    async def read() -> list[UsageRecord]:
        c = aioredis.Redis.from_url(redis.url)
        try:
            return [r async for r in RedisLedger(c, hash_tag="e2e").records(since=0)]
        finally:
            await c.aclose()

    return asyncio.run(read())


def records_for(world: World, ids: set[str], timeout: float = 5.0) -> list[UsageRecord]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in ledger(world.redis) if r.request_id in ids]
        if len(found) >= len(ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_both_workers_serve_plain_calls_and_streams(world: World) -> None:
    client = world.client()
    for _ in range(6):
        answer = client.chat.completions.create(model="gpt-4o", messages=ASK)
        assert answer.choices[0].message.content
        text = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(model="gpt-4o", messages=ASK, stream=True) if c.choices)
        assert text
    assert len(worker_pids(world.gw)) == 2


def test_fallback_attempts_that_land_on_the_other_worker_are_relayed_to_the_owner(world: World) -> None:
    client = world.client()
    for _ in range(8):
        world.openai.behaviours.append(Behaviour(status=503))
    world.anthropic.default = Behaviour(reply="Claude here.")
    for i in range(8):
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ask(f"fallback {i}"))
        assert raw.parse().choices[0].message.content == "Claude here."
        assert raw.headers["x-tollgate-provider"] == "anthropic"
        assert raw.headers["x-tollgate-attempts"] == "2"
    assert all(r.headers["x-api-key"] == ANTHROPIC_KEY for r in world.anthropic.requests[-8:])
    # 8 fallbacks open 16 streams (an outcome and an attempt each) on a worker Envoy picks: some were relayed
    assert re.search(r"relayed an? (attempt|outcome) stream", world.gw.log())


def test_quotas_charge_exactly_what_the_provider_billed_whichever_worker_served(world: World) -> None:
    client = world.client()
    before = len(world.openai.usage_log)
    ids: set[str] = set()
    for i in range(10):
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ask(f"quota {i}"),
                                                               max_tokens=50 + i)
        ids.add(raw.headers["x-request-id"])
    bill = sum(PRICES.cost("gpt-4o", Usage(u["prompt_tokens"], u["completion_tokens"], 0))
               for u in world.openai.usage_log[before:])
    found = records_for(world, ids)
    assert len(found) == 10
    assert sum(r.micro_usd for r in found) == bill


def test_an_answer_cached_by_one_worker_is_served_by_either(world: World) -> None:
    client = world.client()
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ask)
    sent = len(world.openai.requests)
    hits = []
    for _ in range(6):  # Envoy spreads them over both workers
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ask)
        hits.append(raw.headers.get("x-tollgate-cache"))
        assert raw.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert len(world.openai.requests) == sent  # none reached the provider
    assert set(hits) == {"hit-exact"}


def test_metrics_are_the_sum_of_both_workers(world: World) -> None:
    before = value(scrape(world.gw), "tollgate_requests_total", alias="gpt-4o", outcome="success")
    client = world.client()
    for i in range(10):
        client.chat.completions.create(model="gpt-4o", messages=ask(f"metrics {i}"))
    deadline = time.monotonic() + 5
    while (after := value(scrape(world.gw), "tollgate_requests_total", alias="gpt-4o", outcome="success")) \
            < before + 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after == before + 10


def test_a_killed_worker_is_replaced_while_the_other_serves(world: World) -> None:
    gw = world.gw
    victim = worker_pids(gw)[0]
    wait_for_standby(gw)
    client = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=10)
    outcomes: list[tuple[float, int | str]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        try:
            while not stop.is_set():
                at = time.monotonic()
                try:
                    client.chat.completions.create(model="gpt-4o", messages=ASK)
                    outcomes.append((at, 200))
                except openai.APIStatusError as e:
                    assert e.response.json()["error"]["code"]
                    outcomes.append((at, e.status_code))
                except openai.APIConnectionError:
                    outcomes.append((at, "reset"))
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            failures.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(15)
    assert failures == []
    after = [(at - killed_at, what) for at, what in outcomes if at > killed_at]
    served = [at for at, what in after if what == 200]
    failed = [(at, what) for at, what in after if what != 200]
    assert {what for _, what in failed} <= {503, "reset"}
    assert all(at < 1.0 for at, _ in failed), failed  # only around the kill: the other worker went on serving
    assert len(served) > 10 * max(1, len(failed))
    assert victim not in (pids := worker_pids(gw)) and len(pids) == 2  # the standby took its place
    assert re.search(r"ext_proc server \d restarted", gw.log())


def wait_for_standby(gw: Gateway, timeout: float = 30) -> None:
    """Until the spare (started 2 s after the gateway) is ready: three children said so, two serve."""
    deadline = time.monotonic() + timeout
    while gw.log().count("ext_proc standby ready") < 3:
        assert time.monotonic() < deadline, "no standby"
        time.sleep(0.2)


def test_tollgate_extproc_alone_runs_every_worker_for_an_envoy_of_its_own(gateway, fake_openai) -> None:
    # a pod whose Envoy is its own container: `tollgate extproc` supervises the workers (and sums their metrics)
    gw = gateway({"extproc_workers": 2, "providers": providers_for(fake_openai),
                  "models": {"gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}}}, split=True)
    client = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=30)
    for i in range(6):
        assert client.chat.completions.create(model="gpt-4o", messages=ask(f"split {i}")).choices[0].message.content
    assert "ext_proc server 1/2" in gw.log() and "ext_proc server 0/2" in gw.log()
    deadline = time.monotonic() + 5
    while value(scrape(gw), "tollgate_requests_total", alias="gpt-4o", outcome="success") < 6:
        assert time.monotonic() < deadline
        time.sleep(0.1)
