"""The Anthropic inbound mapping on its own: requests to the OpenAI shape, answers and streams back."""

from __future__ import annotations

import json

import pytest

from extproc.providers.settings import Provider, Target
from extproc.errors import BadRequest
from extproc.providers import sse
from extproc.providers.anthropic import AnthropicTranslator
from extproc.providers.base import Usage
from extproc.providers.inbound_anthropic import (
    EventWriter,
    answer_body,
    from_openai_error,
    message_from_completion,
    to_openai,
)


def chunk(delta: dict, finish: str | None = None) -> bytes:
    return sse.encode_json({"id": "c1", "model": "gpt-4o", "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


# An OpenAI stream with text, then a tool call, then the usage chunk and [DONE].
STREAM = b"".join([
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}), chunk({"content": "lo \u00e9t\u00e9"}),
    chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                           "function": {"name": "f", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
    chunk({}, "tool_calls"),
    sse.encode_json({"id": "c1", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}}),
    sse.DONE,
])
USAGE = Usage(prompt_tokens=12, completion_tokens=5)


def events(out: bytes) -> list[tuple[str | None, dict]]:
    return [(e.event, json.loads(e.data)) for e in sse.SSEParser().feed(out)]


def test_an_openai_stream_becomes_the_anthropic_event_sequence():
    got = events(EventWriter("alias").feed(STREAM, USAGE))
    assert [name for name, _ in got] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert all(name == body["type"] for name, body in got)
    assert got[0][1]["message"]["role"] == "assistant" and got[0][1]["message"]["model"] == "gpt-4o"
    assert "".join(b["delta"]["text"] for _, b in got[2:4]) == "Hello \u00e9t\u00e9"
    assert got[5][1]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "f", "input": {}}
    assert "".join(b["delta"]["partial_json"] for _, b in got[6:8]) == '{"a": 1}'
    assert [b["index"] for _, b in got[1:9]] == [0, 0, 0, 0, 1, 1, 1, 1]
    delta = got[9][1]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"]["input_tokens"] == 12 and delta["usage"]["output_tokens"] == 5


def test_the_events_do_not_depend_on_where_the_stream_was_cut():
    whole = EventWriter("alias").feed(STREAM, USAGE)
    for cut in range(1, len(STREAM)):
        w = EventWriter("alias")
        # usage is known to the backend translator only once it has read the usage chunk
        head = w.feed(STREAM[:cut], None)
        assert head + w.feed(STREAM[cut:], USAGE) == whole, cut


def test_an_in_band_error_becomes_an_anthropic_error_event_and_ends_the_stream():
    stream = chunk({"content": "Hi"}) + sse.error_event("upstream broke") + chunk({"content": "late"})
    got = events(EventWriter("alias").feed(stream, None))
    assert got[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "upstream broke"}})
    assert "message_stop" not in [name for name, _ in got]
    quota = events(EventWriter("alias").feed(sse.error_event("budget spent", "insufficient_quota",
                                                              "insufficient_quota"), None))
    assert quota[-1][1]["error"]["type"] == "rate_limit_error"


