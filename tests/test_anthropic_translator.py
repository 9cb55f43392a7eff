"""Specs for the OpenAI chat-completions <-> Anthropic Messages translator.

Fixtures are written in the shapes Anthropic documents for the Messages API
(and are checked against the anthropic SDK's own models below); the
translated output is checked against the openai SDK, which is what clients run.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import anthropic.types
import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

try:  # the HTTP client the installed openai SDK is built on
    import httpx2 as httpx
except ImportError:
    import httpx

from extproc.providers.settings import Provider, Target
from extproc.errors import BadRequest, UpstreamError
from extproc.providers.anthropic import AnthropicTranslator
from extproc.providers.base import ChunkResult, Usage
from extproc.providers.sse import SSEParser

NOW = 1_750_000_000
PROVIDER = Provider(name="claude", type="anthropic", base_url="https://api.anthropic.com", default_max_tokens=1024)
TARGET = Target(provider="claude", model="claude-sonnet-4-5")
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="


def make(endpoint: str = "chat", provider: Provider = PROVIDER, meter_text: bool = False) -> AnthropicTranslator:
    return AnthropicTranslator(provider, TARGET, endpoint, clock=lambda: NOW, meter_text=meter_text)


def translate_request(body: dict[str, Any]) -> dict[str, Any]:
    upstream = make().request(body, json.dumps(body).encode())
    assert upstream.body is not None
    return json.loads(upstream.body)


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def chat(*messages: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {"model": "my-alias", "messages": list(messages), **params}


def expected(*messages: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": list(messages), **params}


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TOOL_CALLS = [
    {"id": "toolu_01A", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "toolu_01B", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
]

# --------------------------------------------------------------------------- request: where it goes


def test_request_goes_to_the_messages_endpoint_with_a_version_and_no_credentials() -> None:
    provider = Provider(name="proxy", type="anthropic", base_url="https://llm.example/anthropic/",
                        anthropic_version="2024-01-01")
    upstream = AnthropicTranslator(provider, TARGET, "chat").request(chat(user("hi")), b"")
    assert upstream.path == "/anthropic/v1/messages"
    assert upstream.headers == {"content-type": "application/json", "anthropic-version": "2024-01-01"}


def test_embeddings_are_refused_with_a_clear_error() -> None:
    with pytest.raises(BadRequest) as raised:
        make("embeddings").request({"model": "my-alias", "input": "hello"}, b"")
    assert raised.value.status == 400
    assert raised.value.code == "unsupported_endpoint"
    assert "does not offer embeddings" in raised.value.message


# --------------------------------------------------------------------------- request: mapping table

REQUEST_CASES = [
    pytest.param(chat(user("hi")), expected(user("hi")), id="minimal request gets the default max_tokens"),
    pytest.param(
        chat({"role": "system", "content": "Be brief."},
             {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
             user("hi")),
        expected(user("hi"), system="Be brief.\n\nAnswer in French."),
        id="system and developer messages become the system text",
    ),
    pytest.param(
        chat(user("one"), user([{"type": "text", "text": "two"}]), {"role": "assistant", "content": "three"},
             {"role": "assistant", "content": "four"}),
        expected(user([{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]),
                 {"role": "assistant",
                  "content": [{"type": "text", "text": "three"}, {"type": "text", "text": "four"}]}),
        id="consecutive messages of one role are merged",
    ),
    pytest.param(
        chat(user("hi"), temperature=0.3, top_p=0.9, stop="END", max_tokens=50, stream=True, user="u-42"),
        expected(user("hi"), max_tokens=50, temperature=0.3, top_p=0.9, stop_sequences=["END"], stream=True,
                 metadata={"user_id": "u-42"}),
        id="sampling, stop, stream and user",
    ),
    pytest.param(chat(user("hi"), temperature=1.7), expected(user("hi"), temperature=1.0),
                 id="temperature above 1 is clamped to Anthropic's maximum"),
    pytest.param(chat(user("hi"), max_completion_tokens=77, max_tokens=5), expected(user("hi"), max_tokens=77),
                 id="max_completion_tokens wins over max_tokens"),
    pytest.param(chat(user("hi"), stop=["###", "", "\n\nHuman:"]),
                 expected(user("hi"), stop_sequences=["###", "\n\nHuman:"]), id="stop list without empty entries"),
    pytest.param(
        chat(user("hi"), n=1, logprobs=False, seed=7, presence_penalty=0.5, frequency_penalty=0.1,
             stream_options={"include_usage": True}, store=False, reasoning_effort="low"),
        expected(user("hi")),
        id="harmless and ignored parameters are dropped",
    ),
    pytest.param(
        chat(user("Weather in Paris?"), tools=[WEATHER_TOOL]),
        expected(user("Weather in Paris?"), tools=[WEATHER_TOOL_ANTHROPIC]),
        id="function tools become tools with input_schema",
    ),
    pytest.param(
        chat(user("x"), tools=[{"type": "function", "function": {"name": "now"}}], parallel_tool_calls=False),
        expected(user("x"), tools=[{"name": "now", "input_schema": {"type": "object", "properties": {}}}],
                 tool_choice={"type": "auto", "disable_parallel_tool_use": True}),
        id="a tool without parameters and parallel_tool_calls false",
    ),
    pytest.param(chat(user("x"), tool_choice="none"), expected(user("x")), id="tool_choice without tools is dropped"),
    pytest.param(
        chat(user("Weather in Paris and Oslo?"),
             {"role": "assistant", "content": "", "tool_calls": TOOL_CALLS},
             {"role": "tool", "tool_call_id": "toolu_01A", "content": "18°C, sunny"},
             {"role": "tool", "tool_call_id": "toolu_01B", "content": [{"type": "text", "text": "4°C, snow"}]},
             user("Thanks! Which is warmer?")),
        expected(
            user("Weather in Paris and Oslo?"),
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_01B", "name": "get_weather", "input": {"city": "Oslo"}},
            ]},
            user([
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "18°C, sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_01B", "content": [{"type": "text", "text": "4°C, snow"}]},
                {"type": "text", "text": "Thanks! Which is warmer?"},
            ]),
        ),
        id="tool calls become tool_use blocks and tool messages tool_result blocks",
    ),
    pytest.param(
        chat(user("go"), {"role": "assistant", "content": "Checking.", "tool_calls": TOOL_CALLS[:1]},
             user("hurry up"), {"role": "tool", "tool_call_id": "toolu_01A", "content": ""}),
        expected(
            user("go"),
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            user([{"type": "tool_result", "tool_use_id": "toolu_01A"}, {"type": "text", "text": "hurry up"}]),
        ),
        id="tool results are moved before other blocks of their turn",
    ),
    pytest.param(
        chat(user([
            {"type": "text", "text": "Compare these."},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        ])),
        expected(user([
            {"type": "text", "text": "Compare these."},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        ])),
        id="data-URL and https images",
    ),
    pytest.param(
        chat(user([{"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"}}])),
        expected(user([{"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                        "data": "JVBE"}}])),
        id="inline PDF files become documents",
    ),
    pytest.param(
        chat(user("A city?"), response_format={"type": "json_schema", "json_schema": {
            "name": "city", "strict": True,
            "schema": {"type": "object", "properties": {"name": {"type": "string"}}, "additionalProperties": False}}}),
        expected(user("A city?"), output_config={"format": {"type": "json_schema", "schema": {
            "type": "object", "properties": {"name": {"type": "string"}}, "additionalProperties": False}}}),
        id="json_schema response_format becomes output_config.format",
    ),
    pytest.param(chat(user("hi"), response_format={"type": "text"}), expected(user("hi")), id="text response_format"),
]


@pytest.mark.parametrize(("openai_body", "anthropic_body"), REQUEST_CASES)
def test_request_mapping(openai_body: dict[str, Any], anthropic_body: dict[str, Any]) -> None:
    assert translate_request(openai_body) == anthropic_body


@pytest.mark.parametrize(("tool_choice", "anthropic_choice"), [
    ("auto", {"type": "auto"}),
    ("none", {"type": "none"}),
    ("required", {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
])
def test_tool_choice_mapping(tool_choice: Any, anthropic_choice: dict[str, Any]) -> None:
    body = translate_request(chat(user("x"), tools=[WEATHER_TOOL], tool_choice=tool_choice))
    assert body["tool_choice"] == anthropic_choice


# --------------------------------------------------------------------------- request: refusals

BAD_REQUESTS = [
    pytest.param({"model": "m"}, "messages", id="no messages"),
    pytest.param(chat(), "messages", id="empty messages"),
    pytest.param({"model": "m", "messages": "hi"}, "messages", id="messages not a list"),
    pytest.param(chat("hi"), "messages[0]", id="message not an object"),
    pytest.param(chat({"content": "hi"}), "messages[0].role", id="missing role"),
    pytest.param(chat({"role": "robot", "content": "hi"}), "messages[0].role", id="unknown role"),
    pytest.param(chat({"role": "function", "name": "f", "content": "{}"}), "messages[0].role", id="legacy role"),
    pytest.param(chat(user(42)), "messages[0].content", id="content of the wrong type"),
    pytest.param(chat({"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://a/b.png"}}]}),
                 "messages[0].content[0]", id="system content that is not text"),
    pytest.param(chat(user([{"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}}])),
                 "messages[0].content[0]", id="audio input"),
    pytest.param(chat(user([{"type": "image_url", "image_url": {"url": "ftp://host/cat.png"}}])),
                 "messages[0].content[0].image_url.url", id="image URL scheme"),
    pytest.param(chat(user([{"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}])),
                 "messages[0].content[0].image_url.url", id="data URL not base64"),
    pytest.param(chat(user([{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0="}}])),
                 "messages[0].content[0].image_url.url", id="image media type"),
    pytest.param(chat(user([{"type": "file", "file": {"file_id": "file-abc"}}])),
                 "messages[0].content[0]", id="uploaded file reference"),
    pytest.param(
        chat(user("x"), {"role": "assistant", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}),
        "messages[1].tool_calls[0].function.arguments", id="tool call arguments not JSON"),
    pytest.param(
        chat(user("x"), {"role": "assistant", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}),
        "messages[1].tool_calls[0].function.arguments", id="tool call arguments not an object"),
    pytest.param(
        chat(user("x"), {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}),
        "messages[1].tool_calls[0]", id="tool call without id"),
    pytest.param(chat(user("x"), {"role": "tool", "content": "42"}), "messages[1].tool_call_id",
                 id="tool message without tool_call_id"),
    pytest.param(chat(user("x"), n=2), "n", id="several choices"),
    pytest.param(chat(user("x"), logprobs=True, top_logprobs=3), "logprobs", id="logprobs"),
    pytest.param(chat(user("x"), logit_bias={"1234": -100}), "logit_bias", id="logit_bias"),
    pytest.param(chat(user("x"), modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}),
                 "audio", id="audio output"),
    pytest.param(chat(user("x"), modalities=["text", "audio"]), "modalities", id="audio modality"),
    pytest.param(chat(user("x"), response_format={"type": "json_object"}), "response_format", id="json_object"),
    pytest.param(chat(user("x"), response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
                 "response_format", id="json_schema without a schema"),
    pytest.param(chat(user("x"), temperature=2.5), "temperature", id="temperature above OpenAI's range"),
    pytest.param(chat(user("x"), temperature="hot"), "temperature", id="temperature not a number"),
    pytest.param(chat(user("x"), top_p=1.5), "top_p", id="top_p above 1"),
    pytest.param(chat(user("x"), max_tokens=0), "max_tokens", id="max_tokens of 0"),
    pytest.param(chat(user("x"), max_completion_tokens="10"), "max_completion_tokens", id="max tokens as a string"),
    pytest.param(chat(user("x"), stop=5), "stop", id="stop not text"),
    pytest.param(chat(user("x"), tools=[{"type": "code_interpreter"}]), "tools[0]", id="non-function tool"),
    pytest.param(chat(user("x"), tools=[WEATHER_TOOL], tool_choice="sometimes"), "tool_choice", id="tool_choice"),
    pytest.param(chat(user("x"), functions=[WEATHER_TOOL["function"]]), "functions", id="legacy functions"),
    pytest.param(chat(user("x"), stream="yes"), "stream", id="stream not a boolean"),
]


@pytest.mark.parametrize(("body", "param"), BAD_REQUESTS)
def test_requests_anthropic_cannot_honour_are_refused_naming_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as raised:
        make().request(body, json.dumps(body).encode())
    error = json.loads(raised.value.body())["error"]
    assert raised.value.status == 400
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


# --------------------------------------------------------------------------- whole responses

TEXT_MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "Hello! "}, {"type": "text", "text": "How can I help?"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000,
              "output_tokens": 9, "service_tier": "standard"},
}
TOOL_MESSAGE = {
    "id": "msg_01Aq9w938a90dw8q",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "text", "text": "I'll check the weather in both cities."},
        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
         "input": {"city": "Paris", "unit": "celsius"}},
        {"type": "tool_use", "id": "toolu_01B", "name": "get_weather", "input": {"city": "Oslo"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 384, "output_tokens": 95},
}


def translate_response(message: dict[str, Any], translator: AnthropicTranslator | None = None) -> dict[str, Any]:
    out = (translator or make()).response(200, json.dumps(message).encode())
    assert out.body is not None
    return json.loads(out.body)


@pytest.mark.parametrize("message", [TEXT_MESSAGE, TOOL_MESSAGE], ids=["text", "tool_use"])
def test_fixtures_are_valid_anthropic_messages(message: dict[str, Any]) -> None:
    anthropic.types.Message.model_validate(message)


def test_a_text_message_becomes_a_chat_completion() -> None:
    assert translate_response(TEXT_MESSAGE) == {
        "id": "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL",
        "object": "chat.completion",
        "created": NOW,
        "model": "claude-sonnet-4-5-20250929",
        "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Hello! How can I help?", "refusal": None}}],
        "usage": {"prompt_tokens": 2112, "completion_tokens": 9, "total_tokens": 2121,
                  "prompt_tokens_details": {"cached_tokens": 2000}},
    }


def test_tool_use_blocks_become_tool_calls_with_json_arguments() -> None:
    choice = translate_response(TOOL_MESSAGE)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll check the weather in both cities."
    calls = choice["message"]["tool_calls"]
    assert [(c["id"], c["type"], c["function"]["name"]) for c in calls] == [
        ("toolu_01A09q90qw90lq917835lq9", "function", "get_weather"), ("toolu_01B", "function", "get_weather")]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris", "unit": "celsius"},
                                                                      {"city": "Oslo"}]


def test_a_message_with_only_tool_calls_has_null_content() -> None:
    message = {**TOOL_MESSAGE, "content": TOOL_MESSAGE["content"][1:]}
    assert translate_response(message)["choices"][0]["message"]["content"] is None


@pytest.mark.parametrize("message", [TEXT_MESSAGE, TOOL_MESSAGE], ids=["text", "tool_use"])
def test_translated_responses_parse_with_the_openai_sdk(message: dict[str, Any]) -> None:
    ChatCompletion.model_validate(translate_response(message))


def test_a_whole_response_records_usage_and_the_answering_model() -> None:
    result = make().response(200, json.dumps(TEXT_MESSAGE).encode())
    assert result.usage == Usage(prompt_tokens=2112, completion_tokens=9, cached_tokens=2000, cache_write_tokens=100)
    assert result.model == "claude-sonnet-4-5-20250929"


@pytest.mark.parametrize(("stop_reason", "finish_reason"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("pause_turn", "stop"), ("max_tokens", "length"),
    ("model_context_window_exceeded", "length"), ("tool_use", "tool_calls"), ("refusal", "content_filter"),
    (None, "stop"),
])
def test_stop_reasons_map_to_finish_reasons(stop_reason: str | None, finish_reason: str) -> None:
    answer = translate_response({**TEXT_MESSAGE, "stop_reason": stop_reason})
    assert answer["choices"][0]["finish_reason"] == finish_reason


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"type": "message"}', b"[]"])
def test_a_2xx_body_that_is_not_a_message_is_an_upstream_error(body: bytes) -> None:
    with pytest.raises(UpstreamError):
        make().response(200, body)


# --------------------------------------------------------------------------- errors


def anthropic_error(kind: str, message: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": kind, "message": message},
                       "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}).encode()


ERROR_CASES = [
    (400, anthropic_error("invalid_request_error", "messages: roles must alternate"),
     "messages: roles must alternate", "invalid_request_error", None),
    (401, anthropic_error("authentication_error", "invalid x-api-key"),
     "invalid x-api-key", "authentication_error", None),
    (403, anthropic_error("permission_error", "Your API key does not have permission to use the specified resource."),
     "Your API key does not have permission to use the specified resource.", "permission_error", None),
    (404, anthropic_error("not_found_error", "model: claude-nope"), "model: claude-nope",
     "invalid_request_error", "not_found"),
    (413, anthropic_error("request_too_large", "Request exceeds the maximum allowed number of bytes."),
     "Request exceeds the maximum allowed number of bytes.", "invalid_request_error", "request_too_large"),
    (429, anthropic_error("rate_limit_error", "Number of request tokens has exceeded your rate limit."),
     "Number of request tokens has exceeded your rate limit.", "requests", "rate_limit_exceeded"),
    (500, anthropic_error("api_error", "Internal server error"), "Internal server error", "api_error", None),
    (529, anthropic_error("overloaded_error", "Overloaded"), "Overloaded", "api_error", "overloaded"),
    (429, b"", "upstream returned HTTP 429", "requests", "rate_limit_exceeded"),
    (502, b"<html><body>Bad Gateway</body></html>", "upstream returned HTTP 502", "api_error", "upstream_error"),
    (400, anthropic_error("invalid_request_error", "bad key sk-ant-api03-AbC_dEf-123 given"),
     "bad key sk-ant-*** given", "invalid_request_error", None),
]


@pytest.mark.parametrize(("status", "body", "message", "error_type", "code"), ERROR_CASES)
def test_errors_become_openai_errors(status: int, body: bytes, message: str, error_type: str,
                                     code: str | None) -> None:
    out = make().response(status, body)
    assert out.body is not None and out.usage is None
    assert json.loads(out.body) == {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def test_error_fixtures_are_valid_anthropic_errors() -> None:
    for _, body, *_ in ERROR_CASES:
        if body.startswith(b'{"type": "error"') and b"request_too_large" not in body:
            anthropic.types.ErrorResponse.model_validate_json(body)


# --------------------------------------------------------------------------- streams

TEXT_STREAM = """event: message_start
data: {"type":"message_start","message":{"id":"msg_01Rj2bYZ3e5eHH3Fqcwn9Fhb","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":1800,"output_tokens":1}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Bonjour"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" à tous ☀️, "}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"東京から!\\n"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}

event: message_stop
data: {"type":"message_stop"}

""".encode()

TOOL_STREAM = b"""event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Let me check both."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"city\\": \\"Par"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"is\\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01Kq","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\\"city\\":\\"Oslo\\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"""

ERROR_EVENT = b"""event: error
data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}

"""
# the backend gives up after some text: error event, then the connection closes
ERROR_STREAM = TEXT_STREAM[: TEXT_STREAM.index(b"event: content_block_stop")] + ERROR_EVENT
BEFORE_STOP = TEXT_STREAM.index(b"event: message_stop")


def feed(stream: bytes, cuts: list[int] | None = None,
         translator: AnthropicTranslator | None = None) -> bytes:
    """Feed ``stream`` cut at ``cuts`` (the last piece marks the end of stream); the joined output."""
    return feed_results(stream, cuts, translator)[0]


def feed_results(stream: bytes, cuts: list[int] | None = None,
                 translator: AnthropicTranslator | None = None) -> tuple[bytes, list[ChunkResult]]:
    """As ``feed``, with the translator's result for each piece."""
    if translator is None:
        translator = make()
        translator.request({"model": "my-alias", "messages": [user("hi")], "stream": True,
                            "stream_options": {"include_usage": True}}, b"")
    bounds = [0, *sorted(cuts or []), len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    results = [translator.stream_chunk(p, end_of_stream=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert all(isinstance(r.body, bytes) for r in results)
    return b"".join(r.body for r in results if r.body), results


def data_lines(output: bytes) -> list[str]:
    events = SSEParser().feed(output)
    assert all(e.event is None for e in events)  # OpenAI streams carry unnamed events only
    return [e.data for e in events]


def chunks(output: bytes) -> list[dict[str, Any]]:
    return [json.loads(d) for d in data_lines(output) if d != "[DONE]"]


def deltas(output: bytes) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks(output) if c["choices"]]


STREAMS = [pytest.param(TEXT_STREAM, id="text"), pytest.param(TOOL_STREAM, id="tool_use"),
           pytest.param(ERROR_STREAM, id="error"), pytest.param(TEXT_STREAM[:BEFORE_STOP], id="truncated")]


@pytest.mark.parametrize("stream", [TEXT_STREAM, TOOL_STREAM], ids=["text", "tool_use"])
def test_stream_fixtures_are_valid_anthropic_events(stream: bytes) -> None:
    adapter = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
    for event in SSEParser().feed(stream):
        if event.event != "ping":
            assert adapter.validate_json(event.data).type == event.event


def test_a_text_stream_becomes_openai_chunks() -> None:
    output = feed(TEXT_STREAM)
    assert data_lines(output)[-1] == "[DONE]"
    first, *middle, finish, usage = chunks(output)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == "Bonjour à tous ☀️, 東京から!\n"
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 1825, "completion_tokens": 15, "total_tokens": 1840,
                              "prompt_tokens_details": {"cached_tokens": 1800}}
    for chunk in (first, *middle, finish, usage):
        assert (chunk["id"], chunk["object"], chunk["created"], chunk["model"]) == (
            "chatcmpl-msg_01Rj2bYZ3e5eHH3Fqcwn9Fhb", "chat.completion.chunk", NOW, "claude-sonnet-4-5-20250929")


def test_tool_use_blocks_stream_as_indexed_tool_call_deltas() -> None:
    tool_deltas = [d["tool_calls"][0] for d in deltas(feed(TOOL_STREAM)) if "tool_calls" in d]
    assert tool_deltas[0] == {"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                              "function": {"name": "get_weather", "arguments": ""}}
    assert tool_deltas[3] == {"index": 1, "id": "toolu_01Kq", "type": "function",
                              "function": {"name": "get_weather", "arguments": ""}}
    arguments = {0: "", 1: ""}
    for d in tool_deltas:
        arguments[d["index"]] += d["function"]["arguments"]
    assert {i: json.loads(a) for i, a in arguments.items()} == {0: {"city": "Paris"}, 1: {"city": "Oslo"}}
    assert chunks(feed(TOOL_STREAM))[-2]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("stream", STREAMS)
def test_every_translated_line_parses_with_the_openai_sdk(stream: bytes) -> None:
    for data in data_lines(feed(stream)):
        if data != "[DONE]" and "error" not in json.loads(data):
            ChatCompletionChunk.model_validate_json(data)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("stream", STREAMS)
def test_a_stream_split_at_random_points_translates_exactly_as_whole(stream: bytes, seed: int) -> None:
    rng = random.Random(seed)
    cuts = rng.sample(range(1, len(stream)), rng.randint(1, 60))
    assert feed(stream, cuts) == feed(stream)


@pytest.mark.parametrize("stream", STREAMS)
def test_a_stream_split_in_two_at_any_byte_translates_exactly_as_whole(stream: bytes) -> None:
    whole = feed(stream)
    for cut in range(len(stream) + 1):
        assert feed(stream, [cut]) == whole, f"split at byte {cut}"


def test_a_stream_fed_one_byte_at_a_time_translates_exactly_as_whole() -> None:
    assert feed(TOOL_STREAM, list(range(1, len(TOOL_STREAM)))) == feed(TOOL_STREAM)


def test_a_piece_that_completes_no_event_returns_empty_bytes() -> None:
    translator = make()
    assert translator.stream_chunk(TEXT_STREAM[:10], end_of_stream=False).body == b""


def test_progress_counts_content_chunks_and_the_clean_end() -> None:
    last = feed_results(TOOL_STREAM, translator=make())[1][-1]
    # 1 text delta + 2 tool starts + 3 non-empty argument fragments; role and finish chunks carry no content
    assert (last.first_content, last.content_chunks) == (True, 6)
    assert (last.done, last.failed) == (True, False)


def test_first_content_waits_for_generated_text() -> None:
    translator = make()
    head = translator.stream_chunk(TEXT_STREAM[: TEXT_STREAM.index(b"event: content_block_delta")], False)
    assert not head.first_content
    rest = translator.stream_chunk(TEXT_STREAM[TEXT_STREAM.index(b"event: content_block_delta"):], True)
    assert rest.first_content


def test_stream_usage_counts_prompt_from_message_start_and_output_from_message_delta() -> None:
    last = feed_results(TEXT_STREAM, translator=make())[1][-1]
    assert last.usage == Usage(prompt_tokens=1825, completion_tokens=15, cached_tokens=1800)
    assert last.model == "claude-sonnet-4-5-20250929"


@pytest.mark.parametrize("cut", [
    pytest.param(TEXT_STREAM.index(b"event: content_block_start"), id="after message_start"),
    pytest.param(TEXT_STREAM.index(b"Bonjour"), id="inside an event"),
    pytest.param(BEFORE_STOP, id="before message_stop"),
    pytest.param(len(TEXT_STREAM) - 1, id="before the last blank line"),
])
def test_a_truncated_stream_ends_with_an_error_event_and_no_done(cut: int) -> None:
    output, results = feed_results(TEXT_STREAM[:cut], translator=make())
    lines = data_lines(output)
    assert "[DONE]" not in lines
    assert json.loads(lines[-1]) == {"error": {"message": "upstream stream ended before completion",
                                               "type": "api_error", "param": None, "code": "stream_interrupted"}}
    assert (results[-1].done, results[-1].failed) == (False, True)
    assert results[-1].usage is not None and results[-1].usage.prompt_tokens == 1825


def test_a_mid_stream_error_event_is_forwarded_in_openai_shape_without_done() -> None:
    output, results = feed_results(ERROR_STREAM, translator=make())
    lines = data_lines(output)
    assert "[DONE]" not in lines
    assert json.loads(lines[-1]) == {"error": {"message": "Overloaded", "type": "api_error", "param": None,
                                               "code": "overloaded"}}
    assert sum("error" in json.loads(line) for line in lines) == 1  # no second error at end of stream
    assert results[-1].failed and not results[-1].done
    assert results[-1].content_chunks == 3


def test_nothing_is_forwarded_after_the_stream_has_ended() -> None:
    translator = make()
    feed(TEXT_STREAM, translator=translator)
    after = translator.stream_chunk(ERROR_EVENT, end_of_stream=True)
    assert after.body == b""
    assert after.done and not after.failed


def test_a_malformed_event_fails_the_stream() -> None:
    lines = data_lines(feed(TEXT_STREAM[:BEFORE_STOP] + b"event: message_delta\ndata: {oops\n\n"))
    assert json.loads(lines[-1])["error"]["code"] == "upstream_error"


# --------------------------------------------------------------------------- through the openai SDK


def openai_client(status: int, body: bytes, content_type: str) -> openai.OpenAI:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": content_type})

    transport = httpx.MockTransport(answer)
    return openai.OpenAI(api_key="unused", base_url="http://gateway.test/v1", max_retries=0,
                         http_client=httpx.Client(transport=transport))


def test_the_usage_chunk_is_sent_only_when_the_client_asked_for_it() -> None:
    translator = make()
    translator.request({"model": "my-alias", "messages": [user("hi")], "stream": True}, b"")
    out, results = feed_results(TEXT_STREAM, translator=translator)
    assert all(c["choices"] for c in chunks(out))
    assert data_lines(out)[-1] == "[DONE]"
    assert results[-1].usage is not None and results[-1].usage.completion_tokens > 0


def test_the_openai_sdk_reads_a_translated_stream() -> None:
    client = openai_client(200, feed(TOOL_STREAM), "text/event-stream")
    stream = client.chat.completions.create(model="my-alias", messages=[user("hi")], stream=True)
    received = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "Let me check both."
    assert received[-1].usage is not None and received[-1].usage.completion_tokens == 89


@pytest.mark.parametrize("stream", [ERROR_STREAM, TEXT_STREAM[:BEFORE_STOP]], ids=["error", "truncated"])
def test_the_openai_sdk_raises_on_a_failed_stream(stream: bytes) -> None:
    client = openai_client(200, feed(stream), "text/event-stream")
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="my-alias", messages=[user("hi")], stream=True))


def test_the_openai_sdk_reads_a_translated_error_by_status() -> None:
    body = make().response(429, anthropic_error("rate_limit_error", "Slow down")).body
    assert body is not None
    client = openai_client(429, body, "application/json")
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="my-alias", messages=[user("hi")])
    assert raised.value.code == "rate_limit_exceeded"
    assert "Slow down" in raised.value.message


@pytest.mark.parametrize("split", [None, 1, 7])
def test_a_metered_stream_hands_over_exactly_its_generated_text(split: int | None) -> None:
    translator = make(meter_text=True)
    translator.request({"model": "my-alias", "messages": [user("hi")], "stream": True,
                        "stream_options": {"include_usage": True}}, b"")
    cuts = list(range(split, len(TEXT_STREAM), split)) if split else []
    output, results = feed_results(TEXT_STREAM, cuts, translator)
    plain, plain_results = feed_results(TEXT_STREAM)
    assert output == plain  # metering changes nothing on the wire
    assert "".join(r.text for r in results) == "Bonjour à tous ☀️, 東京から!\n"
    assert all(r.text == "" for r in plain_results)  # text is handed over only when asked for
    tools = make(meter_text=True)
    tools.request(chat(user("weather?"), stream=True), b"")
    tool_results = feed_results(TOOL_STREAM, cuts, tools)[1]
    # text, then each tool's name and its arguments as they were streamed
    assert "".join(r.text for r in tool_results) == 'Let me check both.get_weather{"city": "Paris"}get_weather{"city":"Oslo"}'
