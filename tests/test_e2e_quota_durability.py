"""Money is never lost or invented across stops, kills, restarts and store outages.

Each test drives real gateways (``tollgate run``: Envoy + ext_proc) with the
real openai SDK, on the embedded store (its SQLite file under the test's
``XDG_STATE_HOME``) or a real redis-server with AOF, and compares three
independent books: what the provider billed (the fake's usage log), what the
ledger recorded, and what the budget counters hold.

Client threads run under ``Load``: every exception a thread meets is kept and
the test asserts there is none (an error the scenario expects — a refused
connection while the gateway is down — is counted by name instead).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import openai
import pytest

from tests.conftest import OPENAI_KEY
from tests.fake_provider import Behaviour, FakeProvider, count_chat_words
from tests.harness import TOLLGATE, Gateway
from tests.quota.redis_process import RedisProcess
from tests.test_e2e_metrics import scrape, value
from tests.test_e2e_quota import ASK, billed, client, config, cost, org, records, spent, words

pytestmark = pytest.mark.e2e


@pytest.fixture
def fake():
    with FakeProvider("openai", api_key=OPENAI_KEY, prompt_counter=count_chat_words) as f:
        yield f


class Load:
    """Client threads sending plain calls until stopped; outcomes counted, unexpected exceptions kept."""

    def __init__(self, gw: Gateway, threads: int, *, tolerate: tuple[type[BaseException], ...] = ()) -> None:
        self.gw = gw
        self.counts: Counter[str] = Counter()
        self.failures: list[BaseException] = []
        self.tolerate = tolerate  # errors expected while the scenario breaks something, counted by name
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._guarded) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - collected; the test asserts there is none
            with self._lock:
                self.failures.append(e)

    def _run(self) -> None:
        c = client(self.gw, timeout=20)
        while not self._stop.is_set():
            try:
                c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=50)
                what = "served"
            except openai.RateLimitError:
                what = "refused"
            except self.tolerate as e:
                what = type(e).__name__
                time.sleep(0.05)
            with self._lock:
                self.counts[what] += 1


def embedded_file(gw: Gateway) -> Path:
    return gw.tmp / "state" / "tollgate" / "quota.sqlite3"


def embedded_spent(gw: Gateway, scope: str = "org") -> int:
    """What the embedded store's daily budget counters of ``scope`` hold, read from its file."""
    db = sqlite3.connect(f"file:{embedded_file(gw)}?mode=ro", uri=True)
    try:
        rows = db.execute("select micro_usd from spent where key like ?", (f"bg:{scope}:day:%",)).fetchall()
    finally:
        db.close()
    return sum(r[0] for r in rows)


def restart(gw: Gateway, how: str) -> None:
    if how == "sigkill":
        gw.kill_extproc()  # tollgate run dies at once; its Envoy follows it
    else:
        assert gw.stop() == 0
    gw.start()


# --------------------------------------------------------------------------- restarts


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_an_exhausted_daily_budget_stays_exhausted_after_a_restart(gateway, fake, tmp_path, store, how):
    fake.default = Behaviour(reply=words(20))
    with RedisProcess(tmp_path / "redis", appendonly=True) as redis:
        gw = gateway(config(fake, redis if store == "redis" else None, limits={"org": {"usd_per_day": 0.002}}))
        c = client(gw)
        with pytest.raises(openai.RateLimitError) as before:
            for _ in range(30):
                c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=100)
        assert before.value.code == "insufficient_quota"
        served = len(fake.requests)
        assert len(records(gw, redis if store == "redis" else None, n=served)) == served
        if store == "redis":
            redis.restart()  # the store restarts too: AOF brings budgets and ledger back
        restart(gw, how)
        with pytest.raises(openai.RateLimitError) as after:
            client(gw).chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=100)
        assert after.value.code == "insufficient_quota" and "budget exhausted for org" in after.value.message
        assert len(fake.requests) == served  # nothing more reached the provider
        found = records(gw, redis if store == "redis" else None)
        booked = spent(redis, org(0.002)) if store == "redis" else embedded_spent(gw)
        assert len(found) == served and sum(r.micro_usd for r in found) == booked == billed(fake)


# --------------------------------------------------------------------------- stops under load


