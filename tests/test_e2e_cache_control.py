"""`tollgate cache clear` and `stats` without Redis reach the running gateway through its control socket.

A real gateway (Envoy + the supervisor's ext_proc process) keeps its cache in
its own memory; the command, a separate process given the same config, finds
that process's socket in ``cache.control_dir`` and asks it. The real openai SDK
shows the effect: what was a hit is a miss after the clear, what was not named
still hits.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import providers_for
from tests.fake_provider import FakeProvider
from tests.harness import TOLLGATE, Gateway

pytestmark = pytest.mark.e2e


def tollgate(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOLLGATE, "cache", *args, "--config", str(gw.config_path)], capture_output=True,
                          text=True, timeout=60, env=gw.env)


def cached(c: openai.OpenAI, model: str, text: str) -> str:
    raw = c.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}])
    raw.parse()
    return raw.headers["x-tollgate-cache"]


def stored(c: openai.OpenAI, model: str, text: str) -> None:
    """Ask until the answer is a hit (the first answer is stored in the background)."""
    deadline = time.monotonic() + 5
    while (h := cached(c, model, text)) != "hit-exact":
        assert h == "miss" and time.monotonic() < deadline, h
        time.sleep(0.05)


def config(fake: FakeProvider, control: Path) -> dict[str, Any]:
    return {
        "providers": providers_for(fake),
        "models": {"chat": {"targets": [{"provider": "openai", "model": "gpt-4o"}]},
                   "other": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}},
        "cache": {"mode": "exact", "control_dir": str(control)},
    }


def test_clear_and_stats_reach_a_running_gateway_without_redis(gateway, fake_openai, tmp_path):
    control = tmp_path / "control"
    gw = gateway(config(fake_openai, control))
    c = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0, timeout=30)
    stored(c, "chat", "How do I reset my password?")
    stored(c, "chat", "How do I change my email?")
    stored(c, "other", "How do I reset my password?")
    sockets = list(control.glob("*.sock"))
    assert len(sockets) == 1 and oct(sockets[0].stat().st_mode & 0o777) == "0o600"

    stats = tollgate(gw, "stats")
    assert stats.returncode == 0, stats.stderr
    assert [line.split() for line in stats.stdout.splitlines()[1:]] == [["_default", "3"]]

    one_alias = tollgate(gw, "clear", "--namespace", "_default", "--alias", "chat")
    assert one_alias.returncode == 0, one_alias.stderr
    assert one_alias.stdout.strip() == "removed 2 entries of namespace _default, alias chat from 1 gateway process"
    assert cached(c, "chat", "How do I reset my password?") == "miss"
    assert cached(c, "other", "How do I reset my password?") == "hit-exact"  # not named: kept

    other_team = tollgate(gw, "clear", "--namespace", "research")
    assert other_team.returncode == 0 and "removed 0 entries" in other_team.stdout
    assert cached(c, "other", "How do I reset my password?") == "hit-exact"

    whole = tollgate(gw, "clear", "--namespace", "_default")
    assert whole.returncode == 0 and "removed " in whole.stdout
    assert cached(c, "other", "How do I reset my password?") == "miss"


def test_a_stopped_gateway_leaves_no_socket_and_the_command_says_none_answered(gateway, fake_openai, tmp_path):
    control = tmp_path / "control"
    gw = gateway(config(fake_openai, control))
    assert len(list(control.glob("*.sock"))) == 1
    gw.stop()
    assert list(control.glob("*.sock")) == []
    r = tollgate(gw, "clear", "--namespace", "_default")
    assert r.returncode == 1 and "no running gateway answered" in r.stderr and "Traceback" not in r.stderr


def test_without_a_gateway_ever_started_the_command_names_the_directory(tmp_path):
    cfg = tmp_path / "tollgate.yaml"
    cfg.write_text("providers: {demo: {type: demo}}\n"
                   "models: {demo: {targets: [{provider: demo, model: tollgate-demo-1}]}}\n"
                   f"cache: {{mode: exact, control_dir: '{tmp_path / 'nowhere'}'}}\n")
    r = subprocess.run([TOLLGATE, "cache", "clear", "--namespace", "ml", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and str(tmp_path / "nowhere") in r.stderr and "Traceback" not in r.stderr
