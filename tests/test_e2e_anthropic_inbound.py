"""Claude-style clients: the real ``anthropic`` SDK, pointed at the gateway with a dev token.

``POST /v1/messages`` goes through the same stages as chat completions (authentication, aliases,
fallback, provider keys, usage) to an OpenAI-schema target or an Anthropic one, and everything the
client gets back (messages, stream events, errors, the model list) is in Anthropic's shape.
"""

from __future__ import annotations

import json

import anthropic
import pytest

from extproc.auth.devtoken import mint_dev_token
from extproc.config import load_config
from tests.helpers import ANTHROPIC_KEY, OPENAI_KEY, providers_for
from tests.fake_provider import Behaviour, count_prompt_tokens, split_reply

pytestmark = pytest.mark.e2e

ASK = [{"role": "user", "content": "Say hello."}]
EVENT_TYPES = ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
               "message_stop"]


@pytest.fixture
def gw(gateway, fake_openai, fake_anthropic, tmp_path):
    cfg = {
        "providers": providers_for(fake_openai, None, fake_anthropic),
        "models": {
            "gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}]},
            "claude-sonnet": {"targets": [{"provider": "anthropic", "model": "claude-sonnet-4-5"}]},
            "claude-then-gpt": {"targets": [{"provider": "anthropic", "model": "claude-sonnet-4-5"},
                                            {"provider": "openai", "model": "gpt-4o-mini"}]},
        },
        "teams": {"ml": {"models": ["gpt-4o", "claude-sonnet", "claude-then-gpt"]}},
        "auth": {"mode": "jwt", "issuers": [{
            "issuer": "tollgate-dev", "audience": "tollgate", "dev_key_file": str(tmp_path / "dev-key.pem"),
            "claims": {"principal": "sub", "teams": "groups"}}]},
    }
    return gateway(cfg)


@pytest.fixture
def client(gw):
    token = mint_dev_token(load_config(gw.config_path).auth.issuers[0], sub="alice", team="ml")
    return anthropic.Anthropic(base_url=gw.base_url.removesuffix("/v1"), api_key=token, max_retries=0, timeout=30)


def test_a_message_through_an_openai_target_is_translated_both_ways(client, fake_openai):
    fake_openai.default = Behaviour(reply="Hello from GPT.")
    msg = client.messages.create(model="gpt-4o", max_tokens=100, system="Be brief.", messages=ASK,
                                 stop_sequences=["END"])
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Hello from GPT."
    assert msg.role == "assistant" and msg.stop_reason == "end_turn"
    sent = fake_openai.requests[0]
    assert sent.path == "/v1/chat/completions" and sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "x-api-key" not in sent.headers and "anthropic-version" not in sent.headers
    assert sent.json["messages"] == [{"role": "system", "content": "Be brief."}, *ASK]
    assert sent.json["max_tokens"] == 100 and sent.json["stop"] == ["END"]
    # usage: what the provider counted, computed here the way the fake counts it
    assert msg.usage.input_tokens == count_prompt_tokens(sent.json["messages"])
    assert msg.usage.output_tokens == len(split_reply("Hello from GPT."))


def test_a_message_through_an_anthropic_target_keeps_its_meaning(client, fake_anthropic):
    fake_anthropic.default = Behaviour(reply="Hello from Claude.")
    raw = client.messages.with_raw_response.create(model="claude-sonnet", max_tokens=64, system="Be brief.",
                                                   messages=ASK)
    msg = raw.parse()
    assert msg.content[0].text == "Hello from Claude." and msg.stop_reason == "end_turn"
    assert raw.headers["x-tollgate-provider"] == "anthropic" and raw.headers["x-tollgate-attempts"] == "1"
    sent = fake_anthropic.requests[0]
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY and sent.json["system"] == "Be brief."
    assert sent.json["model"] == "claude-sonnet-4-5" and sent.json["max_tokens"] == 64
    assert msg.usage.input_tokens == fake_anthropic.usage_log[0]["prompt_tokens"]
    assert msg.usage.output_tokens == fake_anthropic.usage_log[0]["completion_tokens"]


@pytest.mark.parametrize("alias, fake_name", [("gpt-4o", "fake_openai"), ("claude-sonnet", "fake_anthropic")])
def test_a_stream_arrives_as_anthropic_events_with_usage(client, request, alias, fake_name):
    fake = request.getfixturevalue(fake_name)
    reply = "One two three four five six."
    fake.default = Behaviour(reply=reply, token_delay=0.01)
    with client.messages.stream(model=alias, max_tokens=100, messages=ASK) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events if e.type in EVENT_TYPES]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert sorted(set(kinds), key=EVENT_TYPES.index) == EVENT_TYPES
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == reply
    assert final.content[0].text == reply and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == fake.usage_log[0]["completion_tokens"] == len(split_reply(reply))
    assert final.usage.input_tokens == fake.usage_log[0]["prompt_tokens"]


