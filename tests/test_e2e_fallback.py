"""Fallback through Envoy's retries: every attempt is translated and authenticated for its own backend."""

from __future__ import annotations

import time

import openai
import pytest

from tests.conftest import ANTHROPIC_KEY, OPENAI_KEY, providers_for
from tests.fake_provider import DEFAULT_REPLY, Behaviour, split_reply
from tests.harness import free_port

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Say hello."}]


def fallback_config(openai_fake, anthropic_fake, **alias_opts) -> dict:
    providers = providers_for(openai_fake, None, anthropic_fake)
    providers["dead"] = {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "api_key": {"env": "OPENAI_KEY"}}
    providers["dead-anthropic"] = {"type": "anthropic", "base_url": f"http://127.0.0.1:{free_port()}",
                                   "api_key": {"env": "ANTHROPIC_KEY"}}
    return {
        "providers": providers,
        "models": {
            "gpt-4o": {
                "targets": [{"provider": "openai", "model": "gpt-4o"}, {"provider": "anthropic", "model": "claude-sonnet-4-5"}],
                "per_try_timeout": "3s",
                "first_byte_timeout": "1s",
                **alias_opts,
            },
            "refused-first": {
                "targets": [{"provider": "dead", "model": "gpt-4o"}, {"provider": "openai", "model": "gpt-4o-mini"}],
            },
            "claude-unreachable": {"targets": [{"provider": "dead-anthropic", "model": "claude-haiku-4-5"}]},
            "gpt-4o-mini": {
                "targets": [{"provider": "anthropic", "model": "claude-haiku-4-5"},
                            {"provider": "openai", "model": "gpt-4o-mini"}],
            },
            "three-deep": {
                "targets": [
                    {"provider": "openai", "model": "gpt-4o"},
                    {"provider": "openai", "model": "gpt-4o-mini"},
                    {"provider": "anthropic", "model": "claude-haiku-4-5"},
                ],
            },
        },
    }


@pytest.fixture
def client_for(gateway, fake_openai, fake_anthropic):
    def make(**alias_opts):
        gw = gateway(fallback_config(fake_openai, fake_anthropic, **alias_opts))
        return gw, openai.OpenAI(base_url=gw.base_url, api_key="client", max_retries=0, timeout=30)

    return make


@pytest.mark.parametrize("status", [500, 502, 503, 529])
def test_a_5xx_from_the_primary_falls_back_to_the_next_provider(client_for, fake_openai, fake_anthropic, status):
    _, client = client_for()
    fake_openai.behaviours.append(Behaviour(status=status))
    fake_anthropic.default = Behaviour(reply="Claude here.")
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == "Claude here."
    assert raw.headers["x-tollgate-provider"] == "anthropic"
    assert raw.headers["x-tollgate-model"] == "claude-sonnet-4-5"
    assert raw.headers["x-tollgate-attempts"] == "2"
    # the second attempt was translated and authenticated for Anthropic
    sent = fake_anthropic.requests[0]
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert sent.json["model"] == "claude-sonnet-4-5" and "authorization" not in sent.headers


def test_a_fallback_after_a_translated_primary_gets_the_clients_own_bytes_and_only_its_own_key(
        client_for, fake_openai, fake_anthropic):
    # Envoy keeps the primary's (Anthropic) request for its retry; the OpenAI fallback needs no change to
    # the client's body, so it must get the client's bytes back, with none of Anthropic's headers.
    gw, _ = client_for()
    fake_anthropic.behaviours.append(Behaviour(status=503))
    fake_openai.default = Behaviour(reply="GPT here.")
    body = b'{"model": "gpt-4o-mini",  "messages": [{"role": "user", "content": "Say hello."}]}'
    status, headers, answer = gw.raw("POST", "/v1/chat/completions", body, headers={"authorization": "Bearer client"})
    assert status == 200, answer
    assert headers["x-tollgate-provider"] == "openai" and headers["x-tollgate-attempts"] == "2"
    primary = fake_anthropic.requests[0]
    assert primary.headers["x-api-key"] == ANTHROPIC_KEY and "authorization" not in primary.headers
    assert not any(h.startswith("x-tollgate-") for h in primary.headers)
    sent = fake_openai.requests[0]
    assert sent.path == "/v1/chat/completions" and sent.body == body
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert not {"x-api-key", "anthropic-version"} & set(sent.headers)
    assert not any(h.startswith("x-tollgate-") for h in sent.headers)


def test_envoys_own_answer_when_no_target_answers_is_passed_on_as_it_is(client_for):
    # no target's translator reads it (Envoy's 503 is already in OpenAI's shape), and it names no provider
    gw, _ = client_for()
    status, headers, answer = gw.raw(
        "POST", "/v1/chat/completions", b'{"model": "claude-unreachable", "messages": [{"role": "user", "content": "hi"}]}')
    assert status == 503 and b'"code":"upstream_unavailable"' in answer
    assert headers["x-request-id"] and not any(h.startswith("x-tollgate-") for h in headers)