def test_a_whole_completion_becomes_a_message():
    completion = {"id": "c9", "model": "gpt-4o", "choices": [{"finish_reason": "length", "message": {
        "role": "assistant", "content": "Partial", "tool_calls": [
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": '{"x": [1]}'}}]}}]}
    msg = message_from_completion(completion, Usage(prompt_tokens=30, completion_tokens=7, cached_tokens=10), "alias")
    assert msg["type"] == "message" and msg["stop_reason"] == "max_tokens" and msg["model"] == "gpt-4o"
    assert msg["content"] == [{"type": "text", "text": "Partial"},
                              {"type": "tool_use", "id": "call_2", "name": "g", "input": {"x": [1]}}]
    # Anthropic counts cache reads apart from input_tokens; OpenAI's prompt_tokens include them
    assert msg["usage"] == {"input_tokens": 20, "output_tokens": 7, "cache_read_input_tokens": 10,
                            "cache_creation_input_tokens": 0}


def test_a_whole_answer_reaches_the_client_as_a_message_or_an_error():
    ok = {"id": "c1", "model": "gpt-4o", "choices": [{"finish_reason": "stop", "message": {"content": "Hi"}}]}
    got = json.loads(answer_body(200, json.dumps(ok).encode(), Usage(prompt_tokens=3, completion_tokens=1), "alias"))
    assert got["content"] == [{"type": "text", "text": "Hi"}] and got["usage"]["input_tokens"] == 3
    failed = json.loads(answer_body(503, b'{"error": {"message": "overloaded"}}', None, "alias"))
    assert failed == {"type": "error", "error": {"type": "api_error", "message": "overloaded"}}
    assert json.loads(answer_body(200, b"<html>", None, "alias"))["error"]["type"] == "api_error"


def test_an_openai_error_keeps_its_message_and_gets_anthropics_type():
    body = json.loads(from_openai_error(429, b'{"error": {"message": "slow down", "type": "tokens"}}'))
    assert body == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    assert json.loads(from_openai_error(502, b"<html>"))["error"]["type"] == "api_error"


def test_a_request_maps_system_images_tools_and_results():
    body = {
        "model": "m", "max_tokens": 50, "stream": True, "top_k": 5, "stop_sequences": ["X"],
        "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
        "metadata": {"user_id": "u-1"},
        "tools": [{"name": "t", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "t", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": "AAA"}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "…", "signature": "s"},
                                              {"type": "tool_use", "id": "tu1", "name": "t", "input": {"k": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu1", "is_error": True,
                                          "content": [{"type": "text", "text": "boom"}]},
                                         {"type": "text", "text": "and?"}]},
        ],
    }
    out = to_openai(body)
    assert out["messages"] == [
        {"role": "system", "content": "A\nB"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "tu1", "type": "function", "function": {"name": "t", "arguments": '{"k":1}'}}]},
        {"role": "tool", "tool_call_id": "tu1", "content": "[error] boom"},
        {"role": "user", "content": [{"type": "text", "text": "and?"}]},
    ]
    assert out["stream_options"] == {"include_usage": True} and out["stop"] == ["X"] and out["user"] == "u-1"
    assert out["tool_choice"] == {"type": "function", "function": {"name": "t"}}
    assert out["parallel_tool_calls"] is False and "top_k" not in out
    assert out["tools"] == [{"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
     "messages[0].content[0]"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stop_sequences": list("abcde")},
     "stop_sequences"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "x"}},
     "tool_choice"),
])
def test_a_malformed_request_names_the_parameter(body, param):
    with pytest.raises(BadRequest) as caught:
        to_openai(body)
    assert caught.value.param == param and caught.value.status == 400


def test_through_an_anthropic_target_the_events_do_not_depend_on_where_the_providers_bytes_were_cut():
    upstream = b"".join([
        sse.encode_json({"type": "message_start", "message": {"id": "m1", "type": "message", "role": "assistant",
                                                              "model": "claude", "content": [],
                                                              "usage": {"input_tokens": 9, "output_tokens": 1}}},
                        "message_start"),
        sse.encode_json({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                        "content_block_start"),
        sse.encode_json({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Bon"}},
                        "content_block_delta"),
        sse.encode_json({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "jour \u00e0"}},
                        "content_block_delta"),
        sse.encode_json({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse.encode_json({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
                        "message_delta"),
        sse.encode_json({"type": "message_stop"}, "message_stop"),
    ])
    provider = Provider(name="anthropic", type="anthropic", base_url="http://127.0.0.1:1")

    def fresh():
        """The backend translator as answer.py runs it for a client of /v1/messages, and what the client gets."""
        tr = AnthropicTranslator(provider, Target("anthropic", "claude"), "chat")
        tr.request(to_openai({"model": "alias", "max_tokens": 10, "stream": True,
                              "messages": [{"role": "user", "content": "hi"}]}), b"")
        writer = EventWriter("alias")

        def feed(piece: bytes, end: bool) -> bytes:
            out = tr.stream_chunk(piece, end)
            return writer.feed(piece if out.body is None else out.body, out.usage)
        return feed

    whole = fresh()(upstream, True)
    got = events(whole)
    assert [name for name, _ in got] == ["message_start", "content_block_start", "content_block_delta",
                                         "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert got[5][1]["usage"]["input_tokens"] == 9 and got[5][1]["usage"]["output_tokens"] == 3
    for cut in range(1, len(upstream)):
        feed = fresh()
        assert feed(upstream[:cut], False) + feed(upstream[cut:], True) == whole, cut
