"""The request path's view: admit before routing, meter the stream, finish once."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from extproc.errors import GatewayError
from extproc.providers.base import Usage
from extproc.quota.governor import Admission, Caller, Governor
from extproc.quota.ledger import RedisLedger, SqliteLedger, UsageRecord, totals
from extproc.quota.limits import Reservation
from extproc.quota.memory_store import open_embedded
from extproc.quota.policy import QuotaPolicy
from extproc.quota.prices import UnpricedModel
from extproc.quota.redis_store import RedisQuotaStore, connect
from extproc.quota.settings import QuotaSettings, parse_quota
from extproc.quota.spool import Pending, Spool
from extproc.quota.store import QuotaUnavailable
from extproc.quota.tokenizer import Tokenizer
from tests.harness import free_port
from tests.quota.conftest import UTC
from tests.quota.redis_process import RedisProcess

CONFIG = """
quota:
  time_zone: Europe/Berlin
  stream_slice_tokens: 100
  default_max_tokens: 1000
  limits:
    org: {usd_per_day: 2000}
    teams:
      ml: {tokens_per_minute: 2000000, usd_per_day: 50}
      tiny: {usd_per_day: 0.05}
    principals:
      "*": {tokens_per_minute: 200000, burst: 400000}
"""
TOKENIZER = Tokenizer()
_FILES = itertools.count()
HELLO = {"model": "chat", "messages": [{"role": "user", "content": "hello world"}]}  # 9 prompt tokens on gpt-4o


def settings(**changes: object) -> QuotaSettings:
    q = yaml.safe_load(CONFIG)["quota"]
    q.update(changes)
    return parse_quota(q)


def governor(tmp_path: Path, s: QuotaSettings | None = None, store: object = None) -> Governor:
    """A governor on the embedded store (its SQLite file in ``tmp_path``), or on ``store`` if given."""
    s = s or settings()
    path = tmp_path / f"quota-{next(_FILES)}.sqlite3"  # a test may run several gateways, each its own file
    if store is not None:
        return Governor(s, store=store, ledger=SqliteLedger(path), tokenizer=TOKENIZER)  # type: ignore[arg-type]
    embedded, _ = open_embedded(str(path), tz=UTC)
    return Governor(s, store=embedded, ledger=SqliteLedger(path, writer=embedded.state_file), tokenizer=TOKENIZER)


def caller(rid: str = "req-1", team: str = "ml") -> Caller:
    return Caller(rid, "alice", team, "chat")


def test_the_issue_example_becomes_four_scopes() -> None:
    scopes = QuotaPolicy(settings()).scopes(principal="alice", team="ml", alias="chat")
    assert [s.scope for s in scopes] == ["principal:alice", "team:ml", "org"]
    team = scopes[1]
    assert team.bucket is not None and (team.bucket.per_minute, team.bucket.burst) == (2_000_000, 2_000_000)
    assert [(b.period, b.limit_micro_usd) for b in team.budgets] == [("day", 50_000_000)]
    assert scopes[2].budgets[0].limit_micro_usd == 2_000_000_000
    assert [s.scope for s in QuotaPolicy(settings()).scopes(principal=None, team=None, alias="x")] == ["org"]


@pytest.mark.parametrize("change, message", [
    ({"store": "redis"}, "quota.store: redis needs the top-level redis: section"),
    ({"store": "etcd"}, "quota.store: expected auto, memory or redis"),
    ({"time_zone": "Europe/Atlantis"}, "quota.time_zone: unknown time zone"),
    ({"limits": {"teams": {"ml": {"usd_per_day": "lots"}}}}, "quota.limits.teams.ml.usd_per_day"),
    ({"limits": {"teams": {"ml": {"usd_per_day": 0.0000001}}}}, "at most 6 decimals"),
    ({"limits": {"teams": {"ml": {"burst": 10}}}}, "quota.limits.teams.ml.burst: needs tokens_per_minute"),
    ({"limits": {"teams": {"ml": {"tokens_per_min": 10}}}}, "quota.limits.teams.ml.tokens_per_min: unknown key"),
    ({"lease": "forever"}, "quota.lease: expected a duration"),
    ({"on_store_error": "pray"}, "quota.on_store_error"),
    ({"prices": {"x": {"input": 1}}}, "quota.prices.x.output: is required"),
    ({"ledger": {"keep": "12h"}}, "quota.ledger.keep: expected a duration from 1d"),  # the dedupe window
])
def test_bad_quota_config_names_the_key(change: dict, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        settings(**change)
    assert message in str(caught.value)


async def admit(g: Governor, body: dict = HELLO, *, rid: str = "req-1", team: str = "ml", model: str = "gpt-4o",
                stream: bool = False) -> Admission:
    return await g.admit(body, caller=caller(rid, team), model=model, stream=stream)


async def test_a_plain_request_reserves_its_worst_case_and_settles_what_it_used(tmp_path: Path) -> None:
    g = governor(tmp_path)
    a = await admit(g, {**HELLO, "max_tokens": 500})
    assert (a.reservation.tokens, a.reservation.micro_usd) == (9 + 500, 9 * 2.5 + 500 * 10 + 0.5)  # rounded up
    assert a.output_cap is None  # the client's own cap goes upstream unchanged
    assert a.headers()["x-ratelimit-limit-tokens"] == "400000"  # alice's bucket is the tightest
    record = await a.finish(Usage(9, 20, 0), provider="openai", model="gpt-4o-2024-08-06", cache_status="miss")
    assert (record.micro_usd, record.team, record.model) == (23 + 200, "ml", "gpt-4o-2024-08-06")
    assert await a.finish(Usage(9, 20, 0), provider="openai") is record  # once
    spent = (await totals(g.ledger, since=0, team="ml"))["total"]
    assert (spent.requests, spent.micro_usd) == (1, 223)


async def test_without_max_tokens_the_default_cap_is_reserved_and_injected(tmp_path: Path) -> None:
    a = await admit(governor(tmp_path))
    assert a.reservation.tokens == 9 + 1000 and a.output_cap == 1000
    stream = await admit(governor(tmp_path), {**HELLO, "stream": True}, rid="req-2", stream=True)
    assert stream.output_cap is None  # a stream is metered slice by slice: its request is left as it is


async def test_over_budget_is_a_429_insufficient_quota(tmp_path: Path) -> None:
    g = governor(tmp_path)
    with pytest.raises(GatewayError) as caught:
        await admit(g, {**HELLO, "max_tokens": 10_000}, team="tiny")  # up to $0.10 against $0.05
    e = caught.value
    assert (e.status, e.code, e.type) == (429, "insufficient_quota", "insufficient_quota")
    assert int(e.headers["retry-after"]) >= 1 and "team:tiny" in e.message


async def test_a_stream_is_topped_up_slice_by_slice_and_cut_when_the_budget_ends(tmp_path: Path) -> None:
    g = governor(tmp_path)
    a = await admit(g, {**HELLO, "stream": True, "max_tokens": 100_000}, team="tiny", stream=True)
    assert a.reservation.tokens == 9 + 100  # prompt + one slice, not the whole max_tokens
    word = " hello"  # one token
    with pytest.raises(GatewayError) as caught:
        for _ in range(100_000):
            await a.on_output(word)
    assert caught.value.code == "insufficient_quota"
    produced = a._meter.tokens
    # $0.05 buys 5,000 output tokens at $10/1M (minus the prompt): the stream stops within one slice of it
    assert 4_900 <= produced <= 5_000 + 100
    record = await a.finish(None, provider="openai")  # the stream ended without usage: bill what was produced
    assert (record.input_tokens, record.output_tokens) == (9, produced)
    assert record.micro_usd == -(-(9 * 25 + produced * 100) // 10)


async def test_a_failed_upstream_or_no_upstream_is_billed_nothing(tmp_path: Path) -> None:
    g = governor(tmp_path)
    a = await admit(g, {**HELLO, "max_tokens": 10})
    assert (await a.finish(None, provider="openai", outcome="failed")).micro_usd == 0
    b = await admit(g, {**HELLO, "max_tokens": 10}, rid="req-2")
    assert (await b.finish(None, provider="openai", outcome="unsent")).micro_usd == 0


async def test_a_provider_asked_but_never_heard_from_is_billed_the_reservation(tmp_path: Path) -> None:
    a = await admit(governor(tmp_path), {**HELLO, "max_tokens": 500})
    record = await a.finish(None, provider="openai", outcome="unknown")
    assert (record.input_tokens, record.output_tokens, record.micro_usd) == (9, 500, a.reservation.micro_usd)


async def test_an_answer_without_usage_is_billed_its_worst_case_never_zero(tmp_path: Path) -> None:
    a = await admit(governor(tmp_path), {**HELLO, "max_tokens": 50})
    record = await a.finish(None, provider="openai")
    assert (record.input_tokens, record.output_tokens) == (9, 50)


async def test_a_stream_cut_short_keeps_the_providers_prompt_count_and_the_output_that_passed(tmp_path: Path) -> None:
    a = await admit(governor(tmp_path), {**HELLO, "stream": True}, stream=True, model="claude-sonnet-4-5")
    await a.on_output(" hello world")
    # Anthropic reported the prompt (and one output token) in message_start; the stream then broke
    record = await a.finish(Usage(20, 1, 0), provider="anthropic", outcome="partial")
    assert (record.input_tokens, record.output_tokens) == (20, a.produced) and a.produced > 1


async def test_cache_writes_are_billed_at_their_own_price(tmp_path: Path) -> None:
    a = await admit(governor(tmp_path), {**HELLO, "max_tokens": 10}, model="claude-sonnet-4-5")
    record = await a.finish(Usage(1000, 0, 0, 1000), provider="anthropic", cache_write_tokens=1000)
    assert record.micro_usd == 1000 * 3.75  # $3.75 per 1M written, not the $3 input price


async def test_a_prompt_larger_than_the_context_window_is_a_400_with_the_count(tmp_path: Path) -> None:
    g = governor(tmp_path)
    huge = {"model": "chat", "messages": [{"role": "user", "content": "hello " * 9000}]}
    with pytest.raises(GatewayError) as caught:
        await admit(g, huge, model="gpt-4")  # 8,192 tokens
    e = caught.value
    assert (e.status, e.code, e.param) == (400, "context_length_exceeded", "messages")
    count = TOKENIZER.count_chat("gpt-4", huge).tokens
    assert count > 8192 and f"8192 tokens, but the messages have {count} tokens" in e.message
    assert (await admit(g, huge, model="gpt-4o")).prompt.tokens > 8192  # 128k: fits
    custom = governor(tmp_path, settings(context_windows={"my-deployment": 5000},
                                         default_price={"input": 1, "output": 1}))
    with pytest.raises(GatewayError):
        await admit(custom, huge, model="my-deployment")


async def test_an_approximate_count_is_only_refused_well_past_the_window(tmp_path: Path) -> None:
    g = governor(tmp_path, settings(context_windows={"claude": 1000}))
    near = {"model": "chat", "messages": [{"role": "user", "content": "hello " * 900}]}  # ~1,090 (x1.2)
    assert not (await admit(g, near, model="claude-sonnet-4-5")).prompt.exact
    far = {"model": "chat", "messages": [{"role": "user", "content": "hello " * 1200}]}
    with pytest.raises(GatewayError) as caught:
        await admit(g, far, model="claude-sonnet-4-5", rid="req-2")
    assert "about" in caught.value.message


async def test_an_unpriced_model_is_refused_before_anything_is_reserved(tmp_path: Path) -> None:
    with pytest.raises(UnpricedModel):
        await admit(governor(tmp_path), model="my-finetune")
    priced = settings(default_price={"input": 1, "output": 1})
    assert (await admit(governor(tmp_path, priced), model="my-finetune")).reservation.micro_usd == 9 + 1000


async def test_a_store_outage_fails_closed_by_default(tmp_path: Path) -> None:
    dead = RedisQuotaStore(connect(f"redis://127.0.0.1:{free_port()}/0"), tz=UTC)
    seen: list[str] = []
    g = Governor(settings(), store=dead, ledger=SqliteLedger(tmp_path / "quota.sqlite3"), tokenizer=TOKENIZER,
                 on_store_error=seen.append)
    with pytest.raises(QuotaUnavailable) as caught:
        await admit(g)
    assert caught.value.status == 503 and g.store_errors == 1 and seen == ["reserve"]
    await dead.close()


async def test_fail_open_admits_against_local_limits_divided_by_the_replicas(tmp_path: Path) -> None:
    dead = RedisQuotaStore(connect(f"redis://127.0.0.1:{free_port()}/0"), tz=UTC)
    g = governor(tmp_path, settings(on_store_error="fail_open", replicas=4), store=dead)
    a = await admit(g, {**HELLO, "max_tokens": 10})
    assert g.store_errors == 1
    assert a.headers()["x-ratelimit-limit-tokens"] == "100000"  # alice's 400k burst / 4 replicas
    with pytest.raises(GatewayError):
        await admit(g, {**HELLO, "max_tokens": 1_000_000}, rid="big", team="tiny")  # $0.05 / 4 locally
    await a.finish(Usage(9, 5, 0), provider="openai")
    await dead.close()


async def test_embeddings_reserve_their_input_and_no_output(tmp_path: Path) -> None:
    g = governor(tmp_path)
    a = await g.admit({"model": "emb", "input": ["hello world", "hello"]}, caller=caller(), stream=False,
                      model="text-embedding-3-small", endpoint="embeddings")
    assert (a.reservation.tokens, a.output_cap) == (3, None)
    assert TOKENIZER.count_embedding_input("text-embedding-3-small", [1, 2, 3, 4]).tokens == 4


def test_the_store_follows_the_gateways_redis_section() -> None:
    assert settings().store == "memory"
    shared = parse_quota({"store": "auto"}, redis_url="redis://127.0.0.1:6379/0", key_prefix="acme")
    assert (shared.store, shared.redis_url, shared.hash_tag) == ("redis", "redis://127.0.0.1:6379/0", "acme")
    assert parse_quota({"store": "memory"}, redis_url="redis://127.0.0.1:6379/0").store == "memory"


async def test_a_settlement_missed_while_redis_was_down_is_replayed_once_it_is_back(tmp_path: Path) -> None:
    with RedisProcess(tmp_path / "redis", appendonly=True) as server:
        client = connect(server.url)
        store = RedisQuotaStore(client, tz=UTC)
        g = Governor(settings(), store=store, ledger=RedisLedger(client), tokenizer=TOKENIZER)
        a = await admit(g, {**HELLO, "max_tokens": 1000}, rid="during-outage")
        server.stop()
        first = await a.finish(Usage(9, 10, 0), provider="openai")  # neither settled nor recorded: kept
        assert g.store_errors == 1 and len(g._backlog) == 1
        server.restart()
        b = await admit(g, {**HELLO, "max_tokens": 1000}, rid="after")
        second = await b.finish(Usage(9, 20, 0), provider="openai")  # settles, then replays the first
        assert not g._backlog
        spent = (await totals(g.ledger, since=0, team="ml"))["total"]
        assert (spent.requests, spent.micro_usd) == (2, first.micro_usd + second.micro_usd)
        probe = await store.reserve(QuotaPolicy(settings()).scopes(principal="alice", team="ml", alias="chat"), 0, 0,
                                    lease_seconds=1)
        team = next(s for s in probe.states if s.scope == "team:ml" and s.kind == "money")
        assert team.limit - team.remaining == first.micro_usd + second.micro_usd  # the first hold was refunded
        await client.aclose()


async def test_the_next_slice_is_asked_for_ahead_so_a_stream_never_waits_and_stops_right_at_its_boundary(
        tmp_path: Path) -> None:
    a = await admit(governor(tmp_path), {**HELLO, "stream": True, "max_tokens": 100_000}, team="tiny", stream=True)
    steps = []
    while not steps or steps[-1] == "go":
        steps.append(a.count_output(" hello"))
        await asyncio.sleep(0)  # the event loop runs: the background top-ups land
    assert steps[-1] == "stop" and "wait" not in steps  # granted slices never held the stream up
    assert a.produced == a._covered + 1  # it ends on the first token past what was held
    assert a.refusal().code == "insufficient_quota"
    assert 4_800 <= a.produced <= 5_000  # $0.05 at $10 per 1M output tokens
    with pytest.raises(GatewayError):
        await a.top_up()


async def test_a_hold_is_priced_at_the_dearest_target_the_alias_may_fall_back_to(tmp_path: Path) -> None:
    g = governor(tmp_path)
    body = {**HELLO, "max_tokens": 100}
    alone = await admit(g, body, rid="alone")
    with_claude = await g.admit(body, caller=caller("fallback"), model="gpt-4o", stream=False,
                                fallbacks=["claude-sonnet-4-5"])
    assert alone.reservation.micro_usd == 9 * 2.5 + 100 * 10 + 0.5  # gpt-4o's price
    assert with_claude.reservation.micro_usd == 9 * 3 + 100 * 15  # Claude's, should it answer instead
    answered = await with_claude.finish(Usage(12, 100, 0), provider="anthropic", model="claude-sonnet-4-5")
    assert answered.micro_usd <= with_claude.reservation.micro_usd + 3 * 3  # only Claude's longer prompt count


async def test_with_ledger_keep_the_maintenance_drops_records_past_it(tmp_path: Path) -> None:
    """``quota.ledger.keep`` (at least a day in the config; shorter here, set on the settings directly): the
    governor's maintenance trims the ledger, so the file stops growing with history; budgets are untouched."""
    g = governor(tmp_path, replace(settings(), ledger_keep_seconds=0.3))
    first = await (await admit(g, {**HELLO, "max_tokens": 10}, rid="early")).finish(Usage(9, 10, 0), provider="openai")
    await asyncio.sleep(0.4)
    await (await admit(g, {**HELLO, "max_tokens": 10}, rid="late")).finish(Usage(9, 10, 0), provider="openai")
    g.start(every=0.05)
    await asyncio.sleep(0.2)
    left = [r.request_id async for r in g.ledger.records(since=0)]
    probe = await g.store.reserve(QuotaPolicy(settings()).scopes(principal="alice", team="ml", alias="chat"), 0, 0,
                                  lease_seconds=1)
    team = next(s for s in probe.states if s.scope == "team:ml" and s.kind == "money")
    await g.close()
    assert left == ["late"]
    assert team.limit - team.remaining == 2 * first.micro_usd  # what was spent stays spent