@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_sigterm_under_load_records_every_served_request(gateway, fake, tmp_path, store):
    fake.default = Behaviour(reply=words(10), first_token_delay=0.05)
    with RedisProcess(tmp_path / "redis", appendonly=True) as redis:
        r = redis if store == "redis" else None
        gw = gateway(config(fake, r, limits={"org": {"usd_per_day": 100}}))
        with Load(gw, 8, tolerate=(openai.APIConnectionError, openai.InternalServerError)) as load:
            time.sleep(3)
            assert gw.stop() == 0  # SIGTERM while requests are in flight
        assert not load.failures, load.failures
        served = load.counts["served"]
        assert served > 20, load.counts
        if store == "embedded":
            gw.start()  # the file is the embedded store's; read it as the restarted gateway sees it
        everything = records(gw, r, n=len(fake.usage_log))
        # a request admitted as the stop began but never sent is settled as unsent, at $0 (its hold given back)
        unsent = [x for x in everything if x.outcome == "unsent"]
        found = [x for x in everything if x.outcome != "unsent"]
        assert all(x.micro_usd == 0 for x in unsent) and len(unsent) <= 8, unsent
        # every answer the provider gave is in the ledger once, complete, at exactly its bill
        assert len({x.request_id for x in everything}) == len(everything)
        assert len(found) == len(fake.usage_log) >= served, Counter(x.outcome for x in everything)
        assert {x.outcome for x in found} == {"complete"}
        assert sum(x.micro_usd for x in found) == billed(fake)
        assert (spent(redis, org(100)) if r else embedded_spent(gw)) == billed(fake)


@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_sigkill_under_load_leaves_budgets_and_ledger_in_agreement(gateway, fake, tmp_path, store):
    fake.default = Behaviour(reply=words(10), first_token_delay=0.4)  # several requests always in flight
    with RedisProcess(tmp_path / "redis", appendonly=True) as redis:
        r = redis if store == "redis" else None
        gw = gateway(config(fake, r, lease="1s", limits={"org": {"usd_per_day": 100}}))
        with Load(gw, 8, tolerate=(openai.APIConnectionError, openai.InternalServerError)) as load:
            time.sleep(3)
            gw.kill_extproc()
        assert not load.failures, load.failures
        time.sleep(1.5)  # the killed sidecar's leases run out (Redis) and its provider calls finish
        gw.start()  # embedded: the restart turns the dead holds into unknown records
        if r is not None:
            spent(redis, org(100))  # any store call reaps expired leases (the gateway's own reaper does too)
        found = records(gw, r, n=len(fake.requests))
        booked = spent(redis, org(100)) if r else embedded_spent(gw)
        unknown = [x for x in found if x.outcome == "unknown"]
        # every request that reached the provider is in the ledger: exact, or at its hold when it was cut off; a
        # request admitted but killed before it was sent is recorded too, as unknown (the gateway cannot tell)
        assert len({x.request_id for x in found}) == len(found) >= len(fake.requests), load.counts
        assert len(found) - len(fake.requests) <= len(unknown)
        assert unknown and all(x.micro_usd > 0 for x in unknown)
        assert sum(x.micro_usd for x in found) == booked  # to the micro-dollar
        assert booked >= billed(fake)  # a hold is the worst case: never less than the provider billed
        spend = json.loads(subprocess.run(
            [TOLLGATE, "spend", "--config", str(gw.config_path), "--since", "1h", "--json"],
            capture_output=True, text=True, env=gw.env, check=True).stdout)
        assert (spend["total"]["unknown"], spend["total"]["micro_usd"]) == (len(unknown), booked)


# --------------------------------------------------------------------------- Redis under pressure


def test_five_hundred_concurrent_requests_get_no_false_store_errors(gateway, fake, tmp_path):
    fake.default = Behaviour(reply=words(5), first_token_delay=0.5)
    with RedisProcess(tmp_path / "redis", appendonly=True) as redis:
        # a small pool on purpose: 500 calls share 8 connections, waiting their turn instead of failing
        cfg = config(fake, redis, redis_pool={"max_connections": 8, "wait": "10s"},
                     limits={"org": {"usd_per_day": 100}, "principals": {"*": {"tokens_per_minute": 10_000_000}}})
        # This spec is about the store's pool, so Envoy's cap on exchanges in flight (which would refuse most
        # of the 500 at once with a 503, by design: tests/test_e2e_hardening.py) is raised above the burst.
        # The generous waits keep a CPU-starved test machine from turning a slow turn into a failure; a pool that
        # does not wait fails at once ("Too many connections") whatever the wait.
        cfg["envoy"] = {"message_timeout": "15s", "max_exchanges": 1024}
        gw = gateway(cfg)

        async def one(c: openai.AsyncOpenAI) -> str:
            try:
                await c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=20)
                return "ok"
            except openai.APIStatusError as e:
                return f"{e.status_code} {e.code}"

        async def burst() -> Counter[str]:
            # the SDK's own pool allows 1,000 connections: 500 calls at once are 500 connections
            async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=60) as c:
                return Counter(await asyncio.gather(*(one(c) for _ in range(500))))

        outcomes = asyncio.run(burst())
        assert not [k for k in outcomes if "quota_store_unavailable" in k], outcomes
        assert value(scrape(gw), "tollgate_quota_store_errors_total") in (None, 0), outcomes
        assert outcomes["ok"] >= 450, outcomes  # what else failed here is the machine, not the store
        found = records(gw, redis, n=len(fake.usage_log))
        assert len(found) == len(fake.usage_log) and spent(redis, org(100)) == sum(x.micro_usd for x in found)


