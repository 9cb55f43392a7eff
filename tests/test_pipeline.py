"""The data path message by message, in-process: the real ext_proc servicer and stub, no Envoy, no provider.

Each spec plays Envoy's side of the ext_proc protocol (tests/inprocess.py) and
reads each answer: which phase it answers, what it sets and removes, when it
is an ImmediateResponse, and what the exchange costs in the access log once
it is settled. Prices for the expectations come from the shipped price table,
computed here from the token counts the fake answers carry.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import redis as redis_sync
import redis.asyncio as redis_async
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.errors import Forbidden
from extproc.pipeline import messages
from extproc.pipeline.exchange import Exchange
from extproc.providers.base import Usage
from extproc.quota.ledger import UsageRecord
from extproc.quota.prices import DEFAULT_PRICES, PriceTable
from tests.helpers import ANTHROPIC_KEY, OPENAI_KEY
from tests.inprocess import (
    InProcessGateway,
    Stream,
    body_message,
    chat,
    headers_message,
    immediate_json,
    removed_headers,
    request_headers,
    set_headers,
)
from tests.quota.redis_process import RedisProcess

PRICES = PriceTable(DEFAULT_PRICES)


def config(**quota: Any) -> dict[str, Any]:
    """One alias ``gpt``: gpt-4o on OpenAI, falling back to Claude on Anthropic; a quota section when given."""
    cfg: dict[str, Any] = {
        "providers": {
            "openai": {"type": "openai", "base_url": "https://api.openai.example/v1", "api_key": {"env": "OPENAI_KEY"}},
            "anthropic": {"type": "anthropic", "base_url": "https://api.anthropic.example",
                          "api_key": {"env": "ANTHROPIC_KEY"}},
        },
        "models": {"gpt": {"targets": [{"provider": "openai", "model": "gpt-4o"},
                                       {"provider": "anthropic", "model": "claude-sonnet-4-5"}]}},
    }
    if quota:
        cfg["quota"] = quota
    return cfg


def state(tmp_path: Path) -> dict[str, str]:
    return {"XDG_STATE_HOME": str(tmp_path)}  # the embedded ledger and deny list stay in the test


def openai_answer(prompt: int, completion: int, text: str = "Hi!") -> bytes:
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }).encode()


def sse_chunk(content: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    chunk: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
                             "choices": [] if content is None else [{"index": 0, "delta": {"content": content}}]}
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def answer_headers(target: str, status: int = 200, content_type: str = "application/json") -> pb.ProcessingRequest:
    return headers_message("response_headers", {":status": str(status), "content-type": content_type,
                                                "x-tollgate-target": target})


async def routed(gw: InProcessGateway, body: bytes, *, request_id: str = "req-1") -> tuple[Stream, pb.ProcessingResponse]:
    """Open a router-level stream and send a request that is routed; returns the body phase's answer."""
    s = gw.open()
    head = await s.send(request_headers(request_id=request_id))
    assert head.WhichOneof("response") == "request_headers"
    resp = await s.send(body_message("request_body", body))
    assert resp.WhichOneof("response") == "request_body", resp
    return s, resp


def reaching_client(resp: pb.ProcessingResponse, sent: bytes) -> bytes:
    """What Envoy passes on for a streamed chunk: the mutated body, or the chunk as it came."""
    mutation = resp.response_body.response.body_mutation
    return mutation.body if mutation.HasField("body") else sent


async def ledger(gw: InProcessGateway) -> list[UsageRecord]:
    assert gw.runtime is not None and gw.runtime.governor is not None
    return [r async for r in gw.runtime.governor.ledger.records(since=0)]


def cost_usd(model: str, prompt: int, completion: int) -> float:
    return PRICES.cost(model, Usage(prompt, completion, 0)) / 1_000_000


# ---------------------------------------------------------------- phase order


