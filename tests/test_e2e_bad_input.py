"""Bad input never reaches a provider and gets an OpenAI-shaped error with the right status."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import providers_for

pytestmark = pytest.mark.e2e

LIMIT = 2 * 1024 * 1024 + 512 * 1024  # 2.5 MiB: a 2 MB prompt fits, 3 MB does not


@pytest.fixture
def gw(gateway, fake_openai, fake_anthropic):
    return gateway({
        "providers": providers_for(fake_openai, None, fake_anthropic),
        "limits": {"max_request_bytes": LIMIT},
        "models": {
            "gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}]},
            "claude": {"targets": [{"provider": "anthropic", "model": "claude-sonnet-4-5"}]},
        },
    })


@pytest.fixture(autouse=True)
def nothing_reaches_a_provider(request, fake_openai, fake_anthropic):
    yield
    if "reaches_provider" not in request.keywords:
        assert fake_openai.requests == [] and fake_anthropic.requests == []


def error_of(body: bytes) -> dict:
    obj = json.loads(body)
    assert set(obj) == {"error"}
    assert {"message", "type", "code"} <= set(obj["error"])
    return obj["error"]


def chat(**overrides) -> bytes:
    return json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **overrides}).encode()


CASES = [
    ("not json", b"{not json", 400, "invalid_json"),
    ("empty object", b"{}", 400, "missing_model"),
    ("json array", b"[1, 2]", 400, "invalid_json"),
    ("model not a string", json.dumps({"model": 5, "messages": []}).encode(), 400, "invalid_model"),
    ("no messages", json.dumps({"model": "gpt-4o"}).encode(), 400, "invalid_messages"),
    ("empty messages", chat(messages=[]), 400, "invalid_messages"),
    ("message without role", chat(messages=[{"content": "hi"}]), 400, "invalid_messages"),
    ("unknown role", chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "invalid_messages"),
    ("content a number", chat(messages=[{"role": "user", "content": 42}]), 400, "invalid_messages"),
    ("negative max_tokens", chat(max_tokens=-1), 400, "invalid_value"),
    ("absurd max_tokens", chat(max_tokens=10**12), 400, "invalid_value"),
    ("temperature out of range", chat(temperature=7), 400, "invalid_value"),
    ("stream not a bool", chat(stream="yes"), 400, None),
    ("invalid utf-8", b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_json"),
    ("deeply nested", b'{"model": "gpt-4o", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_json"),
]


@pytest.mark.parametrize("name, body, status, code", CASES, ids=[c[0] for c in CASES])
def test_bad_requests_get_openai_errors(gw, name, body, status, code):
    got, headers, raw = gw.raw("POST", "/v1/chat/completions", body)
    assert got == status, raw
    assert headers["content-type"].startswith("application/json")
    err = error_of(raw)
    if code:
        assert err["code"] == code


def test_an_unknown_alias_is_404_and_lists_the_aliases(gw):
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5-ultra", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    assert "gpt-4o" in e.value.body["message"] and "claude" in e.value.body["message"]


def test_an_unknown_path_is_404_and_a_wrong_method_405(gw):
    status, _, raw = gw.raw("POST", "/v1/completions", chat())
    assert status == 404 and error_of(raw)["code"] == "unknown_url"
    status, _, raw = gw.raw("GET", "/v1/chat/completions")
    assert status == 405 and error_of(raw)["type"] == "invalid_request_error"


def test_parameters_a_target_cannot_honour_are_400(gw):
    status, _, raw = gw.raw("POST", "/v1/chat/completions", chat(model="claude", n=3))
    assert status == 400 and "n" in error_of(raw)["message"]


def test_embeddings_on_a_chat_only_backend_are_400(gw):
    status, _, raw = gw.raw("POST", "/v1/embeddings", json.dumps({"model": "claude", "input": "hi"}).encode())
    assert status == 400 and error_of(raw)["code"] == "unsupported_endpoint"


@pytest.mark.reaches_provider
def test_a_2mb_prompt_goes_through(gw, fake_openai):
    prompt = "lorem ipsum dolor sit amet " * (2 * 1024 * 1024 // 27)
    status, _, raw = gw.raw("POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": prompt}]))
    assert status == 200, raw[:300]
    assert len(fake_openai.requests[0].body) > 2 * 1024 * 1024 - 100


def test_a_body_over_the_limit_is_a_clean_413(gw):
    prompt = "x" * (3 * 1024 * 1024)
    status, headers, raw = gw.raw("POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": prompt}]))
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    assert error_of(raw)["code"] == "request_too_large"


def test_client_supplied_internal_headers_are_ignored(gw):
    status, _, raw = gw.raw("POST", "/v1/chat/completions", chat(model="nope"), headers={"x-tollgate-route": "gpt-4o"})
    assert status == 404