def test_a_primary_that_sends_no_first_byte_in_time_is_failed_over(client_for, fake_openai, fake_anthropic):
    _, client = client_for()
    fake_openai.behaviours.append(Behaviour(header_delay=5))
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    elapsed = time.monotonic() - started
    assert raw.headers["x-tollgate-provider"] == "anthropic"
    assert elapsed < 4  # the 1 s first-byte budget, not the 5 s stall


def test_a_primary_that_refuses_connections_is_failed_over(client_for, fake_openai):
    _, client = client_for()
    raw = client.chat.completions.with_raw_response.create(model="refused-first", messages=MESSAGES)
    assert raw.headers["x-tollgate-provider"] == "openai"
    assert raw.headers["x-tollgate-model"] == "gpt-4o-mini"
    assert fake_openai.requests[0].json["model"] == "gpt-4o-mini"


def test_a_429_falls_back_when_configured(client_for, fake_openai, fake_anthropic):
    _, client = client_for(retry_on_429=True)
    fake_openai.behaviours.append(Behaviour(status=429))
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.headers["x-tollgate-provider"] == "anthropic"


def test_a_429_is_returned_as_is_when_fallback_on_429_is_off(client_for, fake_openai, fake_anthropic):
    _, client = client_for(retry_on_429=False)
    fake_openai.behaviours.append(Behaviour(status=429))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert fake_anthropic.requests == []


def test_fallback_walks_the_whole_list_in_order(client_for, fake_openai, fake_anthropic):
    _, client = client_for()
    fake_openai.behaviours.extend([Behaviour(status=500), Behaviour(status=503)])
    raw = client.chat.completions.with_raw_response.create(model="three-deep", messages=MESSAGES)
    assert [r.json["model"] for r in fake_openai.requests] == ["gpt-4o", "gpt-4o-mini"]
    assert raw.headers["x-tollgate-model"] == "claude-haiku-4-5"
    assert raw.headers["x-tollgate-attempts"] == "3"


def test_when_every_target_fails_the_client_gets_the_last_error_in_openai_shape(client_for, fake_openai, fake_anthropic):
    _, client = client_for()
    fake_openai.behaviours.append(Behaviour(status=500))
    fake_anthropic.behaviours.append(Behaviour(status=529))
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.status_code >= 500
    assert isinstance(e.value.body, dict) and e.value.body.get("message")


def test_a_fallback_stream_is_translated_for_its_backend(client_for, fake_openai, fake_anthropic):
    _, client = client_for()
    fake_openai.behaviours.append(Behaviour(status=500))
    fake_anthropic.default = Behaviour(reply="streamed from Claude")
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "streamed from Claude"


BROKEN = {
    # how it broke: (the fake's behaviour, what the SDK raises, what its message says, the access log's error)
    "abort": (Behaviour(fail_after_chunks=2, token_delay=0.01), openai.APIConnectionError, "connection error",
              "stream_reset"),  # Envoy resets the client's stream: an incomplete chunked body
    "error_event": (Behaviour(error_event_after_chunks=2, token_delay=0.01), openai.APIError, "server had an error",
                    "stream_interrupted"),
    "no_done": (Behaviour(end_without_done=True), openai.APIError, "ended the stream before it was complete",
                "stream_interrupted"),
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_a_stream_that_breaks_after_bytes_reached_the_client_ends_with_an_error_not_a_retry(
    client_for, fake_openai, fake_anthropic, how
):
    gw, client = client_for()
    behaviour, raised, says, logged = BROKEN[how]
    fake_openai.behaviours.append(behaviour)
    received = []
    with pytest.raises(raised) as e:
        for c in client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
            received.append(c)
    assert says in str(e.value).lower()
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    words = split_reply(DEFAULT_REPLY)
    if how == "no_done":  # the provider sent its whole answer and finish_reason, then went quiet: an error event
        assert text == DEFAULT_REPLY
    elif how == "error_event":  # the two chunks before the provider's error event, then that event
        assert text == "".join(words[:2])
        assert not any(c.choices and c.choices[0].finish_reason == "stop" for c in received)
    else:  # a reset: at most the chunk in flight is lost (README: cuts)
        assert text in ("".join(words[:1]), "".join(words[:2]))
    assert fake_anthropic.requests == []  # not silently retried elsewhere
    assert wait_for_error(gw) == logged


def wait_for_error(gw) -> str | None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if records := gw.access_records():
            return records[-1]["error"]
        time.sleep(0.05)
    raise AssertionError("no access-log record")
