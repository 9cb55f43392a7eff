"""Where the deny list is kept: Redis (shared by every sidecar) or a local file (one machine).

Both stores expose a cheap ``version`` that changes with every edit, so a
sidecar can poll it several times a second and read the entries only when
something changed. In Redis the entries are one hash and the version one
counter, both under the ``{deny}`` hash tag so they live in one Redis Cluster
slot and change together in one MULTI.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

KINDS = ("principal", "jti")


class StoreUnavailable(Exception):
    """The store could not be read or written."""


@dataclass(frozen=True, slots=True)
class DenyEntry:
    kind: str  # principal | jti
    value: str
    reason: str = ""
    added_at: float = 0.0  # epoch seconds
    until: float | None = None  # epoch seconds; None: until removed

    @property
    def field(self) -> str:
        return f"{self.kind}:{self.value}"

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until

    @staticmethod
    def from_json(text: str | bytes) -> DenyEntry | None:
        try:
            d = json.loads(text)
            entry = DenyEntry(kind=str(d["kind"]), value=str(d["value"]), reason=str(d.get("reason") or ""),
                              added_at=float(d.get("added_at") or 0.0),
                              until=float(d["until"]) if d.get("until") is not None else None)
        except (ValueError, KeyError, TypeError):
            return None
        return entry if entry.kind in KINDS and entry.value else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


class DenyStore(Protocol):
    label: str

    async def version(self) -> str: ...

    async def entries(self) -> list[DenyEntry]: ...

    async def add(self, entry: DenyEntry) -> None: ...

    async def remove(self, kind: str, value: str) -> bool: ...

    async def close(self) -> None: ...


class RedisDenyStore:
    def __init__(self, url: str, *, password: str | None = None, prefix: str = "tollgate") -> None:
        self.label = "redis"
        self._r = aioredis.Redis.from_url(
            url, password=password or None, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True
        )
        self._entries_key = f"{prefix}:{{deny}}:entries"
        self._version_key = f"{prefix}:{{deny}}:version"

    async def version(self) -> str:
        try:
            return str(await self._r.get(self._version_key) or "0")
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}") from None

    async def entries(self) -> list[DenyEntry]:
        try:
            raw = await self._r.hgetall(self._entries_key)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}") from None
        return [e for e in map(DenyEntry.from_json, raw.values()) if e is not None]

    async def add(self, entry: DenyEntry) -> None:
        await self._change(lambda p: p.hset(self._entries_key, entry.field, entry.to_json()))

    async def remove(self, kind: str, value: str) -> bool:
        return bool(await self._change(lambda p: p.hdel(self._entries_key, f"{kind}:{value}")))

    async def _change(self, edit) -> int:  # type: ignore[no-untyped-def]
        try:
            async with self._r.pipeline(transaction=True) as p:
                edit(p)
                p.incr(self._version_key)
                result = await p.execute()
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}") from None
        return int(result[0])

    async def close(self) -> None:
        await self._r.aclose()


class FileDenyStore:
    """A JSON file, replaced atomically on every edit; edits are serialised with a lock file."""

    def __init__(self, path: str) -> None:
        self.label = "file"
        self.path = path

    async def version(self) -> str:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "absent"
        except OSError as e:
            raise StoreUnavailable(f"{self.path}: {e.strerror}") from None
        return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"

    async def entries(self) -> list[DenyEntry]:
        return self._read()

    def _read(self) -> list[DenyEntry]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise StoreUnavailable(f"{self.path}: {getattr(e, 'strerror', None) or 'not valid JSON'}") from None
        items = data.get("entries", []) if isinstance(data, dict) else []
        return [e for e in (DenyEntry.from_json(json.dumps(x)) for x in items) if e is not None]

    def _write(self, entries: list[DenyEntry]) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"entries": [asdict(e) for e in entries]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    async def add(self, entry: DenyEntry) -> None:
        with self._locked():
            kept = [e for e in self._read() if e.field != entry.field]
            self._write([*kept, entry])

    async def remove(self, kind: str, value: str) -> bool:
        with self._locked():
            entries = self._read()
            kept = [e for e in entries if e.field != f"{kind}:{value}"]
            if len(kept) != len(entries):
                self._write(kept)
            return len(kept) != len(entries)

    async def close(self) -> None:
        return None


def new_entry(kind: str, value: str, reason: str = "", duration: float | None = None) -> DenyEntry:
    now = time.time()
    return DenyEntry(kind=kind, value=value, reason=reason, added_at=now, until=now + duration if duration else None)
