"""Specs for the pipeline bench's own parts: the floor it measures the gateway against, the peer it
compares with, and how it judges a goal. A bench whose floor silently changed shape, or whose peer
silently vanished, would report figures that mean something else; these pin both."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.bench import peer as litellm
from tests.bench.pipeline import PLAIN, UPSTREAM_KEY, Goal, envoy_counters, start_floor
from tests.bench.run import KEY_ENV, chat_body, check_once, stop_process
from tests.fake_provider import FakeProvider


@pytest.mark.parametrize(("floor", "messages"), [("floor 2m", 2), ("floor 4m", 4)])
def test_the_floor_answers_through_the_gateways_own_envoy_config_with_its_message_count(
        tmp_path: Path, floor: str, messages: int) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    with FakeProvider("openai", api_key=UPSTREAM_KEY) as fake:
        cfg = {"providers": {"plain": {"type": "openai", "base_url": f"{fake.base_url}/v1",
                                       "api_key": {"env": KEY_ENV}}},
               "models": {PLAIN: {"targets": [{"provider": "plain", "model": "gpt-4o-mini"}]}}}
        try:
            subject = start_floor(tmp_path, floor, cfg, (fake.port, os.getpid()), procs)
            before = envoy_counters(subject.admin)
            status, _, answer = check_once(f"{subject.base}/v1/chat/completions", chat_body(PLAIN, stream=False),
                                           subject.bearer)
            after = envoy_counters(subject.admin)
        finally:
            for p in procs:
                stop_process(p)
        assert status == 200, answer
        assert isinstance(answer, dict) and answer["choices"][0]["message"]["content"]
        # the no-op set the provider's key, as the gateway stage does; the client's never reached the fake
        assert fake.requests[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    sent = {k: v - before.get(k, 0) for k, v in after.items() if k.endswith(".stream_msgs_sent")}
    assert sum(sent.values()) == messages
    assert sum(v - before.get(k, 0) for k, v in after.items() if k.endswith(".streams_started")) == 1


def test_a_peer_with_no_setup_beside_the_checkout_is_reported_not_left_out(tmp_path: Path) -> None:
    peer = litellm.Peer(venv=tmp_path / "venv", home=None, logs=tmp_path)
    process, port, why = peer.start(upstream_port=1)
    assert process is None and port == 0
    assert "no shared/peers/litellm/" in why and "LITELLM_PEER_DIR" in why


def test_a_peer_that_exits_while_starting_is_reported_with_its_exit_code_and_log(tmp_path: Path) -> None:
    home = tmp_path / "peers" / "litellm"
    home.mkdir(parents=True)
    (home / "start.sh").write_text("echo 'ImportError: no module named litellm.proxy' >&2\nexit 3\n")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "litellm").write_text("")  # present: no setup is attempted
    process, _, why = litellm.Peer(venv=venv, home=home, logs=tmp_path / "logs").start(upstream_port=1)
    assert process is None
    assert "exited with 3" in why and "ImportError: no module named litellm.proxy" in why


def test_a_goal_says_met_or_by_how_much_it_is_missed() -> None:
    at_least = Goal("full: req/s, × base", 0.8, "×", False, [0.55, 0.60, 0.62])
    assert at_least.verdict() == "**missed** by 0.20 × (1.3× short of the goal)"
    at_most = Goal("Python CPU per chunk", 40.0, "µs", True, [120.0, 100.0, 150.0])
    assert at_most.verdict() == "**missed** by 80 µs (3.0× over the goal)"
    assert Goal("translated stream CPU, × passthrough", 1.3, "×", True, [1.1, 1.2]).verdict() == "met"
    assert Goal("full: req/s, × LiteLLM", 10.0, "×", False, []).verdict() == "not measured in this run"
