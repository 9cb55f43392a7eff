"""No credential the gateway injected reaches a client: not whole, not in part, not in any error path.

A provider (or a proxy before it) that echoes the key it received is played by the fake providers:
the key goes into the error message (whole, with its middle elided, or its first characters), into a
response header, and into an in-band stream error. Every answer is read through the real SDKs and
Envoy, and checked independently of the gateway's own scrubber.
"""

from __future__ import annotations

import http.client
import json

import anthropic  # noqa: F401 - the Anthropic target is driven through the OpenAI SDK, as clients do
import openai
import pytest

from tests.conftest import ANTHROPIC_KEY, AZURE_KEY, OPENAI_KEY, providers_for
from tests.fake_provider import Behaviour

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "hi"}]
KEY_OF = {"openai": OPENAI_KEY, "azure": AZURE_KEY, "anthropic": ANTHROPIC_KEY}


def echoes(key: str) -> list[str]:
    """The ways a provider shows a key it received, as seen in the wild."""
    return [
        f"Incorrect API key provided: {key}.",
        f"Incorrect API key provided: {key[:3]}{'*' * 12}{key[-4:]}.",
        f"key {key[:3]}...{key[-4:]} is not valid",
        f"the key starting {key[:14]} was revoked",
    ]


def leaks(text: str, key: str) -> list[str]:
    """Every part of ``key`` found in ``text``: the key, any 10 characters of it in a row, its last four."""
    found = [key] if key in text else []
    found += [key[i:i + 10] for i in range(len(key) - 9) if key[i:i + 10] in text]
    if key[-4:] in text:
        found.append(key[-4:])
    return found


@pytest.fixture
def gw(gateway, fake_openai, fake_azure, fake_anthropic):
    return gateway({
        "providers": providers_for(fake_openai, fake_azure, fake_anthropic),
        "models": {
            "openai": {"targets": [{"provider": "openai", "model": "gpt-4o"}]},
            "azure": {"targets": [{"provider": "azure", "model": "gpt-4o"}]},
            "anthropic": {"targets": [{"provider": "anthropic", "model": "claude-sonnet-4-5"}]},
        },
    })


FAKES = {"openai": "fake_openai", "azure": "fake_azure", "anthropic": "fake_anthropic"}


@pytest.mark.parametrize("kind", ["openai", "azure", "anthropic"])
@pytest.mark.parametrize("status", [401, 403, 429, 500, 503])
def test_an_error_echoing_the_key_reaches_the_client_without_it(request, gw, kind, status):
    fake = request.getfixturevalue(FAKES[kind])
    key = KEY_OF[kind]
    client = openai.OpenAI(base_url=gw.base_url, api_key="client-key", max_retries=0, timeout=20)
    for message in echoes(key):
        fake.behaviours.append(Behaviour(status=status, error_message=message, headers={"x-echo": f"got {key}"}))
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=kind, messages=MESSAGES)
        err = caught.value
        assert err.status_code == status
        assert leaks(err.response.text, key) == []
        assert all(leaks(f"{k}: {v}", key) == [] for k, v in err.response.headers.items())
        body = json.loads(err.response.text)
        assert set(body) == {"error"} and body["error"]["message"]  # still an OpenAI error, still readable


@pytest.mark.parametrize("kind", ["openai", "azure", "anthropic"])
def test_an_in_band_stream_error_echoing_the_key_reaches_the_client_without_it(request, gw, kind):
    fake = request.getfixturevalue(FAKES[kind])
    key = KEY_OF[kind]
    client = openai.OpenAI(base_url=gw.base_url, api_key="client-key", max_retries=0, timeout=20)
    for message in echoes(key):
        fake.behaviours.append(Behaviour(reply="one two three four", error_event_after_chunks=2,
                                         error_message=message))
        got = []
        with pytest.raises(openai.APIError) as caught:
            for chunk in client.chat.completions.create(model=kind, messages=MESSAGES, stream=True):
                got.extend(c.delta.content or "" for c in chunk.choices)
        assert "".join(got) == "one two"
        assert leaks(str(caught.value), key) == [] and leaks(json.dumps(caught.value.body), key) == []
        # and in the raw bytes of the same stream, read without an SDK
        fake.behaviours.append(Behaviour(reply="one two three four", error_event_after_chunks=2,
                                         error_message=message))
        raw = raw_stream(gw, kind)
        assert b'"error"' in raw and b"[DONE]" not in raw
        assert leaks(raw.decode(), key) == []


def test_a_wrong_key_rejected_by_openai_with_its_masked_echo_reaches_the_client_without_it(gateway, fake_openai):
    # the real OpenAI 401 shows the key it got as sk-***...abcd: the fake does the same with a key it does not know
    wrong = "sk-canary-wrong-key-90e1d7"
    gw = gateway({"providers": providers_for(fake_openai),
                  "models": {"gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}}},
                 env={"OPENAI_KEY": wrong})
    client = openai.OpenAI(base_url=gw.base_url, api_key="client-key", max_retries=0, timeout=20)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "Incorrect API key provided" in caught.value.response.text  # the provider's message, minus the key
    assert leaks(caught.value.response.text, wrong) == []


def raw_stream(gw, model: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    body = json.dumps({"model": model, "messages": MESSAGES, "stream": True})
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    out = b""
    try:
        while chunk := resp.read1(65536):
            out += chunk
    except http.client.IncompleteRead as e:
        out += e.partial
    finally:
        conn.close()
    return out
