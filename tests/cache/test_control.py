"""The control socket: a process-local cache cleared or counted by a separate command.

A real ``CacheStage`` over the in-process store listens with ``ControlServer``;
``ask_all`` is what ``tollgate cache clear|stats`` sends. The end-to-end spec
through a running gateway is tests/test_e2e_cache_control.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import numpy as np
import pytest

from extproc.cache.control import ControlError, ControlServer, ask_all
from extproc.cache.entry import Answer
from extproc.cache.keys import Plan, plan
from extproc.cache.metrics import CacheMetrics
from extproc.cache.settings import CacheSettings
from extproc.cache.stage import CacheStage
from extproc.cache.store import MemoryCacheStore

ANSWER = Answer("Open Settings, then Security, then Reset.", "gpt-4o", 12, 9, 120)


def planned(text: str, team: str, alias: str = "chat") -> Plan:
    p = plan({"messages": [{"role": "user", "content": text}]}, alias=alias, namespace=team)
    assert isinstance(p, Plan)
    return p


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


def stage() -> CacheStage:
    return CacheStage(CacheSettings(), MemoryCacheStore(), CacheMetrics(None), pool=None,
                      spawn=asyncio.get_running_loop().create_task)


async def test_a_clear_on_the_socket_empties_the_store_and_the_semantic_index_of_what_it_names(tmp_path: Path):
    s = stage()
    for i, (team, alias) in enumerate((("ml", "chat"), ("ml", "chat"), ("ml", "other"), ("research", "chat"))):
        await s.cache.insert(planned(f"question {i}", team, alias), unit(i), ANSWER, ttl=60, max_entries=10)
    server = ControlServer(s, str(tmp_path / "ctl"))
    await server.start()
    try:
        assert (await ask_all(str(tmp_path / "ctl"), {"op": "stats"})).answers == [{"counts": {"ml": 3,
                                                                                              "research": 1}}]
        cleared = await ask_all(str(tmp_path / "ctl"), {"op": "clear", "namespace": "ml", "alias": "chat"})
        assert cleared.answers == [{"removed": 2}] and cleared.stale == 0 and cleared.failed == []
        # the vector of a cleared entry no longer proposes it, the others still do
        gone = await s.cache.nearest(planned("question 0", "ml"), unit(0), 0.95)
        assert gone.result == "miss" and gone.reason == "no_candidate"
        kept = await s.cache.nearest(planned("question 2", "ml", "other"), unit(2), 0.95)
        assert kept.result == "hit_semantic"
        assert s.cache.index.counts() == {"ml": 1, "research": 1}
    finally:
        await server.close()
    assert not (tmp_path / "ctl" / server.path.name).exists()


async def test_bad_requests_get_a_clear_error_and_change_nothing(tmp_path: Path):
    s = stage()
    await s.cache.insert(planned("question", "ml"), unit(1), ANSWER, ttl=60, max_entries=10)
    server = ControlServer(s, str(tmp_path))
    await server.start()
    try:
        for line, error in ((b"not json\n", "expected one JSON object"), (b"[1]\n", "expected one JSON object"),
                            (b'{"op": "drop"}\n', "op: expected clear or stats"),
                            (b'{"op": "clear"}\n', "clear needs a namespace"),
                            (b'{"op": "clear", "namespace": "ml", "alias": 3}\n', "clear needs a namespace")):
            reader, writer = await asyncio.open_unix_connection(str(server.path))
            writer.write(line)
            await writer.drain()
            assert error in json.loads(await reader.readline())["error"], line
            writer.close()
        assert await s.counts() == {"ml": 1}
    finally:
        await server.close()


async def test_a_socket_left_by_a_dead_process_is_removed_and_reported_as_no_gateway(tmp_path: Path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "4242.sock"))  # bound, never listening: what a killed process leaves
    dead.close()
    with pytest.raises(ControlError, match="no running gateway answered"):
        await ask_all(str(tmp_path), {"op": "stats"})
    assert list(tmp_path.glob("*.sock")) == []
    with pytest.raises(ControlError, match="does not exist"):
        await ask_all(str(tmp_path / "missing"), {"op": "stats"})
