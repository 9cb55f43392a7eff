"""Finished requests whose settlement or ledger record waits for the quota store, kept on disk.

The governor keeps such requests in memory and replays them when Redis
answers again; this file makes that backlog outlive the process. An entry
is written only during an outage, never on the normal path: when a store
call fails, and when a request is admitted locally under ``fail_open`` (at
once, at what its hold would charge, outcome ``unknown``; its ``owner`` is
the admitting process, and the entry is replaced by the real record when
the request finishes). It is deleted once its replay went through, so after
a SIGKILL or a stop during a Redis outage the next gateway on the machine
finds what was served and not yet charged, and charges it. An admission
whose owner still runs is left to that process. Every replay is idempotent by
request id (``settle`` and ``charge`` remember the ids they closed), so an
entry replayed twice, by two processes sharing the file, counts once.

One SQLite table in WAL mode, one short transaction per change: a few
hundred microseconds each, paid only while the store is down.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from dataclasses import asdict
from typing import Any, Literal

from extproc.quota.limits import Budget, Reservation, ScopeLimits, TokenBucket
from extproc.quota.records import UsageRecord

log = logging.getLogger("tollgate.quota")

Kind = Literal["append", "settle", "charge"]
# append: nothing was held, the record alone goes to the ledger
# settle: a hold in the shared store, settled at what was used with its record
# charge: admitted locally during an outage (fail_open), charged to the shared store with its record


class Pending:
    """One finished request's outstanding store work, as the spool keeps it."""

    __slots__ = ("kind", "owner", "record", "reservation", "scopes")

    def __init__(self, kind: Kind, record: UsageRecord, reservation: Reservation,
                 scopes: tuple[ScopeLimits, ...], owner: int = 0) -> None:
        self.kind = kind
        self.record = record
        self.reservation = reservation
        self.scopes = scopes
        self.owner = owner  # the pid of the process whose request is still running (0: a finished request)

    def to_json(self) -> str:
        r = self.reservation
        return json.dumps({
            "kind": self.kind,
            "owner": self.owner,
            "record": asdict(self.record),
            "scopes": [asdict(s) for s in self.scopes],
            "reservation": {
                "id": r.id, "scopes": [asdict(s) for s in r.scopes], "windows": list(r.windows),
                "tokens": r.tokens, "micro_usd": r.micro_usd, "lease_deadline": r.lease_deadline},
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> Pending:
        d = json.loads(raw)
        r = d["reservation"]
        reservation = Reservation(
            str(r["id"]), tuple(_scope_in(s) for s in r["scopes"]), tuple(int(w) for w in r["windows"]),
            int(r["tokens"]), int(r["micro_usd"]), float(r["lease_deadline"]))
        kind = d["kind"]
        if kind not in ("append", "settle", "charge"):
            raise ValueError(f"unknown pending kind {kind!r}")
        return cls(kind, UsageRecord(**d["record"]), reservation, tuple(_scope_in(s) for s in d["scopes"]),
                   int(d.get("owner", 0)))

    def owned_by_another_live_process(self) -> bool:
        """A request still running in another process on this machine (a sibling worker): not ours to charge."""
        if not self.owner or self.owner == os.getpid():
            return False
        try:
            os.kill(self.owner, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # it exists, under another user
        return True


class Spool:
    """The on-disk copy of the governor's backlog (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS pending (request_id TEXT PRIMARY KEY, item TEXT NOT NULL)")
        self._lock = threading.Lock()

    def put(self, item: Pending) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO pending VALUES (?, ?)", (item.record.request_id, item.to_json()))

    def drop(self, request_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM pending WHERE request_id = ?", (request_id,))

    def load(self) -> list[Pending]:
        """Everything kept, oldest first; an entry that no longer reads is logged and left out."""
        items: list[Pending] = []
        with self._lock:
            rows = self._db.execute("SELECT request_id, item FROM pending ORDER BY rowid").fetchall()
        for rid, raw in rows:
            try:
                items.append(Pending.from_json(raw))
            except (ValueError, KeyError, TypeError) as e:
                log.error("pending quota entry for request %s cannot be read, left in %s: %s", rid, self.path, e)
        return items

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _bucket_in(d: dict[str, Any] | None) -> TokenBucket | None:
    return None if d is None else TokenBucket(int(d["per_minute"]), int(d["burst"]))


def _scope_in(d: dict[str, Any]) -> ScopeLimits:
    return ScopeLimits(str(d["scope"]), _bucket_in(d.get("bucket")),
                       tuple(Budget(b["period"], int(b["limit_micro_usd"])) for b in d.get("budgets", ())),
                       _bucket_in(d.get("requests")))
