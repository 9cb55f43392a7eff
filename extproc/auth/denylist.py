"""The deny list every request consults: a local snapshot, kept in step with the store.

Requests never wait on the store: they look the principal and the token's
``jti`` up in two dicts. A background task polls the store's version every
``poll_interval`` (0.25 s by default) and reloads the entries when it moved, so
``tollgate deny add`` reaches every sidecar sharing the store well within a
second; every 30 s it reloads regardless.

When the store cannot be read, ``auth.deny_list.on_redis_down`` decides:
``last_known`` keeps serving with the last list read (logged once per
outage), ``refuse`` answers 503 once the list is older than three polls (and
at least 2 s), failing closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from extproc.auth.deny_store import DenyEntry, DenyStore, StoreUnavailable
from extproc.auth.identity import Identity
from extproc.errors import Forbidden, GatewayError, Unauthenticated, Unavailable

log = logging.getLogger("tollgate.auth")

FULL_RELOAD_SECONDS = 30.0


class DenyList:
    """One snapshot of the deny list."""

    def __init__(self, entries: Iterable[DenyEntry] = ()) -> None:
        self.principals: dict[str, DenyEntry] = {}
        self.jtis: dict[str, DenyEntry] = {}
        for e in entries:
            (self.principals if e.kind == "principal" else self.jtis)[e.value] = e

    def __len__(self) -> int:
        return len(self.principals) + len(self.jtis)

    def refusal(self, ident: Identity, now: float) -> GatewayError | None:
        """Why ``ident`` is refused, or None; ``now`` is epoch seconds."""
        e = self.principals.get(ident.principal)
        if e is not None and e.active(now):
            return Forbidden("access for this principal has been revoked", code="principal_denied")
        if ident.jti is not None:
            e = self.jtis.get(ident.jti)
            if e is not None and e.active(now):
                return Unauthenticated("token has been revoked", code="token_revoked")
        return None


class DenyListSync:
    def __init__(self, store: DenyStore, *, poll_interval: float = 0.25, refuse_when_stale: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.snapshot = DenyList()
        self.poll_interval = poll_interval
        self._refuse_when_stale = refuse_when_stale
        self._stale_after = max(3 * poll_interval, 2.0)
        self._clock = clock
        self._version: str | None = None
        self._loaded_at = float("-inf")
        self._ok_at = float("-inf")
        self._down = False
        self._task: asyncio.Task[None] | None = None

    def refusal(self, ident: Identity, now: float) -> GatewayError | None:
        if self._refuse_when_stale and self._clock() - self._ok_at > self._stale_after:
            return Unavailable("the deny list cannot be checked right now", code="deny_list_unavailable",
                               headers={"retry-after": "1"})
        return self.snapshot.refusal(ident, now)

    async def sync(self) -> bool:
        """Read the store if it changed; False when it could not be read."""
        now = self._clock()
        try:
            version = await self.store.version()
            if version != self._version or now - self._loaded_at >= FULL_RELOAD_SECONDS:
                entries = await self.store.entries()
                self.snapshot = DenyList(entries)
                self._version, self._loaded_at = version, now
        except StoreUnavailable as e:
            if not self._down:
                self._down = True
                action = "refusing requests" if self._refuse_when_stale else "keeping the last list read"
                log.error("deny list (%s) unavailable: %s; %s", self.store.label, e, action)
            return False
        if self._down:
            self._down = False
            log.warning("deny list (%s) reachable again (%d entries)", self.store.label, len(self.snapshot))
        self._ok_at = now
        return True

    async def start(self) -> None:
        if self._task is not None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.sync(), 2.0)
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await asyncio.wait_for(self.sync(), max(self.poll_interval * 4, 1.0))
            except asyncio.TimeoutError:
                log.warning("deny list (%s): a poll timed out", self.store.label)
            except Exception:  # keep polling whatever happened; a silent stop would freeze the list
                log.exception("deny list (%s): poll failed", self.store.label)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.store.close()
