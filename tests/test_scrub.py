"""The scrubber takes every form of an injected credential out of text, and leaves other text alone."""

from __future__ import annotations

import pytest

from extproc.credentials.scrub import REDACTED, Scrubber, scrubber_for

KEY = "sk-proj-CANARY7f3a9cQwErTy0123456789abcd"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0b2xsZ2F0ZSJ9.c2lnbmF0dXJlLWJ5dGVz"  # an Azure AD bearer token's shape


@pytest.mark.parametrize("text", [
    f"Incorrect API key provided: {KEY}.",
    f"Incorrect API key provided: {KEY[:3]}{'*' * 20}{KEY[-4:]}.",
    f"Incorrect API key provided: {KEY[:8]}****{KEY[-4:]}. You can find your API key at ...",
    f"key {KEY[:3]}...{KEY[-4:]} is invalid",
    f"key {KEY[:3]}…{KEY[-6:]} is invalid",
    f"the key ending ****{KEY[-4:]} was revoked",
    f"the key starting {KEY[:16]} was revoked",
    f"a middle part: {KEY[10:30]}",
    f'{{"error":{{"message":"Bearer {KEY}","type":"invalid_request_error"}}}}',
    f"token {TOKEN} expired",
    f"token {TOKEN[:40]} expired",
])
def test_every_recognisable_form_of_an_injected_secret_is_redacted(text):
    out = Scrubber([KEY, TOKEN]).text(text)
    assert REDACTED in out
    for secret in (KEY, TOKEN):
        assert not any(secret[i:i + 12] in out for i in range(len(secret) - 11))
        assert secret[-4:] not in out  # the tail a masked form shows is gone too


@pytest.mark.parametrize("text", [
    "The model does not exist or you do not have access to it.",
    "Rate limit reached for requests in organization org-fake on tokens per min. Please try again in 1s.",
    "Overloaded... please retry *** later",
    "abcd is a common suffix, and so is ****efgh",
    '{"choices":[{"delta":{"content":"sk- is how OpenAI keys start"}}]}',
])
def test_text_without_a_secret_is_left_alone(text):
    assert Scrubber([KEY, TOKEN]).text(text) == text


def test_bytes_headers_and_the_cheap_path():
    s = Scrubber([KEY])
    assert s.body(f"echo {KEY}".encode()) == f"echo {REDACTED}".encode()
    assert s.exact(f"data: {KEY}\n\n".encode()) == f"data: {REDACTED}\n\n".encode()
    assert s.exact(b"nothing here") == b"nothing here"
    assert s.headers({":status": "401", "x-echo": f"got {KEY[:3]}***{KEY[-4:]}", "x-fine": "ok"}) == {
        "x-echo": f"got {REDACTED}"}
    assert s.body(b"\xff\xfe not utf-8 " + KEY.encode()) == b"\xff\xfe not utf-8 " + REDACTED.encode()


def test_no_secrets_means_nothing_to_do():
    s = Scrubber([])
    assert not s and s.text(f"{KEY}") == KEY and s.headers({"a": KEY}) == {}


def test_the_scrubber_for_a_set_of_secrets_is_built_once_and_scrubs_the_same() -> None:
    s = scrubber_for([KEY, TOKEN])
    assert scrubber_for([TOKEN, KEY]) is s  # one per set, whatever the order the exchange injected them in
    text = f"Incorrect API key provided: {KEY[:6]}****{KEY[-4:]} and {TOKEN}"
    assert s.text(text) == Scrubber([KEY, TOKEN]).text(text) != text
