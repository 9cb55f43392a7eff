"""The Python side can die, restart and drain without clients seeing anything but clean errors."""

from __future__ import annotations

import signal
import threading
import time

import openai
import pytest

from tests.conftest import providers_for
from tests.fake_provider import Behaviour

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "hi"}]


def one_model(fake) -> dict:
    return {"providers": providers_for(fake), "models": {"gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}}}


def test_killing_the_extproc_server_gives_clean_5xx_json_and_service_resumes(gateway, fake_openai):
    gw = gateway(one_model(fake_openai), split=True)
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0, timeout=10)
    assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices

    gw.kill_extproc()
    status, headers, body = gw.raw("POST", "/v1/chat/completions",
                                   b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}')
    assert 500 <= status < 600
    assert headers["content-type"].startswith("application/json")
    import json

    err = json.loads(body)["error"]
    assert err["message"] and err["type"] == "api_error"
    assert len(fake_openai.requests) == 1  # fail closed: nothing went upstream unprocessed

    gw.start_extproc()
    deadline = time.monotonic() + 15
    while True:
        try:
            assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
            break
        except openai.APIStatusError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_sigterm_lets_an_in_flight_stream_finish_then_exits_cleanly(gateway, fake_openai):
    gw = gateway(one_model(fake_openai))
    fake_openai.default = Behaviour(reply=" ".join(["word"] * 30), token_delay=0.05)
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0, timeout=30)
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    first = next(iter(stream))
    assert first.choices
    threading.Timer(0.2, gw.proc.send_signal, args=(signal.SIGTERM,)).start()
    rest = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
    assert text.split() == ["word"] * 30
    assert gw.proc.wait(30) == 0
