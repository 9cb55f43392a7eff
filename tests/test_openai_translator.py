"""OpenAI-schema translation: pass through what needs no change, meter every stream."""

from __future__ import annotations

import json
import random

import pytest

from extproc.providers.settings import Provider, Target
from extproc.providers.base import ChunkResult
from extproc.providers.openai import AzureOpenAITranslator, OpenAITranslator
from extproc.providers.sse import SSEParser

OPENAI = Provider(name="openai", type="openai", base_url="https://api.openai.com/v1")
AZURE = Provider(name="azure", type="azure_openai", base_url="https://x.openai.azure.com", api_version="2024-10-21")


def chunk(content: str | None = None, finish: str | None = None, role: bool = False) -> dict:
    delta = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-2024-08-06",
         "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
                                  "prompt_tokens_details": {"cached_tokens": 4}}}
EVENTS = [chunk(role=True), chunk("Hel"), chunk("lo"), chunk("!"), chunk(finish="stop"), USAGE]
STREAM = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in EVENTS) + b"data: [DONE]\n\n"


def streaming(include_usage: bool, meter_text: bool = False) -> OpenAITranslator:
    t = OpenAITranslator(OPENAI, Target("openai", "gpt-4o"), "chat", meter_text=meter_text)
    body = {"model": "gpt-4o", "messages": [], "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    t.request(body, b"")
    return t


def feed(t: OpenAITranslator, data: bytes, cuts: list[int]) -> bytes:
    return feed_results(t, data, cuts)[0]


def feed_results(t: OpenAITranslator, data: bytes, cuts: list[int]) -> tuple[bytes, list[ChunkResult]]:
    """What the client receives, and the translator's result for each piece."""
    bounds = [0, *sorted(cuts), len(data)]
    out, results = [], []
    for i in range(len(bounds) - 1):
        piece = data[bounds[i]:bounds[i + 1]]
        r = t.stream_chunk(piece, end_of_stream=i == len(bounds) - 2)
        results.append(r)
        out.append(piece if r.body is None else r.body)
    return b"".join(out), results


def test_a_request_that_needs_no_change_is_passed_through():
    t = OpenAITranslator(OPENAI, Target("openai", "gpt-4o"), "chat")
    up = t.request({"model": "gpt-4o", "messages": []}, b"raw")
    assert up.body is None and up.path == "/v1/chat/completions"


def test_the_backend_model_replaces_the_alias():
    t = OpenAITranslator(OPENAI, Target("openai", "gpt-4o-2024-08-06"), "chat")
    up = t.request({"model": "smart", "messages": []}, b"")
    assert json.loads(up.body)["model"] == "gpt-4o-2024-08-06"


def test_a_stream_gets_usage_asked_for_and_keeps_other_options():
    t = OpenAITranslator(OPENAI, Target("openai", "gpt-4o"), "chat")
    up = t.request({"model": "gpt-4o", "messages": [], "stream": True, "stream_options": {"x": 1}}, b"")
    assert json.loads(up.body)["stream_options"] == {"x": 1, "include_usage": True}


def test_azure_puts_the_deployment_and_version_in_the_path():
    t = AzureOpenAITranslator(AZURE, Target("azure", "prod-gpt"), "embeddings")
    up = t.request({"model": "e", "input": "x"}, b"")
    assert up.path == "/openai/deployments/prod-gpt/embeddings?api-version=2024-10-21" and up.body is None


@pytest.mark.parametrize("seed", range(30))
def test_a_stream_the_client_asked_usage_for_passes_byte_for_byte_at_any_split(seed):
    rng = random.Random(seed)
    cuts = rng.sample(range(1, len(STREAM)), rng.randint(1, 40))
    out, results = feed_results(streaming(include_usage=True), STREAM, cuts)
    assert out == STREAM
    last = results[-1]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_tokens) == (11, 3, 4)
    assert last.done and not last.failed and last.content_chunks == 3
    assert last.model == "gpt-4o-2024-08-06"


@pytest.mark.parametrize("seed", range(30))
def test_the_injected_usage_chunk_is_removed_at_any_split(seed):
    rng = random.Random(seed)
    cuts = rng.sample(range(1, len(STREAM)), rng.randint(1, 40))
    out, results = feed_results(streaming(include_usage=False), STREAM, cuts)
    events = [e.data for e in SSEParser().feed(out)]
    assert events[-1] == "[DONE]"
    assert [json.loads(e) for e in events[:-1]] == EVENTS[:-1]
    assert results[-1].usage.completion_tokens == 3  # still metered


def test_a_stream_that_ends_without_done_gets_an_error_event_and_no_done():
    t = streaming(include_usage=True)
    cut = STREAM[: STREAM.index(b"data: [DONE]")]
    result = t.stream_chunk(cut, end_of_stream=True)
    events = [e.data for e in SSEParser().feed(result.body)]
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "stream_interrupted"
    assert result.failed and not result.done


def test_an_in_band_error_is_noted():
    t = streaming(include_usage=True)
    result = t.stream_chunk(b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n', False)
    assert result.failed


def test_a_non_json_error_body_becomes_an_openai_error():
    t = OpenAITranslator(OPENAI, Target("openai", "gpt-4o"), "chat")
    err = json.loads(t.response(502, b"<html>bad gateway</html>").body)["error"]
    assert err["code"] == "upstream_error" and "502" in err["message"]
    assert t.response(429, b'{"error": {"message": "slow down", "type": "requests"}}').body is None


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_a_metered_stream_hands_over_its_text_and_is_otherwise_unchanged(include_usage, seed):
    cuts = sorted(random.Random(seed).sample(range(1, len(STREAM)), 6))
    metered, results = feed_results(streaming(include_usage, meter_text=True), STREAM, cuts)
    plain, plain_results = feed_results(streaming(include_usage), STREAM, cuts)
    assert metered == plain
    assert "".join(r.text for r in results) == "Hello!"
    assert all(r.text == "" for r in plain_results)  # text is handed over only when asked for
    assert results[-1].usage is not None and results[-1].usage.prompt_tokens == 11


def test_tool_call_arguments_and_refusals_are_metered_too():
    t = streaming(True, meter_text=True)
    call = chunk()
    call["choices"][0]["delta"] = {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "get", "arguments": ""}}]}
    args = chunk()
    args["choices"][0]["delta"] = {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Oslo"}'}}]}
    refusal = chunk()
    refusal["choices"][0]["delta"] = {"refusal": "no"}
    result = t.stream_chunk(b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in (call, args, refusal)), False)
    assert result.text == 'get{"city":"Oslo"}no'