def test_ledger_keep_is_a_duration_and_by_default_every_record_is_kept() -> None:
    assert settings(ledger={"keep": "35d"}).ledger_keep_seconds == 35 * 86_400
    assert settings().ledger_keep_seconds is None


def spooled_governor(server: RedisProcess, pending: Path) -> Governor:
    client = connect(server.url)
    s = replace(settings(on_store_error="fail_open"), pending_path=str(pending))
    return Governor(s, store=RedisQuotaStore(client, tz=UTC), ledger=RedisLedger(client, owns_client=False),
                    tokenizer=TOKENIZER, spool=Spool(str(pending)))


async def team_spent(g: Governor) -> int:
    probe = await g.store.reserve(QuotaPolicy(settings()).scopes(principal="alice", team="ml", alias="chat"), 0, 0,
                                  lease_seconds=1)
    team = next(s for s in probe.states if s.scope == "team:ml" and s.kind == "money")
    return team.limit - team.remaining


async def test_a_fail_open_admission_is_on_disk_before_it_finishes_so_the_next_process_charges_it(
    tmp_path: Path,
) -> None:
    """Under fail_open with Redis down, a locally admitted request is in the pending file from its admission on
    (at its hold, outcome unknown): a process that dies before the request finishes leaves it to the next one,
    which charges the hold to the shared budget and the ledger once Redis is back, as a Redis hold would expire."""
    with RedisProcess(tmp_path / "redis", appendonly=True) as server:
        pending = tmp_path / "pending.sqlite3"
        server.stop()
        dying = spooled_governor(server, pending)
        a = await admit(dying, {**HELLO, "max_tokens": 100}, rid="in-flight")
        assert dying.store_errors == 1
        assert dying.spool is not None
        dying.spool.close()  # the process dies here: nothing finishes the request
        server.restart()
        successor = spooled_governor(server, pending)
        successor.start(every=0.05)
        await asyncio.sleep(0.3)
        found = [(r.request_id, r.outcome, r.micro_usd) async for r in successor.ledger.records(since=0)]
        spent = await team_spent(successor)
        await successor.close()
        assert found == [("in-flight", "unknown", a.reservation.micro_usd)]
        assert spent == a.reservation.micro_usd