def test_redis_down_for_five_seconds_under_fail_open_is_charged_to_the_shared_budget_once(gateway, fake, tmp_path):
    fake.default = Behaviour(reply=words(10), first_token_delay=0.02)
    with RedisProcess(tmp_path / "redis", appendonly=True) as redis:
        cfg = config(fake, redis, on_store_error="fail_open", replicas=1, limits={"org": {"usd_per_day": 100}})
        cfg["envoy"] = {"message_timeout": "5s"}  # about money, not latency: a busy test machine is no failure here
        gw = gateway(cfg)
        with Load(gw, 4) as load:
            time.sleep(1.5)
            redis.stop()
            time.sleep(5)
            during = load.counts["served"]
            redis.restart()
            time.sleep(2)
        assert not load.failures, load.failures
        assert during > 0 and load.counts["served"] > during, load.counts
        found = records(gw, redis, n=len(fake.usage_log), timeout=15)  # the backlog is replayed within seconds
        assert len({x.request_id for x in found}) == len(found) == len(fake.usage_log)
        assert sum(x.micro_usd for x in found) == billed(fake) == spent(redis, org(100))


def test_a_sidecar_killed_during_an_outage_leaves_its_fail_open_spend_for_the_next_start(gateway, fake, tmp_path):
    """Requests served under fail_open while Redis is down wait on disk (quota.ledger.pending), not only in
    memory: a gateway SIGKILLed before Redis comes back leaves them to its successor, which charges them to
    the shared budget and the ledger once, at the provider's bill."""
    fake.default = Behaviour(reply=words(10))
    with RedisProcess(tmp_path / "redis", appendonly=True) as redis:
        gw = gateway(config(fake, redis, on_store_error="fail_open", replicas=1,
                            limits={"org": {"usd_per_day": 100}}))
        c = client(gw)
        c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=50)
        redis.stop()
        for _ in range(5):  # admitted locally, settled there; their shared charge waits for Redis
            c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=50)
        assert (gw.tmp / "state" / "tollgate" / "quota-pending.sqlite3").exists()
        gw.kill_sidecar()
        redis.restart()
        gw.start()
        found = records(gw, redis, n=6, timeout=15)  # replayed by the new process's maintenance round
        assert len({x.request_id for x in found}) == len(found) == len(fake.usage_log) == 6
        assert sum(x.micro_usd for x in found) == spent(redis, org(100))  # to the micro-dollar
        # exact, or (killed between the answer and its settlement) charged at its hold, as Redis would
        exact = [x for x in found if x.outcome == "complete"]
        assert {x.outcome for x in found} <= {"complete", "unknown"} and len(exact) >= 5
        assert sum(x.micro_usd for x in found) == billed(fake) if len(exact) == 6 else \
            sum(x.micro_usd for x in found) > billed(fake)
        assert "from an earlier run wait for the quota store" in gw.log()


# --------------------------------------------------------------------------- what operators configure


def test_requests_per_minute_refuses_beyond_the_rate_with_request_headers(gateway, fake):
    fake.default = Behaviour(reply=words(5))
    gw = gateway(config(fake, limits={"aliases": {"gpt-4o": {"requests_per_minute": 3}}}))
    c = client(gw)
    first = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK, max_tokens=10)
    assert (first.headers["x-ratelimit-limit-requests"], first.headers["x-ratelimit-remaining-requests"]) == ("3", "2")
    for _ in range(2):
        c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=10)
    with pytest.raises(openai.RateLimitError) as caught:
        c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=10)
    e = caught.value
    assert e.code == "rate_limit_exceeded" and "3 requests per minute" in e.message
    assert 1 <= int(e.response.headers["retry-after"]) <= 20  # one request comes back every 20 s
    assert len(fake.requests) == 3
    assert value(scrape(gw), "tollgate_quota_rejections_total", scope="alias", kind="requests") == 1


def test_prices_without_limits_keep_a_ledger_and_hold_nothing(gateway, fake):
    fake.default = Behaviour(reply=words(7))
    gw = gateway(config(fake))  # a quota section with prices and no limits
    c = client(gw)
    for _ in range(3):
        c.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=10)
    for _ in c.chat.completions.create(model="gpt-4o", messages=ASK, stream=True):
        pass
    found = records(gw, n=4)
    assert len(found) == 4 and sum(x.micro_usd for x in found) == billed(fake) > 0
    assert embedded_spent(gw) == 0  # nothing was held or charged to a budget
    prompt = count_chat_words({"messages": ASK})
    assert all(x.micro_usd == cost(prompt, 7) for x in found)  # each at the provider's own count