async def test_a_routed_request_is_four_answers_in_phase_order_then_one_access_record(tmp_path):
    async with InProcessGateway(config(), state(tmp_path)) as gw:
        s = gw.open()
        head = await s.send(request_headers(authorization="Bearer sk-the-clients-own", **{"x-tollgate-route": "x"}))
        assert head.WhichOneof("response") == "request_headers"
        assert {"authorization", "x-tollgate-route"} <= set(removed_headers(head, "request_headers"))
        assert head.mode_override.response_body_mode == messages.BUFFERED  # the answer will be read

        body = await s.send(body_message("request_body", chat()))
        routing = set_headers(body, "request_body")
        assert routing["x-tollgate-route"] == "gpt" and routing["x-tollgate-prepared"] == "1"
        assert routing[":path"] == "/v1/chat/completions" and routing[":authority"] == "api.openai.example"
        assert routing["authorization"] == f"Bearer {OPENAI_KEY}"
        assert body.request_body.response.clear_route_cache

        answer = await s.send(answer_headers("gpt#0"))
        shown = set_headers(answer, "response_headers")
        assert (shown["x-tollgate-provider"], shown["x-tollgate-model"], shown["x-request-id"]) == ("openai", "gpt-4o",
                                                                                                   "req-1")
        assert "x-tollgate-target" in removed_headers(answer, "response_headers")

        whole = await s.send(body_message("response_body", openai_answer(12, 5)))
        costs = set_headers(whole, "response_body")
        assert (costs["x-tollgate-input-tokens"], costs["x-tollgate-output-tokens"]) == ("12", "5")
        assert float(costs["x-tollgate-cost-usd"]) == round(cost_usd("gpt-4o", 12, 5), 6)
        # Envoy has nothing more to send: the server ends the stream itself (server._final), then records
        assert await s.call.read() is grpc.aio.EOF
        await s.close()

        [record] = await gw.settled()
        assert (record["status"], record["provider"], record["attempts"], record["error"]) == (200, "openai", 1, None)
        assert (record["input_tokens"], record["output_tokens"]) == (12, 5)
        assert record["cost_usd"] == round(cost_usd("gpt-4o", 12, 5), 8)
        assert record["response_model"] == "gpt-4o-2024-08-06"


async def test_a_fallback_attempt_is_translated_for_its_own_target_and_the_answer_read_by_the_router(tmp_path):
    async with InProcessGateway(config(), state(tmp_path)) as gw:
        router, _ = await routed(gw, chat(max_tokens=50))
        attempt = gw.open("attempt")
        head = await attempt.send(headers_message("request_headers", {
            ":path": "/v1/chat/completions", ":method": "POST", "x-request-id": "req-1",
            "x-tollgate-chosen": "gpt#1", "authorization": f"Bearer {OPENAI_KEY}"}))
        target = set_headers(head, "request_headers")
        assert (target[":path"], target["x-api-key"]) == ("/v1/messages", ANTHROPIC_KEY)
        assert "authorization" in removed_headers(head, "request_headers")  # the primary's key never goes along
        body = await attempt.send(body_message("request_body", b"(the primary's translation, kept by Envoy)"))
        sent = json.loads(body.request_body.response.body_mutation.body)
        assert (sent["model"], sent["max_tokens"], sent["messages"][0]["role"]) == ("claude-sonnet-4-5", 50, "user")
        await attempt.close()

        await router.send(answer_headers("gpt#1"))
        claude = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                  "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn",
                  "usage": {"input_tokens": 9, "output_tokens": 2}}
        whole = await router.send(body_message("response_body", json.dumps(claude).encode()))
        shown = json.loads(whole.response_body.response.body_mutation.body)
        assert shown["object"] == "chat.completion" and shown["choices"][0]["message"]["content"] == "Hello"
        await router.close()

        [record] = await gw.settled()
        assert (record["provider"], record["model"], record["attempts"]) == ("anthropic", "claude-sonnet-4-5", 2)
        assert record["cost_usd"] == round(cost_usd("claude-sonnet-4-5", 9, 2), 8)


async def test_trailers_that_were_never_asked_for_are_answered_in_their_own_phase(tmp_path):
    async with InProcessGateway(config(), state(tmp_path)) as gw:
        s, _ = await routed(gw, chat())
        trailers = pb.ProcessingRequest()
        trailers.request_trailers.SetInParent()
        resp = await s.send(trailers)
        assert resp.WhichOneof("response") == "request_trailers"
        await s.close()


# ---------------------------------------------------------------- errors become ImmediateResponses


async def test_a_bad_body_is_an_immediate_openai_error_and_nothing_is_held(tmp_path):
    async with InProcessGateway(config(), state(tmp_path)) as gw:
        s = gw.open()
        await s.send(request_headers())
        resp = await s.send(body_message("request_body", b'{"model": "gpt", "messages": [}'))
        status, body, headers = immediate_json(resp)
        assert status == 400 and headers["x-request-id"] == "req-1"
        assert (body["error"]["type"], body["error"]["code"]) == ("invalid_request_error", "invalid_json")
        assert resp.dynamic_metadata.fields["tollgate"].struct_value.fields["own_reply"].bool_value
        assert len(gw.runtime.exchanges) == 0  # refused before an exchange was opened
        await s.close()
        assert await gw.settled() == []  # a refusal before the exchange is counted by metrics, not logged


async def test_an_unknown_path_is_refused_at_the_headers_and_the_body_never_asked_for(tmp_path):
    async with InProcessGateway(config(), state(tmp_path)) as gw:
        s = gw.open()
        resp = await s.send(request_headers(path="/v1/completions"))
        status, body, _ = immediate_json(resp)
        assert (status, body["error"]["code"]) == (404, "unknown_url")
        await s.close()


