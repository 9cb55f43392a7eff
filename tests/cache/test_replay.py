"""A hit in the client's shape, and the answer read back for storing, at every split point."""

from __future__ import annotations

import json

import pytest

from extproc.cache.entry import Answer
from extproc.cache.replay import Collector, replay_json, replay_sse
from extproc.providers.sse import SSEParser

ANSWER = Answer("Open Settings → Security → Reset password. Then sign in again with the new one.", "gpt-4o",
                14, 17, 150)


def events(stream: bytes) -> list[str]:
    return [e.data for e in SSEParser().feed(stream)]


def test_a_json_hit_is_a_chat_completion_with_a_fresh_id():
    one, two = json.loads(replay_json(ANSWER, "chat")), json.loads(replay_json(ANSWER, "chat"))
    assert one["choices"][0]["message"] == {"role": "assistant", "content": ANSWER.content, "refusal": None}
    assert one["choices"][0]["finish_reason"] == "stop" and one["object"] == "chat.completion"
    assert one["usage"] == {"prompt_tokens": 14, "completion_tokens": 17, "total_tokens": 31}
    assert one["id"] != two["id"] and one["id"].startswith("chatcmpl-")


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_streamed_hit_is_role_content_finish_usage_done(include_usage):
    data = events(replay_sse(ANSWER, "chat", include_usage=include_usage))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == ANSWER.content
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert len({c["id"] for c in chunks}) == 1
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 31
    else:
        assert all("usage" not in c for c in chunks)


def test_a_replayed_stream_read_back_at_every_byte_boundary_is_the_same_answer():
    stream = replay_sse(ANSWER, "gpt-4o", include_usage=True)
    for cut in range(1, len(stream)):
        c = Collector()
        c.feed_stream(stream[:cut])
        c.feed_stream(stream[cut:])
        assert c.answer(14, 17, 150) == ANSWER, cut


def test_only_a_plain_stop_with_one_choice_and_no_tool_call_is_storable():
    def whole(body: dict) -> Answer | None:
        c = Collector()
        c.feed_whole(json.dumps(body).encode())
        return c.answer(1, 1, 1)
    ok = {"model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                     "finish_reason": "stop"}]}
    assert whole(ok) == Answer("hi", "m", 1, 1, 1)
    assert whole({**ok, "choices": [{**ok["choices"][0], "finish_reason": "length"}]}) is None
    assert whole({**ok, "choices": [ok["choices"][0], {**ok["choices"][0], "index": 1}]}) is None
    tool = {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}
    assert whole({**ok, "choices": [{"index": 0, "message": tool, "finish_reason": "stop"}]}) is None
    cut = Collector()
    cut.feed_stream(replay_sse(ANSWER, "m", include_usage=False)[:-14])  # no [DONE]
    assert cut.answer(1, 1, 1) is None
