"""Cached entries in Redis, shared by every sidecar.

Keys (all under one hash tag, so Redis Cluster keeps them in one slot and a
put is one MULTI/EXEC)::

    {P:cache}:e:<id>      hash: scope, exact, prompt, vector (384 float32), answer, created, expires; PEXPIRE
    {P:cache}:x:<exact>   the id of the entry stored under that exact key; same expiry
    {P:cache}:ns:<ns>     sorted set of the namespace's ids by creation time (eviction, stats)
    {P:cache}:inserts     stream: per put with a vector, what an index needs (id, scope, prompt, vector,
                          expires; not the answer); per clear, the namespace and alias

Every sidecar tails the stream (XREAD BLOCK) into its FAISS index, so an
entry put by one is searchable on all within a poll (well under a second);
at start a sidecar replays the stream from the beginning. The stream is
capped (approximately) at ``stream_max`` records; an entry trimmed from it is
still served by exact key, and by similarity on sidecars that saw it.
Memory per entry in Redis: the vector (1,536 bytes) and the prompt twice (hash
and stream), the answer once, and a few hundred bytes of keys and bookkeeping
(``make bench`` measures it).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from extproc.cache.entry import Entry
from extproc.cache.keys import scope_parts
from extproc.cache.store import Clock, Insert


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisCacheStore:
    def __init__(self, client: aioredis.Redis, *, prefix: str = "tollgate", clock: Clock = time.time,
                 stream_max: int = 1_000_000, stream_client: aioredis.Redis | None = None) -> None:
        self.r = client  # the request path's: short timeouts
        self.tail = stream_client or client  # reads of the insert stream: blocking, and large at start
        self.k = f"{{{prefix}:cache}}"
        self.clock = clock
        self.stream_max = stream_max

    def _entry_key(self, entry_id: str) -> str:
        return f"{self.k}:e:{entry_id}"

    async def get_exact(self, exact: str) -> Entry | None:
        entry_id = await self.r.get(f"{self.k}:x:{exact}")
        return None if entry_id is None else await self.get(_s(entry_id))

    async def get(self, entry_id: str) -> Entry | None:
        raw = await self.r.hgetall(self._entry_key(entry_id))
        if not raw:
            return None
        e = Entry.from_fields(entry_id, raw)
        return e if e.expires > self.clock() else None

    async def put(self, entry: Entry, *, max_entries: int) -> list[str]:
        ns, _ = scope_parts(entry.scope)
        zkey = f"{self.k}:ns:{ns}"
        ttl_ms = max(1, int((entry.expires - self.clock()) * 1000))  # relative: Redis's clock may differ
        fields = entry.fields()
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self._entry_key(entry.id), mapping=fields)  # type: ignore[arg-type]  # str and bytes values
            p.pexpire(self._entry_key(entry.id), ttl_ms)
            p.set(f"{self.k}:x:{entry.exact}", entry.id, px=ttl_ms)
            p.zadd(zkey, {entry.id: entry.created})
            p.zremrangebyscore(zkey, "-inf", f"({self.clock() - 31 * 86400}")  # long expired ids
            if entry.vector is not None:  # an exact-only entry is found by its key; no index needs it
                p.xadd(f"{self.k}:inserts", {"id": entry.id, "scope": entry.scope, "prompt": entry.prompt,
                                             "vector": fields["vector"], "expires": fields["expires"]},
                       maxlen=self.stream_max, approximate=True)
            p.zcard(zkey)
            *_, size = await p.execute()
        if size <= max_entries:
            return []
        victims = [_s(v) for v in await self.r.zrange(zkey, 0, size - max_entries - 1)]
        if victims:
            async with self.r.pipeline(transaction=True) as p:
                p.zrem(zkey, *victims)
                p.delete(*[self._entry_key(v) for v in victims])
                await p.execute()
        return victims

    async def inserts(self, after: str, *, block_ms: int = 0) -> tuple[str, list[Insert | str]]:
        got: Any = await self.tail.xread({f"{self.k}:inserts": after}, count=5000, block=block_ms or None)
        out: list[Insert | str] = []
        last = after
        for _stream, records in got or []:
            for rid, d in records:
                last = rid
                if b"clear" in d:
                    out.append(f"clear:{_s(d[b'clear'])}")
                elif b"vector" in d:
                    out.append(Insert(_s(d[b"id"]), _s(d[b"scope"]), _s(d[b"prompt"]),
                                      np.frombuffer(d[b"vector"], dtype=np.float32), float(d[b"expires"])))
        return _s(last), out

    async def clear(self, namespace: str, alias: str | None = None) -> int:
        zkey = f"{self.k}:ns:{namespace}"
        ids = [_s(v) for v in await self.r.zrange(zkey, 0, -1)]
        victims = []
        for entry_id in ids:
            if alias is None:
                victims.append(entry_id)
                continue
            scope = await self.r.hget(self._entry_key(entry_id), "scope")
            if scope is None or scope_parts(_s(scope))[1] == alias:
                victims.append(entry_id)
        gone = 0
        for i in range(0, len(victims), 500):
            chunk = victims[i:i + 500]
            async with self.r.pipeline(transaction=True) as p:
                p.zrem(zkey, *chunk)
                p.delete(*[self._entry_key(v) for v in chunk])
                _, gone_now = await p.execute()
            gone += int(gone_now)
        await self.r.xadd(f"{self.k}:inserts", {"clear": f"{namespace}:{alias or ''}"},
                          maxlen=self.stream_max, approximate=True)
        return gone

    async def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        now = self.clock()
        async for key in self.r.scan_iter(match=f"{self.k}:ns:*", count=500):
            ns = _s(key).split(":ns:", 1)[1]
            ids = [_s(v) for v in await self.r.zrange(key, 0, -1)]
            live = 0
            for i in range(0, len(ids), 500):
                async with self.r.pipeline(transaction=False) as p:
                    for entry_id in ids[i:i + 500]:
                        p.hget(self._entry_key(entry_id), "expires")
                    live += sum(1 for v in await p.execute() if v is not None and float(_s(v)) > now)
            out[ns] = live
        return out

    async def close(self) -> None:
        await self.r.aclose()
        if self.tail is not self.r:
            await self.tail.aclose()
