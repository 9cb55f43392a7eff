"""The outcome stage and the Anthropic way in, in-process: the real servicer, messages as Envoy sends them.

The end-to-end specs (test_key_pools.py, test_e2e_anthropic_inbound.py) show what clients see; these show
the decisions message by message, in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.pipeline import messages
from extproc.pipeline.exchange import Exchange
from tests.helpers import OPENAI_KEY
from tests.inprocess import (
    InProcessGateway,
    body_message,
    headers_message,
    immediate_json,
    request_headers,
    set_headers,
)

SECOND_KEY = "sk-second-0b8d3e"


def config(**alias: Any) -> dict[str, Any]:
    return {
        "providers": {
            "openai": {"type": "openai", "base_url": "https://api.openai.example/v1",
                       "api_keys": [{"env": "OPENAI_KEY"}, {"env": "OPENAI_KEY_2"}]},
            "anthropic": {"type": "anthropic", "base_url": "https://api.anthropic.example",
                          "api_key": {"env": "ANTHROPIC_KEY"}},
        },
        "models": {"gpt": {"targets": [{"provider": "openai", "model": "gpt-4o"},
                                       {"provider": "anthropic", "model": "claude-sonnet-4-5"}], **alias},
                   "solo": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}},
    }


def env(tmp_path: Path) -> dict[str, str]:
    return {"OPENAI_KEY_2": SECOND_KEY, "XDG_STATE_HOME": str(tmp_path)}


def chat(model: str = "gpt") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}]}).encode()


async def failed(gw: InProcessGateway, target: str, status: int, **headers: str) -> dict[str, str]:
    """A failed attempt's response headers through the outcome stage; the headers it sets."""
    s = gw.open("outcome")
    resp = await s.send(headers_message("response_headers", {":status": str(status), "x-tollgate-target": target,
                                                             "x-tollgate-rid": "req-1",
                                                             "content-type": "application/json", **headers}))
    assert "x-tollgate-rid" in resp.response_headers.response.header_mutation.remove_headers
    await s.close()
    return set_headers(resp, "response_headers")


async def test_a_refused_key_is_quarantined_and_the_key_slot_gets_the_other_one(tmp_path):
    async with InProcessGateway(config(), env(tmp_path)) as gw:
        s = gw.open()
        await s.send(request_headers())
        routed = await s.send(body_message("request_body", chat()))
        first = set_headers(routed, "request_body")["authorization"]
        assert await failed(gw, "gpt#0", 401) == {"x-tollgate-retry": "key"}  # a key slot of gpt#0 follows
        attempt = gw.open("attempt")
        again = await attempt.send(request_headers(request_id="req-1", **{"x-tollgate-chosen": "gpt#0~1"}))
        second = set_headers(again, "request_headers")["authorization"]
        assert {first, second} == {f"Bearer {OPENAI_KEY}", f"Bearer {SECOND_KEY}"}
        await attempt.close()
        answer = await s.send(headers_message("response_headers", {":status": "200", "x-tollgate-target": "gpt#0~1",
                                                                   "content-type": "application/json"}))
        assert set_headers(answer, "response_headers")["x-tollgate-attempt-outcomes"] == "openai=401,openai=200"
        assert gw.runtime is not None
        # the refused key is out of the pool: the next requests all get the other one
        for _ in range(3):
            assert gw.runtime.vault.headers(gw.config.providers["openai"])["authorization"] == second


async def test_a_401_on_the_last_key_slot_is_the_clients_unless_the_alias_falls_back_on_it(tmp_path):
    async with InProcessGateway(config(), env(tmp_path)) as gw:
        s = gw.open()
        await s.send(request_headers())
        await s.send(body_message("request_body", chat()))
        assert await failed(gw, "gpt#0~1", 401) == {}
    async with InProcessGateway(config(fallback_on=["5xx", "401"]), env(tmp_path)) as gw:
        s = gw.open()
        await s.send(request_headers())
        await s.send(body_message("request_body", chat()))
        assert await failed(gw, "gpt#0~1", 401) == {"x-tollgate-retry": "fallback"}