async def test_a_finished_fail_open_request_replaces_its_admission_on_disk_with_what_it_cost(tmp_path: Path) -> None:
    with RedisProcess(tmp_path / "redis", appendonly=True) as server:
        pending = tmp_path / "pending.sqlite3"
        server.stop()
        g = spooled_governor(server, pending)
        record = await (await admit(g, {**HELLO, "max_tokens": 100}, rid="served")).finish(
            Usage(9, 20, 0), provider="openai")
        assert g.spool is not None
        [kept] = g.spool.load()
        assert (kept.record.outcome, kept.record.micro_usd, kept.owner) == ("complete", record.micro_usd, 0)
        server.restart()
        await g.replay()
        assert g.spool.load() == [] and await team_spent(g) == record.micro_usd
        await g.close()


async def test_an_admission_still_running_in_a_live_sibling_is_left_to_it(tmp_path: Path) -> None:
    """Workers share the pending file: a new worker charges what a dead process left, not the admissions of a
    sibling that is still serving them (that one replaces or drops them itself)."""
    with RedisProcess(tmp_path / "redis", appendonly=True) as server:
        pending = tmp_path / "pending.sqlite3"
        dead_pid = int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout)
        spool = Spool(str(pending))
        held = Reservation("x", (), (), 100, 1_500, 0.0)
        scopes = QuotaPolicy(settings()).scopes(principal="alice", team="ml", alias="chat")
        for rid, owner in (("sibling", os.getppid()), ("orphan", dead_pid)):
            record = UsageRecord(rid, "alice", "ml", "chat", "", "gpt-4o", 90, 10, 0, 1_500, outcome="unknown")
            spool.put(Pending("charge", record, replace(held, id=rid), scopes, owner=owner))
        spool.close()
        g = spooled_governor(server, pending)
        g.start(every=0.05)
        await asyncio.sleep(0.3)
        found = [r.request_id async for r in g.ledger.records(since=0)]
        assert g.spool is not None
        left = [p.record.request_id for p in g.spool.load()]
        await g.close()
        assert (found, left) == (["orphan"], ["sibling"])
