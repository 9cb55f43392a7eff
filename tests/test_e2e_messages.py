"""End to end: what one exchange costs in ext_proc messages, read from Envoy's own counters.

The gRPC transport is most of the Python hop's cost (README, Performance), so
the number of messages per exchange is part of the gateway's contract: a plain
request is one gRPC stream of 4 messages (request headers, the buffered body,
the response headers, the buffered answer), and a streamed one the same
stream with one message per body chunk Envoy passes on instead of the
buffered answer. The README's Performance section says why 4 is the floor
with Envoy 1.40 and which shortcuts Envoy does not take.
"""

from __future__ import annotations

import re
import time

import openai
import pytest

from tests.fake_provider import Behaviour
from tests.test_e2e_chat import CLIENT_KEY, MESSAGES, config

pytestmark = pytest.mark.e2e


@pytest.fixture
def gw(gateway, fake_openai, fake_azure, fake_anthropic):
    return gateway(config(fake_openai, fake_azure, fake_anthropic))


@pytest.fixture
def client(gw):
    return openai.OpenAI(base_url=gw.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30)


def counters(gw) -> dict[str, int]:
    """The gateway filter's ext_proc counters (``http.tollgate.ext_proc.*``), once every message sent was
    answered, or 5 s passed."""
    deadline = time.monotonic() + 5
    while True:
        text = gw.admin("/stats?filter=^http\\.tollgate\\.ext_proc\\.")
        got = {m[1]: int(m[2]) for m in re.finditer(r"^http\.tollgate\.ext_proc\.(\w+): (\d+)$", text, re.M)}
        if got.get("stream_msgs_sent") == got.get("stream_msgs_received") or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_a_plain_request_is_one_stream_of_four_messages(client, gw):
    before = counters(gw)
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    after = counters(gw)
    assert after["streams_started"] - before.get("streams_started", 0) == 3
    assert after["stream_msgs_sent"] - before.get("stream_msgs_sent", 0) == 3 * 4
    assert after["stream_msgs_received"] - before.get("stream_msgs_received", 0) == 3 * 4


def test_a_streamed_request_adds_one_message_per_body_chunk_on_the_same_stream(client, gw, fake_openai):
    reply = "one two three four five six seven eight"
    fake_openai.default = Behaviour(reply=reply, token_delay=0.01, prompt_tokens=9, completion_tokens=8)
    before = counters(gw)
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    after = counters(gw)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert after["streams_started"] - before.get("streams_started", 0) == 1
    sent = after["stream_msgs_sent"] - before.get("stream_msgs_sent", 0)
    # 3 for the request and the response headers; then the paced provider's events, one body message each
    # at most (Envoy may pass two that arrived together as one), and the empty end of stream.
    events = len(reply.split()) + 3  # the deltas, the finish, the usage event, [DONE]
    assert 3 + 2 <= sent <= 3 + events + 1
    # every message answered, but the last: the SDK closes the connection once it read [DONE], and the
    # answer to the empty end-of-stream message that follows can then be dropped with the stream
    assert after["stream_msgs_received"] - before.get("stream_msgs_received", 0) in (sent - 1, sent)