async def test_only_outcomes_the_policy_names_move_on(tmp_path):
    async with InProcessGateway(config(fallback_on=["5xx"]), env(tmp_path)) as gw:
        s = gw.open()
        await s.send(request_headers())
        await s.send(body_message("request_body", chat()))
        assert await failed(gw, "gpt#0~1", 503) == {"x-tollgate-retry": "fallback"}
        assert await failed(gw, "gpt#0~1", 429) == {}  # not in the policy
        assert await failed(gw, "gpt#0~1", 400) == {}  # a client error is never retried
        assert await failed(gw, "gpt#1", 503) == {}  # no later target


async def test_a_429_with_retry_after_cools_the_key_that_got_it(tmp_path):
    async with InProcessGateway(config(), env(tmp_path)) as gw:
        s = gw.open()
        await s.send(request_headers())
        routed = await s.send(body_message("request_body", chat("solo")))
        cooled = set_headers(routed, "request_body")["authorization"]
        await failed(gw, "solo#0", 429, **{"retry-after": "30"})
        assert gw.runtime is not None
        provider = gw.config.providers["openai"]
        assert all(gw.runtime.vault.headers(provider)["authorization"] != cooled for _ in range(4))


async def test_an_anthropic_clients_stream_cut_by_its_quota_ends_with_an_anthropic_error_event(tmp_path):
    limits = {"aliases": {"gpt": {"tokens_per_minute": 60}}}
    cfg = {**config(), "quota": {"stream_slice_tokens": 8, "limits": limits}}
    async with InProcessGateway(cfg, env(tmp_path)) as gw:
        s = gw.open()
        await s.send(request_headers("/v1/messages", **{"x-api-key": "caller", "anthropic-version": "2023-06-01"}))
        body = {"model": "gpt", "max_tokens": 500, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
        routed = await s.send(body_message("request_body", json.dumps(body).encode()))
        sent = json.loads(routed.request_body.response.body_mutation.body)
        assert sent["messages"] == [{"role": "user", "content": "Hi"}] and sent["stream_options"]["include_usage"]
        await s.send(headers_message("response_headers", {":status": "200", "x-tollgate-target": "gpt#0",
                                                          "content-type": "text/event-stream"}))
        out = b""
        for _ in range(100):
            chunk = b'data: {"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":" hello"}}]}\n\n'
            await s.call.write(body_message("response_body", chunk, end_of_stream=False))
            part = (await s.call.read()).response_body.response.body_mutation.body
            out += part
            if b"event: error" in part:
                stop = await s.call.read()
                assert stop.immediate_response.status.code == 429
                break
        events = [line for line in out.decode().splitlines() if line.startswith("event: ")]
        assert events[0] == "event: message_start" and events[-1] == "event: error"
        error = json.loads(out.decode().rsplit("data: ", 1)[-1])
        assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
        assert "message_stop" not in out.decode()
        await s.close()


async def test_an_answer_a_stage_gives_itself_reaches_an_anthropic_client_in_anthropics_shape(tmp_path):
    """What a cache hit will do: the stage writes OpenAI's completion; the client of /v1/messages reads a message."""
    completion = {"id": "chatcmpl-9", "object": "chat.completion", "model": "gpt-4o",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the cache"},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 7, "completion_tokens": 3}}

    def hit(ex: Exchange) -> pb.ProcessingResponse:
        return messages.immediate(200, json.dumps(completion).encode(), {"x-request-id": ex.request_id})

    async with InProcessGateway(config(), env(tmp_path)) as gw:
        gw.processor.stages = (hit, *gw.processor.stages)
        s = gw.open()
        await s.send(request_headers("/v1/messages", **{"anthropic-version": "2023-06-01"}))
        body = {"model": "gpt", "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}]}
        status, got, _ = immediate_json(await s.send(body_message("request_body", json.dumps(body).encode())))
        assert status == 200 and got["type"] == "message" and got["content"] == [{"type": "text",
                                                                                 "text": "from the cache"}]
        assert got["usage"]["input_tokens"] == 7 and got["usage"]["output_tokens"] == 3
        assert got["stop_reason"] == "end_turn"
        await s.close()