async def test_a_second_request_with_an_id_in_flight_is_refused_and_the_first_is_untouched(tmp_path):
    async with InProcessGateway(config(), state(tmp_path)) as gw:
        first, _ = await routed(gw, chat())
        second = gw.open()
        await second.send(request_headers())
        status, body, _ = immediate_json(await second.send(body_message("request_body", chat())))
        assert (status, body["error"]["code"]) == (400, "duplicate_request_id")
        await second.close()
        await first.send(answer_headers("gpt#0"))
        await first.send(body_message("response_body", openai_answer(3, 1)))
        await first.close()
        [record] = await gw.settled()
        assert record["status"] == 200


# ---------------------------------------------------------------- the stage list


async def test_a_stage_that_answers_ends_the_pipeline_before_the_route(tmp_path):
    """What a cache hit does: its ImmediateResponse goes out, no target is prepared, no quota held."""
    seen: list[str] = []

    def hit(ex: Exchange) -> pb.ProcessingResponse:
        seen.append(ex.alias)
        ex.cache = "hit"
        return messages.immediate(200, openai_answer(0, 0, "from the cache"), {"x-request-id": ex.request_id})

    limits = {"org": {"usd_per_day": 1}}
    async with InProcessGateway(config(limits=limits), state(tmp_path)) as gw:
        gw.processor.stages = (hit, *gw.processor.stages)
        s = gw.open()
        await s.send(request_headers())
        status, body, _ = immediate_json(await s.send(body_message("request_body", chat())))
        assert status == 200 and body["choices"][0]["message"]["content"] == "from the cache"
        assert seen == ["gpt"]
        await s.close()
        [record] = await gw.settled()
        assert (record["cache"], record["attempts"], record["provider"], record["cost_usd"]) == ("hit", 0, None, 0)
        assert await ledger(gw) == []  # nothing billed


async def test_stages_run_in_order_an_awaited_one_included_and_a_refusal_stops_them(tmp_path):
    order: list[str] = []

    async def slow(ex: Exchange) -> None:
        order.append("slow")

    def guard(ex: Exchange) -> None:
        order.append("guard")
        if "forbidden" in json.dumps(ex.body["messages"]):
            raise Forbidden("this prompt is not allowed", code="prompt_blocked")

    async with InProcessGateway(config(), state(tmp_path)) as gw:
        gw.processor.stages = (slow, guard, *gw.processor.stages)
        s, resp = await routed(gw, chat())
        assert set_headers(resp, "request_body")["x-tollgate-route"] == "gpt"
        assert order == ["slow", "guard"]
        await s.close()

        blocked = gw.open()
        await blocked.send(request_headers(request_id="req-2"))
        refused = chat(messages=[{"role": "user", "content": "something forbidden"}])
        status, body, headers = immediate_json(await blocked.send(body_message("request_body", refused)))
        assert (status, body["error"]["code"], headers["x-request-id"]) == (403, "prompt_blocked", "req-2")
        await blocked.close()
        records = await gw.settled()
        assert [(r["request_id"], r["status"], r["error"]) for r in records] == [
            ("req-1", None, None), ("req-2", 403, "prompt_blocked")]


async def test_a_stage_that_breaks_is_a_500_in_the_error_shape_and_the_next_request_is_served(tmp_path):
    def broken(ex: Exchange) -> None:
        raise RuntimeError(f"a bug that must not leak {OPENAI_KEY}")

    async with InProcessGateway(config(), state(tmp_path)) as gw:
        stages = gw.processor.stages
        gw.processor.stages = (broken, *stages)
        s = gw.open()
        await s.send(request_headers())
        status, body, _ = immediate_json(await s.send(body_message("request_body", chat())))
        assert (status, body["error"]["code"]) == (500, "internal_error")
        assert OPENAI_KEY not in json.dumps(body)
        await s.close()
        gw.processor.stages = stages
        after, resp = await routed(gw, chat(), request_id="req-2")
        assert set_headers(resp, "request_body")["x-tollgate-route"] == "gpt"
        await after.close()


# ---------------------------------------------------------------- metering and the stream cut


