from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_provider import FakeProvider
from tests.harness import Gateway
from tests.helpers import ANTHROPIC_KEY, AZURE_KEY, KEYS, OPENAI_KEY, providers_for

__all__ = ["ANTHROPIC_KEY", "AZURE_KEY", "KEYS", "OPENAI_KEY", "providers_for"]  # older imports still work


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """The one async test runner: an ``async def`` test runs on a fresh event loop of its own.

    A test (or its fixtures) that asks for ``runner`` shares that loop, so clients
    opened by a fixture are used and closed on the loop that made them.
    """
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {n: pyfuncitem.funcargs[n] for n in pyfuncitem._fixtureinfo.argnames}
    shared: asyncio.Runner | None = pyfuncitem.funcargs.get("runner")
    if shared is not None:
        shared.run(pyfuncitem.obj(**args))
    else:
        with asyncio.Runner() as own:
            own.run(pyfuncitem.obj(**args))
    return True


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """An event loop for a test and its fixtures (see ``pytest_pyfunc_call``)."""
    with asyncio.Runner() as r:
        yield r


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
    for g in started:
        g.stop()
