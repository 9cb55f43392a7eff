"""End to end: an alias with ``stream_chunks: observe`` — streamed chunks pass unheld, and are still read.

The gateway filter stops taking the body once the answer's headers show a 200
event stream, and the meter filter (ext_proc observability mode) hands every
chunk to the server without Envoy waiting for an answer. What must still hold,
each checked independently of the gateway: the client gets the provider's
stream byte for byte, the ledger bills the provider's own usage exactly, an
error answer is held and scrubbed as on any alias, and a stream that needs
changing (the client did not ask for usage, so the gateway removes the usage
event it added) is held as usual. pipeline/observe.py lists what observing
gives up (the budget cut-off mid-stream, scrubbing inside an in-band error).
"""

from __future__ import annotations

import http.client
import json
import re

import openai
import pytest

from tests.conftest import OPENAI_KEY, providers_for
from tests.fake_provider import Behaviour, FakeProvider, count_chat_words
from tests.quota.redis_process import RedisProcess
from tests.test_e2e_hardening_scrub import echoes, leaks
from tests.test_e2e_quota import billed, cost, records, words

pytestmark = pytest.mark.e2e

ASK = [{"role": "user", "content": "Count for me, one word at a time."}]
USAGE = {"include_usage": True}


@pytest.fixture
def fake():
    with FakeProvider("openai", api_key=OPENAI_KEY, prompt_counter=count_chat_words) as f:
        yield f


@pytest.fixture
def redis(tmp_path):
    with RedisProcess(tmp_path / "redis") as r:
        yield r


@pytest.fixture
def gw(gateway, fake, redis):
    return gateway({
        "providers": providers_for(fake),
        "models": {"gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}], "stream_chunks": "observe"}},
        "redis": {"url": redis.url, "key_prefix": "e2e"},
        "quota": {"limits": {"org": {"usd_per_day": 1}}},
    })


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=30)


def counters(gw, name: str) -> dict[str, int]:
    text = gw.admin(f"/stats?filter=^http\\.tollgate\\.{name}\\.")
    return {m[1]: int(m[2]) for m in re.finditer(rf"^http\.tollgate\.{name}\.(\w+): (\d+)$", text, re.M)}


def raw_stream(gw, body: dict) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    data = resp.read()
    conn.close()
    return data


def test_an_observed_stream_passes_unheld_and_bills_the_providers_usage_exactly(gw, fake, redis):
    fake.default = Behaviour(reply=words(120), token_delay=0.002)
    chunks = list(client(gw).chat.completions.create(model="gpt-4o", messages=ASK, stream=True,
                                                     stream_options=USAGE))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == words(120)
    prompt = count_chat_words(fake.requests[0].json)
    assert [(c.usage.prompt_tokens, c.usage.completion_tokens) for c in chunks if c.usage] == [(prompt, 120)]
    assert [r.micro_usd for r in records(gw, redis, n=1)] == [cost(prompt, 120)] == [billed(fake)]
    # the gateway stream: request headers, body, response headers, and no chunk; the meter saw the chunks
    assert counters(gw, "ext_proc")["stream_msgs_sent"] == 3
    meter = counters(gw, r"ext_proc\.meter")
    assert meter["stream_msgs_sent"] >= 60  # the paced provider's events, one body message each at most
    record = next(r for r in gw.access_records() if r.get("alias") == "gpt-4o")
    assert (record["input_tokens"], record["output_tokens"]) == (prompt, 120)


def test_an_observed_stream_reaches_the_client_byte_for_byte(gw, fake):
    fake.default = Behaviour(reply=words(20), token_delay=0.002)
    body = {"model": "gpt-4o", "messages": ASK, "stream": True, "stream_options": USAGE}
    got = raw_stream(gw, body)
    events = [e for e in got.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    deltas = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas if d["choices"]) == words(20)


def test_a_stream_whose_client_did_not_ask_for_usage_is_held_and_the_added_usage_removed(gw, fake):
    fake.default = Behaviour(reply=words(12), token_delay=0.01)
    before = counters(gw, "ext_proc").get("stream_msgs_sent", 0)
    chunks = list(client(gw).chat.completions.create(model="gpt-4o", messages=ASK, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == words(12)
    assert all(c.usage is None for c in chunks)
    assert counters(gw, "ext_proc")["stream_msgs_sent"] - before > 3 + 6  # its chunks went through the gateway


@pytest.mark.parametrize("status", [401, 500])
def test_an_error_answer_on_an_observed_alias_is_still_held_and_scrubbed(gw, fake, status):
    for message in echoes(OPENAI_KEY):
        fake.behaviours.append(Behaviour(status=status, error_message=message, headers={"x-echo": f"got {OPENAI_KEY}"}))
        with pytest.raises(openai.APIStatusError) as caught:
            list(client(gw).chat.completions.create(model="gpt-4o", messages=ASK, stream=True, stream_options=USAGE))
        err = caught.value
        assert err.status_code == status
        assert leaks(err.response.text, OPENAI_KEY) == []
        assert all(leaks(f"{k}: {v}", OPENAI_KEY) == [] for k, v in err.response.headers.items())
        assert set(json.loads(err.response.text)) == {"error"}