async def test_a_stream_is_metered_from_its_usage_chunk_and_priced_once(tmp_path):
    async with InProcessGateway(config(stream_slice_tokens=64), state(tmp_path)) as gw:
        s, resp = await routed(gw, chat(stream=True))
        sent = json.loads(resp.request_body.response.body_mutation.body)
        assert sent["stream_options"] == {"include_usage": True}  # asked for, so every stream is metered
        head = await s.send(answer_headers("gpt#0", content_type="text/event-stream"))
        assert head.mode_override.response_body_mode == messages.STREAMED
        for word in ("Hello", " there", "!"):
            out = await s.send(body_message("response_body", sse_chunk(word), end_of_stream=False))
            assert reaching_client(out, sse_chunk(word)) == sse_chunk(word)
        usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
        last = await s.send(body_message("response_body", sse_chunk(usage=usage) + b"data: [DONE]\n\n"))
        tail = reaching_client(last, b"")
        assert tail.endswith(b"data: [DONE]\n\n")
        assert b'"usage"' not in tail  # the client did not ask for it
        await s.close()
        [record] = await gw.settled()
        assert (record["input_tokens"], record["output_tokens"], record["error"]) == (10, 3, None)
        assert record["cost_usd"] == round(cost_usd("gpt-4o", 10, 3), 8)
        assert record["ttft_ms"] is not None
        [billed] = await ledger(gw)
        assert (billed.input_tokens, billed.output_tokens) == (10, 3)
        assert billed.micro_usd == PRICES.cost("gpt-4o", Usage(10, 3, 0))


async def test_a_stream_over_its_token_limit_is_cut_with_an_error_event_then_stopped(tmp_path):
    limits = {"aliases": {"gpt": {"tokens_per_minute": 60}}}
    async with InProcessGateway(config(stream_slice_tokens=8, limits=limits), state(tmp_path)) as gw:
        s, _ = await routed(gw, chat(stream=True))
        await s.send(answer_headers("gpt#0", content_type="text/event-stream"))
        passed, stop = 0, None
        for _ in range(100):
            await s.call.write(body_message("response_body", sse_chunk(" hello"), end_of_stream=False))
            out = await s.call.read()
            chunk = out.response_body.response.body_mutation.body
            if b"the stream was ended here" in chunk:
                stop = await s.call.read()  # the second answer to the same message: stop the exchange
                break
            passed += 1
        assert stop is not None, "the stream was never cut"
        error = json.loads(chunk.split(b"data: ")[-1])["error"]
        assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
        assert stop.immediate_response.details == "tollgate_stream_cut" and stop.immediate_response.status.code == 429
        assert 0 < passed < 60
        await s.close()
        [record] = await gw.settled()
        assert (record["status"], record["error"]) == (200, "rate_limit_exceeded")
        assert passed <= record["output_tokens"] <= passed + 1  # what the provider produced, the cut chunk too


async def test_a_hold_granted_while_the_server_stops_is_released_before_the_store_closes(tmp_path):
    """A request whose quota reserve is still on its way when the server stops (Envoy's stream is cancelled):
    stopping waits for Redis's answer and settles that hold as unsent before closing the store, so no lease is
    left behind to expire into a charge for a request that never reached a provider."""
    with RedisProcess(tmp_path / "redis") as redis:
        cfg = {**config(limits={"org": {"usd_per_day": 10}}), "redis": {"url": redis.url}}
        async with InProcessGateway(cfg, env=state(tmp_path)) as gw:
            s = gw.open()
            await s.send(request_headers(request_id="stopping-1"))
            pauser = redis_async.Redis.from_url(redis.url)
            await pauser.execute_command("CLIENT", "PAUSE", "200", "ALL")  # Redis answers in 0.2 s (timeout 0.25)
            await pauser.aclose()
            await s.call.write(body_message("request_body", chat()))
            await asyncio.sleep(0.05)  # the reserve is sent and waits for Redis
        # leaving the block stopped the server (cancelling the stream) and closed the runtime
        store = redis_sync.Redis.from_url(redis.url, decode_responses=True)
        held = json.loads(store.hget("{tollgate}:reservations", "stopping-1") or "{}")
        budgets = [int(store.get(k) or 0) for k in store.scan_iter("{tollgate}:bg:*")]
        assert held.get("s") == "settled" and int(held["dm"]) < 0  # it was granted, then given back
        assert store.zcard("{tollgate}:leases") == 0 and budgets and sum(budgets) == 0
        [(_, record)] = store.xrange("{tollgate}:usage")
        assert (record["request_id"], record["outcome"], record["micro_usd"]) == ("stopping-1", "unsent", "0")
        store.close()


def test_a_chunk_passed_unchanged_gets_the_empty_body_answer_and_later_answers_leave_it_so() -> None:
    passed = messages.stream_body(None)
    expected = pb.ProcessingResponse()
    expected.response_body.SetInParent()
    assert passed.SerializeToString() == expected.SerializeToString()
    changed = messages.stream_body(b"data: [DONE]\n\n")  # a rewritten chunk, and a cut, are answers of their own
    last, stop = messages.cut_stream(b"data: {}\n\n", 429)
    assert changed.response_body.response.body_mutation.body == b"data: [DONE]\n\n"
    assert last.response_body.response.body_mutation.body == b"data: {}\n\n" and stop.HasField("immediate_response")
    assert messages.stream_body(None).SerializeToString() == expected.SerializeToString()
