"""Specs for the fake providers, driven with the real vendor SDKs."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import openai
import pytest

from tests.fake_provider import (
    Behaviour,
    FakeProvider,
    count_prompt_tokens,
    default_error_body,
    fake_embedding,
    split_reply,
)

MESSAGES = [{"role": "user", "content": "Say hello, please."}]
PROMPT_TOKENS = count_prompt_tokens(MESSAGES)
REPLY_PIECES = split_reply("Hello from the fake provider.")


@pytest.fixture
def make_fake():
    started: list[FakeProvider] = []

    def factory(kind: str, **kwargs) -> FakeProvider:
        fake = FakeProvider(kind, **kwargs).start()
        started.append(fake)
        return fake

    yield factory
    for fake in started:
        fake.stop()


_CLIENTS: list = []


@pytest.fixture(autouse=True)
def _close_sdk_clients():
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def _keep(client):
    _CLIENTS.append(client)
    return client


def openai_client(fake: FakeProvider, key: str = "sk-test", **kw) -> openai.OpenAI:
    return _keep(openai.OpenAI(base_url=fake.base_url + "/v1", api_key=key,
                               max_retries=0, **kw))


def azure_client(fake: FakeProvider, key: str = "sk-test", **kw) -> openai.AzureOpenAI:
    return _keep(openai.AzureOpenAI(azure_endpoint=fake.base_url, api_version="2024-10-21",
                                    api_key=key, max_retries=0, **kw))


def anthropic_client(fake: FakeProvider, key: str = "sk-test", **kw) -> anthropic.Anthropic:
    return _keep(anthropic.Anthropic(base_url=fake.base_url, api_key=key,
                                     max_retries=0, **kw))


def raw_post(fake: FakeProvider, path: str, body: dict | bytes, headers: dict[str, str]):
    """POST with http.client; returns (status, headers, body bytes, chunk arrival log)."""
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=payload,
                 headers={"Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    data = resp.read()
    hdrs = {k.lower(): v for k, v in resp.getheaders()}
    conn.close()
    return resp.status, hdrs, data


def sse_events(data: bytes) -> list[str]:
    text = data.decode()
    assert text.endswith("\n\n")
    return text[:-2].split("\n\n")


# ---------------------------------------------------------------- helpers


def test_split_reply_and_embedding_are_deterministic():
    assert REPLY_PIECES == ["Hello", " from", " the", " fake", " provider."]
    assert "".join(split_reply("a  b ")) == "a  b "
    pieces = split_reply("abc", 7)
    assert len(pieces) == 7 and all(pieces)
    assert split_reply("Hello world", 0) == []
    vec = fake_embedding("hi")
    assert len(vec) == 8 and vec == fake_embedding("hi") != fake_embedding("ho")
    assert abs(sum(x * x for x in vec) - 1.0) < 1e-4


# ---------------------------------------------------------------- OpenAI


def test_openai_chat_non_stream_usage_and_recording(make_fake):
    fake = make_fake("openai")
    resp = openai_client(fake).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "gpt-4o"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "Hello from the fake provider."
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens == PROMPT_TOKENS
    assert resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == PROMPT_TOKENS + 5
    assert resp.usage.prompt_tokens_details.cached_tokens == 0

    [req] = fake.requests
    assert (req.method, req.path, req.query) == ("POST", "/v1/chat/completions", {})
    assert req.headers["authorization"] == "Bearer sk-test"
    assert req.json["messages"] == MESSAGES and json.loads(req.body) == req.json
    assert fake.usage_log == [{"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 5,
                               "stream": False, "completed": True}]


def test_openai_chat_stream_with_usage(make_fake):
    fake = make_fake("openai")
    stream = openai_client(fake).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake provider."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == PROMPT_TOKENS
    assert chunks[-1].usage.completion_tokens == 5
    assert fake.usage_log[-1] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 5,
                                  "stream": True, "completed": True}


def test_openai_raw_sse_framing(make_fake):
    fake = make_fake("openai")
    status, headers, data = raw_post(
        fake, "/v1/chat/completions",
        {"model": "m", "messages": MESSAGES, "stream": True},
        {"Authorization": "Bearer sk-test"})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["transfer-encoding"] == "chunked"
    events = sse_events(data)
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": "",
                                                  "refusal": None}
    assert all(p["object"] == "chat.completion.chunk" and "usage" not in p for p in payloads)
    assert len(payloads) == 1 + 5 + 1  # role, content pieces, finish


def test_openai_auth_errors(make_fake):
    fake = make_fake("openai")
    fake.behaviours.append(Behaviour(reply="queued"))
    with pytest.raises(openai.AuthenticationError) as err:
        openai_client(fake, key="sk-wrong-key-1234").chat.completions.create(
            model="gpt-4o", messages=MESSAGES)
    assert err.value.status_code == 401
    assert err.value.body["code"] == "invalid_api_key"
    assert "sk-wrong-key-1234" not in err.value.body["message"]  # masked like OpenAI
    status, _, data = raw_post(fake, "/v1/chat/completions",
                               {"model": "m", "messages": MESSAGES}, {})
    assert status == 401 and "didn't provide an API key" in json.loads(data)["error"]["message"]
    # Rejected requests are recorded but do not consume queued behaviours.
    assert len(fake.requests) == 2 and len(fake.behaviours) == 1
    assert fake.usage_log == []


def test_openai_tool_call(make_fake):
    fake = make_fake("openai")
    call = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}
    fake.behaviours += [Behaviour(tool_call=call), Behaviour(tool_call=call)]
    client = openai_client(fake)
    resp = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [tc] = choice.message.tool_calls
    assert tc.id.startswith("call_") and tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == call["arguments"]

    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                 stream=True))
    first = chunks[0].choices[0].delta.tool_calls[0]
    assert first.function.name == "get_weather" and first.id.startswith("call_")
    args = "".join(c.choices[0].delta.tool_calls[0].function.arguments
                   for c in chunks if c.choices[0].delta.tool_calls)
    assert json.loads(args) == call["arguments"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_embeddings(make_fake):
    fake = make_fake("openai")
    client = openai_client(fake)
    # The SDK asks for base64 by default and decodes it itself.
    resp = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [d.index for d in resp.data] == [0, 1]
    assert resp.data[0].embedding == pytest.approx(fake_embedding("a"), abs=1e-6)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == count_prompt_tokens(["a", "b"])
    floats = client.embeddings.create(model="m", input="a", encoding_format="float")
    assert floats.data[0].embedding == fake_embedding("a")
    assert fake.usage_log[-1]["completion_tokens"] == 0


def test_unknown_paths_are_404_in_provider_format(make_fake):
    openai_fake, azure_fake, anthropic_fake = (make_fake(k) for k in
                                               ("openai", "azure", "anthropic"))
    status, _, data = raw_post(openai_fake, "/v1/nope", {}, {"Authorization": "Bearer sk-test"})
    assert status == 404 and json.loads(data)["error"]["message"] == "Invalid URL (POST /v1/nope)"
    status, _, data = raw_post(azure_fake, "/openai/nope?api-version=1", {}, {"api-key": "sk-test"})
    assert status == 404 and json.loads(data) == {"error": {"code": "404",
                                                            "message": "Resource not found"}}
    status, _, data = raw_post(anthropic_fake, "/v1/nope", {}, {"x-api-key": "sk-test"})
    assert status == 404 and json.loads(data)["error"]["type"] == "not_found_error"


# ---------------------------------------------------------------- behaviours


def test_status_behaviours_fifo_then_default(make_fake):
    fake = make_fake("openai")
    custom = {"error": {"message": "nope", "type": "invalid_request_error",
                        "param": None, "code": "context_length_exceeded"}}
    fake.behaviours += [Behaviour(status=429), Behaviour(status=500),
                        Behaviour(status=400, error_body=custom)]
    client = openai_client(fake)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err.value.response.headers["retry-after"] == "1"
    assert err.value.body == default_error_body("openai", 429)["error"]
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err.value.body["code"] == "context_length_exceeded"
    fake.default = Behaviour(reply="default reply")
    resp = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert resp.choices[0].message.content == "default reply"
    assert fake.behaviours == [] and len(fake.usage_log) == 1


def test_header_delay_hangs_until_client_timeout(make_fake):
    fake = make_fake("openai")
    fake.behaviours.append(Behaviour(header_delay=3))
    client = openai_client(fake, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert time.monotonic() - started < 1.5
    # The next request gets the default behaviour and answers promptly.
    assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices


def test_stream_pacing_and_chunk_count(make_fake):
    fake = make_fake("openai")
    fake.behaviours.append(Behaviour(chunks=6, first_token_delay=0.1, token_delay=0.05))
    started = time.monotonic()
    arrivals = []
    for chunk in openai_client(fake).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 6
    # Lower bounds only: a busy machine can deliver two paced chunks in one read, never early.
    assert arrivals[0] >= 0.09
    assert arrivals[-1] >= 0.09 + 5 * 0.045, arrivals
    assert fake.usage_log[-1]["completion_tokens"] == 6


def test_fail_after_chunks_aborts_the_stream(make_fake):
    fake = make_fake("openai")
    fake.behaviours.append(Behaviour(fail_after_chunks=2))
    received = []
    with pytest.raises(Exception) as err:
        for chunk in openai_client(fake).chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True):
            received.append(chunk.choices[0].delta.content)
    assert not isinstance(err.value, openai.APIStatusError)
    assert "RemoteProtocolError" in type(err.value).__name__ or isinstance(
        err.value, openai.APIConnectionError)
    assert received == ["", "Hello", " from"]
    assert fake.usage_log == [{"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2,
                               "stream": True, "completed": False}]


def test_error_event_and_end_without_done(make_fake):
    fake = make_fake("openai")
    fake.behaviours += [Behaviour(error_event_after_chunks=1),
                        Behaviour(end_without_done=True)]
    with pytest.raises(openai.APIError) as err:
        list(openai_client(fake).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True))
    assert err.value.body["type"] == "server_error"
    status, _, data = raw_post(fake, "/v1/chat/completions",
                               {"model": "m", "messages": MESSAGES, "stream": True},
                               {"Authorization": "Bearer sk-test"})
    assert status == 200 and b"[DONE]" not in data
    assert b'"finish_reason":"stop"' in data
    assert [e["completed"] for e in fake.usage_log] == [False, False]
    assert [e["completion_tokens"] for e in fake.usage_log] == [1, 5]


def test_forced_usage_numbers(make_fake):
    fake = make_fake("openai")
    fake.default = Behaviour(prompt_tokens=1000, completion_tokens=42)
    resp = openai_client(fake).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (1000, 42)
    assert fake.usage_log[-1]["prompt_tokens"] == 1000


def test_non_stream_fail_after_chunks_truncates_body(make_fake):
    fake = make_fake("openai")
    fake.behaviours.append(Behaviour(fail_after_chunks=0))
    with pytest.raises(openai.APIConnectionError):
        openai_client(fake).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert fake.usage_log == [{"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 0,
                               "stream": False, "completed": False}]


# ---------------------------------------------------------------- Azure


def test_azure_chat_embeddings_and_auth(make_fake):
    fake = make_fake("azure")
    client = azure_client(fake)
    resp = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert resp.choices[0].message.content == "Hello from the fake provider."
    assert resp.usage.completion_tokens == 5
    req = fake.requests[-1]
    assert req.path == "/openai/deployments/gpt-4o/chat/completions"
    assert req.query == {"api-version": "2024-10-21"}
    assert req.headers["api-key"] == "sk-test"

    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "Hello from the fake provider."
    assert chunks[-1].usage.total_tokens == PROMPT_TOKENS + 5

    emb = client.embeddings.create(model="ada", input="hello")
    assert fake.requests[-1].path == "/openai/deployments/ada/embeddings"
    assert len(emb.data[0].embedding) == 8

    with pytest.raises(openai.AuthenticationError) as err:
        azure_client(fake, key="bad").chat.completions.create(model="gpt-4o",
                                                              messages=MESSAGES)
    assert err.value.body["code"] == "401"
    status, _, _ = raw_post(fake, "/openai/deployments/gpt-4o/chat/completions",
                            {"messages": MESSAGES}, {"api-key": "sk-test"})
    assert status == 404  # no api-version


# ---------------------------------------------------------------- Anthropic


def test_anthropic_non_stream_and_stream(make_fake):
    fake = make_fake("anthropic")
    client = anthropic_client(fake)
    msg = client.messages.create(model="claude-test", max_tokens=64, messages=MESSAGES)
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "text"
    assert msg.content[0].text == "Hello from the fake provider."
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (PROMPT_TOKENS, 5)
    assert msg.usage.cache_read_input_tokens == 0

    with client.messages.stream(model="claude-test", max_tokens=64,
                                messages=MESSAGES) as stream:
        assert "".join(stream.text_stream) == "Hello from the fake provider."
        final = stream.get_final_message()
    assert final.usage.output_tokens == 5 and final.usage.input_tokens == PROMPT_TOKENS
    assert fake.requests[-1].headers["anthropic-version"]
    assert fake.usage_log[-1] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 5,
                                  "stream": True, "completed": True}


def test_anthropic_raw_event_sequence(make_fake):
    fake = make_fake("anthropic")
    status, headers, data = raw_post(
        fake, "/v1/messages",
        {"model": "c", "max_tokens": 3, "messages": MESSAGES, "stream": True},
        {"x-api-key": "sk-test", "anthropic-version": "2023-06-01"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(data)
    names = [re.match(r"event: (\w+)\ndata: ", e).group(1) for e in events]
    assert names == ["message_start", "content_block_start", "ping",
                     "content_block_delta", "content_block_delta", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    delta = json.loads(events[-2].split("data: ", 1)[1])
    assert delta == {"type": "message_delta",
                     "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                     "usage": {"output_tokens": 3}}


def test_anthropic_tool_use_and_errors(make_fake):
    fake = make_fake("anthropic")
    client = anthropic_client(fake)
    call = {"name": "lookup", "arguments": {"q": "tollgate"}}
    fake.behaviours += [Behaviour(tool_call=call), Behaviour(tool_call=call),
                        Behaviour(status=529), Behaviour(error_event_after_chunks=1)]
    msg = client.messages.create(model="c", max_tokens=64, messages=MESSAGES)
    assert msg.stop_reason == "tool_use"
    assert msg.content[0].type == "tool_use" and msg.content[0].input == {"q": "tollgate"}
    with client.messages.stream(model="c", max_tokens=64, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert final.content[0].name == "lookup" and final.content[0].input == {"q": "tollgate"}

    with pytest.raises(anthropic.APIStatusError) as err:
        client.messages.create(model="c", max_tokens=64, messages=MESSAGES)
    assert err.value.status_code == 529
    assert err.value.body["error"]["type"] == "overloaded_error"

    with pytest.raises(anthropic.APIStatusError) as err:
        with client.messages.stream(model="c", max_tokens=64, messages=MESSAGES) as stream:
            list(stream.text_stream)
    assert err.value.body["error"]["type"] == "overloaded_error"

    with pytest.raises(anthropic.AuthenticationError) as err:
        anthropic_client(fake, key="bad").messages.create(model="c", max_tokens=8,
                                                          messages=MESSAGES)
    assert err.value.body["error"]["type"] == "authentication_error"


def test_anthropic_request_validation(make_fake):
    fake = make_fake("anthropic")
    client = anthropic_client(fake)
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="c", max_tokens=8, messages=[
            {"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert err.value.body["error"]["type"] == "invalid_request_error"
    assert "alternate" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="c", max_tokens=8,
                               messages=[{"role": "assistant", "content": "a"}])
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="c", max_tokens=8, messages=[])
    headers = {"x-api-key": "sk-test", "anthropic-version": "2023-06-01"}
    status, _, data = raw_post(fake, "/v1/messages", {"model": "c", "messages": MESSAGES},
                               headers)
    assert status == 400 and json.loads(data)["error"]["message"] == "max_tokens: Field required"
    status, _, data = raw_post(fake, "/v1/messages",
                               {"model": "c", "max_tokens": 5, "messages": MESSAGES},
                               {"x-api-key": "sk-test"})
    assert status == 400 and "anthropic-version" in json.loads(data)["error"]["message"]
    assert fake.usage_log == []


# ---------------------------------------------------------------- CLI


def test_cli_serves_until_sigterm():
    script = Path(__file__).with_name("fake_provider.py")
    proc = subprocess.Popen([sys.executable, str(script), "--kind", "openai", "--port", "0",
                             "--chunks", "3", "--reply", "one two three"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r":(\d+)\s*$", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/chat/completions",
                     body=json.dumps({"model": "m", "messages": MESSAGES, "stream": True}),
                     headers={"Authorization": "Bearer sk-test",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        assert resp.status == 200 and data.count(b'"content"') == 4  # role + 3 pieces
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
