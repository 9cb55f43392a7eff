"""What must match before two requests may share an answer, and what is never cached."""

from __future__ import annotations

import pytest

from extproc.cache.keys import Bypass, Plan, plan, temperature_bucket

USER = {"role": "user", "content": "How do I reset my password?"}


def planned(**body) -> Plan:
    p = plan({"messages": [USER], **body}, alias="chat", namespace="ml")
    assert isinstance(p, Plan), p
    return p


def test_only_the_last_user_message_is_the_prompt_and_spacing_does_not_matter():
    p = plan({"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "  How do I   reset my password? "}]},
             alias="chat", namespace="ml")
    assert isinstance(p, Plan) and p.prompt == "How do I reset my password?"
    q = plan({"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": [{"type": "text", "text": "How do I reset my password?"}]}]},
             alias="chat", namespace="ml")
    assert isinstance(q, Plan) and (q.scope, q.exact) == (p.scope, p.exact)


@pytest.mark.parametrize("change", [
    {"messages": [{"role": "system", "content": "Answer in French."}, USER]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, USER]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"tool_choice": "none"}, {"response_format": {"type": "json_object"}}, {"stop": ["\n"]}, {"seed": 7},
    {"max_tokens": 5}, {"temperature": 1.5},
], ids=lambda c: next(iter(c)))
def test_everything_else_that_changes_the_answer_changes_the_scope(change):
    base = planned()
    other = plan({"messages": [USER], **change}, alias="chat", namespace="ml")
    assert isinstance(other, Plan) and other.scope != base.scope and other.exact != base.exact


def test_neither_team_nor_alias_share_a_scope_but_the_client_s_bookkeeping_does_not_matter():
    base = planned()
    assert plan({"messages": [USER]}, alias="chat", namespace="research").scope != base.scope
    assert plan({"messages": [USER]}, alias="other", namespace="ml").scope != base.scope
    assert planned(user="u-17", stream=True, metadata={"x": 1}).exact == base.exact
    assert planned(temperature=0).exact == planned(temperature=0.2).exact  # one low bucket


@pytest.mark.parametrize("body, reason", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "non_text"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [{"id": "c1"}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "42"}]}, "last_turn"),
    ({"messages": [USER], "n": 2}, "n"),
    ({"messages": [USER], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "   "}]}, "empty"),
    ({"messages": []}, "no_messages"),
])
def test_requests_the_cache_cannot_answer_faithfully_bypass_it(body, reason):
    assert plan(body, alias="chat", namespace="ml") == Bypass(reason)


def test_temperature_buckets():
    assert [temperature_bucket(t) for t in (None, 0, 0.3, 0.7, 1.0, 1.2, 1.6, "x")] == [
        "default", "low", "low", "mid", "mid", "high2", "high3", "invalid"]
