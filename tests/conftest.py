from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_provider import FakeProvider
from tests.harness import Gateway

OPENAI_KEY = "sk-canary-openai-7f3a9c"
AZURE_KEY = "azure-canary-key-51b2e8"
ANTHROPIC_KEY = "sk-ant-canary-d04c61"
KEYS = {"OPENAI_KEY": OPENAI_KEY, "AZURE_KEY": AZURE_KEY, "ANTHROPIC_KEY": ANTHROPIC_KEY}


@pytest.fixture
def fake_openai() -> Iterator[FakeProvider]:
    with FakeProvider("openai", api_key=OPENAI_KEY) as f:
        yield f


@pytest.fixture
def fake_azure() -> Iterator[FakeProvider]:
    with FakeProvider("azure", api_key=AZURE_KEY) as f:
        yield f


@pytest.fixture
def fake_anthropic() -> Iterator[FakeProvider]:
    with FakeProvider("anthropic", api_key=ANTHROPIC_KEY) as f:
        yield f


def providers_for(openai: FakeProvider | None = None, azure: FakeProvider | None = None,
                  anthropic: FakeProvider | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if openai:
        p["openai"] = {"type": "openai", "base_url": openai.base_url + "/v1", "api_key": {"env": "OPENAI_KEY"}}
    if azure:
        p["azure"] = {"type": "azure_openai", "base_url": azure.base_url, "api_version": "2024-10-21",
                      "api_key": {"env": "AZURE_KEY"}}
    if anthropic:
        p["anthropic"] = {"type": "anthropic", "base_url": anthropic.base_url, "api_key": {"env": "ANTHROPIC_KEY"}}
    return p


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start a gateway with the given config dict; stopped (and checked) at teardown."""
    started: list[Gateway] = []

    def start(config: dict[str, Any], *, split: bool = False, env: dict[str, str] | None = None) -> Gateway:
        d = tmp_path / f"gw{len(started)}"
        d.mkdir()
        state = {"XDG_STATE_HOME": str(d / "state")}  # the usage ledger and deny-list files stay in the test
        g = Gateway(d, config, env={**KEYS, **state, **(env or {})}, split=split)
        started.append(g)
        return g.start()

    yield start
    problems = []
    for g in started:
        g.stop()
        problems.extend(g.problems())
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