def test_tool_use_goes_out_as_a_function_and_comes_back_as_a_tool_use_block(client, fake_openai):
    fake_openai.default = Behaviour(tool_call={"name": "get_weather", "arguments": {"city": "Paris"}})
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    msg = client.messages.create(model="gpt-4o", max_tokens=100, messages=ASK, tools=tools,
                                 tool_choice={"type": "any"})
    assert msg.stop_reason == "tool_use"
    block = msg.content[0]
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}
    sent = fake_openai.requests[0].json
    assert sent["tools"][0]["function"]["parameters"] == tools[0]["input_schema"] and sent["tool_choice"] == "required"
    # the result goes back as an OpenAI tool message, tied to the call
    follow_up = [*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": block.id, "name": block.name,
                                                          "input": block.input}]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "18 C"}]}]
    fake_openai.default = Behaviour(reply="It is 18 C.")
    with client.messages.stream(model="gpt-4o", max_tokens=100, messages=follow_up, tools=tools) as stream:
        assert stream.get_final_text() == "It is 18 C."
    sent = fake_openai.requests[1].json["messages"]
    assert sent[1]["tool_calls"][0]["id"] == block.id and json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) \
        == {"city": "Paris"}
    assert sent[2] == {"role": "tool", "tool_call_id": block.id, "content": "18 C"}


def test_a_streamed_tool_call_is_a_tool_use_block(client, fake_openai):
    fake_openai.default = Behaviour(tool_call={"name": "lookup", "arguments": {"q": "tollgate"}}, chunks=4)
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    with client.messages.stream(model="gpt-4o", max_tokens=100, messages=ASK, tools=tools) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "tool_use" and final.content[0].input == {"q": "tollgate"}


def test_fallback_works_for_an_anthropic_client(client, fake_anthropic, fake_openai):
    fake_anthropic.behaviours.append(Behaviour(status=529))
    fake_openai.default = Behaviour(reply="GPT stepped in.")
    raw = client.messages.with_raw_response.create(model="claude-then-gpt", max_tokens=50, messages=ASK)
    assert raw.parse().content[0].text == "GPT stepped in."
    assert raw.headers["x-tollgate-provider"] == "openai" and raw.headers["x-tollgate-attempts"] == "2"
    assert fake_openai.requests[0].json["model"] == "gpt-4o-mini"  # the OpenAI body, not the client's bytes


def test_errors_are_in_anthropics_shape(client, gw, fake_openai):
    with pytest.raises(anthropic.NotFoundError) as nf:
        client.messages.create(model="nope", max_tokens=10, messages=ASK)
    assert nf.value.body["type"] == "error" and nf.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="gpt-4o", max_tokens=10, messages=[{"role": "robot", "content": "x"}])
    assert bad.value.body["error"]["type"] == "invalid_request_error" and "role" in bad.value.body["error"]["message"]
    status, _, body = gw.raw("POST", "/v1/messages", b'{"model": "gpt-4o", "messages": []}',
                             headers={"x-api-key": client.api_key, "content-type": "application/json"})
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    stranger = anthropic.Anthropic(base_url=str(client.base_url), api_key="not-a-token", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        stranger.messages.create(model="gpt-4o", max_tokens=10, messages=ASK)
    assert auth.value.body["error"]["type"] == "authentication_error"
    fake_openai.behaviours.append(Behaviour(status=500))
    with pytest.raises(anthropic.InternalServerError) as upstream:
        client.messages.create(model="gpt-4o", max_tokens=10, messages=ASK)
    assert upstream.value.body["type"] == "error" and upstream.value.body["error"]["type"] == "api_error"
    assert not fake_openai.requests or all("x-api-key" not in r.headers for r in fake_openai.requests)


def test_a_stream_that_breaks_ends_with_an_anthropic_error_event(client, fake_openai):
    fake_openai.default = Behaviour(reply="one two three four five", error_event_after_chunks=2)
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(model="gpt-4o", max_tokens=100, messages=ASK) as stream:
            for _ in stream:
                pass
    assert caught.value.body["type"] == "error"


def test_the_sdks_model_listing_works_against_the_gateway(client):
    ids = [m.id for m in client.models.list()]
    assert sorted(ids) == ["claude-sonnet", "claude-then-gpt", "gpt-4o"]
    first = client.models.list().data[0]
    assert first.type == "model" and first.display_name == first.id
    assert client.models.retrieve("claude-sonnet").id == "claude-sonnet"
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.body["error"]["type"] == "not_found_error"


def test_the_guardrails_hold_for_an_anthropic_client_in_both_directions(gateway, fake_openai):
    # they read the request and the answer in OpenAI's shape, before the answer is written in Anthropic's
    gw = gateway({"providers": providers_for(fake_openai),
                  "models": {"gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}},
                  "guardrails": {"rules": {"card": "redact", "credential": "block"}}})
    claude = anthropic.Anthropic(base_url=gw.base_url.removesuffix("/v1"), api_key="any", max_retries=0, timeout=30)
    card = "4111 1111 1111 1111"
    claude.messages.create(model="gpt-4o", max_tokens=50, messages=[{"role": "user", "content": f"Card {card}?"}])
    assert card not in fake_openai.requests[0].body.decode()
    secret = "AKIAZ5GMHYJ7N3XW4QRT"
    fake_openai.default = Behaviour(reply=f"Sure. The deploy key is {secret} and it works everywhere.", chunks=20)
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        with claude.messages.stream(model="gpt-4o", max_tokens=100, messages=ASK) as stream:
            for text in stream.text_stream:
                seen.append(text)
    assert caught.value.body["type"] == "error" and "credential" in caught.value.body["error"]["message"]
    assert secret[:4] not in "".join(seen) and secret[-4:] not in "".join(seen)
