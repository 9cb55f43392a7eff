"""Telling running gateways to clear (or count) their cache when it lives in their own memory.

Without Redis each ext_proc process holds its entries itself, so ``tollgate
cache clear`` cannot reach them through a store. Each process that serves a
process-local cache listens on a Unix socket of its own in one directory
(``cache.control_dir``, default ``$XDG_STATE_HOME/tollgate/cache-control``),
named after its pid; the command asks every socket there. Why a Unix socket
and not a loopback port: the directory's permissions (0700, the gateway's
user) decide who may clear the cache, no port has to be chosen or can clash,
and several processes (a standby that took over, several ext_proc processes
per sidecar) each have their own socket without configuration.

The protocol is one JSON line each way: ``{"op": "clear", "namespace": N,
"alias": A|null}`` -> ``{"removed": n}``, ``{"op": "stats"}`` -> ``{"counts":
{namespace: n}}``; anything else gets ``{"error": "..."}``. A socket nobody
listens on (a process that died without removing it) is removed by the
command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("tollgate.cache")

MAX_LINE = 4096  # a request is a few dozen bytes
REPLY_TIMEOUT = 5.0


class Clearable(Protocol):
    async def clear(self, namespace: str, alias: str | None) -> int: ...

    async def counts(self) -> dict[str, int]: ...


class ControlError(Exception):
    """No gateway could be asked (no directory, no live socket)."""


class ControlServer:
    """This process's socket; ``close`` removes it."""

    def __init__(self, cache: Clearable, directory: str) -> None:
        self.cache = cache
        self.directory = Path(directory)
        self.path = self.directory / f"{os.getpid()}.sock"
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a pid reused after a crash
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
            reply = await self._answer(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, ValueError):
            pass  # a client that says nothing, goes away, or sends an over-long line gets no answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except ValueError:
            return {"error": "expected one JSON object on a line"}
        if not isinstance(req, dict):
            return {"error": "expected one JSON object on a line"}
        op = req.get("op")
        if op == "stats":
            return {"counts": await self.cache.counts()}
        if op != "clear":
            return {"error": "op: expected clear or stats"}
        ns, alias = req.get("namespace"), req.get("alias")
        if not isinstance(ns, str) or not ns or not (alias is None or isinstance(alias, str)):
            return {"error": "clear needs a namespace (a string) and optionally an alias (a string)"}
        removed = await self.cache.clear(ns, alias or None)
        log.info("cache: cleared %d entries of namespace %s%s (asked on the control socket)", removed, ns,
                 f", alias {alias}" if alias else "")
        return {"removed": removed}


@dataclass
class Replies:
    """What the gateways said: one reply per process that answered."""

    answers: list[dict[str, Any]] = field(default_factory=list)
    stale: int = 0  # sockets of processes that are gone (removed)
    failed: list[str] = field(default_factory=list)  # sockets that answered badly or not in time


async def _ask_one(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=1 << 20), REPLY_TIMEOUT)
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    reply = json.loads(line)
    if not isinstance(reply, dict) or "error" in reply:
        raise ValueError(reply.get("error") if isinstance(reply, dict) else "not a JSON object")
    return reply


async def ask_all(directory: str, request: dict[str, Any]) -> Replies:
    """Send ``request`` to every gateway process with a socket in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        raise ControlError(f"no running gateway keeps its cache here: {directory} does not exist")
    out = Replies()
    for path in sorted(d.glob("*.sock")):
        try:
            out.answers.append(await _ask_one(path, request))
        except (ConnectionRefusedError, FileNotFoundError):
            out.stale += 1
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            out.failed.append(f"{path.name}: {type(e).__name__}: {e}")
    if not out.answers and not out.failed:
        raise ControlError(f"no running gateway answered in {directory}")
    return out
