"""Build the governor the config asks for: its store, its ledger, their connections.

Embedded (no Redis): the SQLite state file at ``quota.ledger.path`` (by
default ``$XDG_STATE_HOME/tollgate/quota.sqlite3``) holds budgets, buckets,
holds and the ledger; opening it turns the holds a killed process left open
into ``unknown`` ledger records. Redis: one client with a blocking pool,
shared by the store and the ledger, and the on-disk backlog
(``quota.ledger.pending``) for requests that finish while Redis is down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from extproc.quota.calendar import zone
from extproc.quota.governor import Governor
from extproc.quota.ledger import RedisLedger, SqliteLedger
from extproc.quota.memory_store import open_embedded
from extproc.quota.redis_store import RedisQuotaStore, connect
from extproc.quota.settings import QuotaSettings
from extproc.quota.spool import Spool
from extproc.quota.tokenizer import Tokenizer

log = logging.getLogger("tollgate.quota")


def build_governor(
    q: QuotaSettings, *, redis_url: str | None, redis_password: str | None = None,
    on_store_error: Callable[[str], None] | None = None, tokenizer: Tokenizer | None = None,
) -> Governor:
    tokenizer = tokenizer or Tokenizer()
    if q.store == "redis" and redis_url:
        client = connect(redis_url, password=redis_password, max_connections=q.redis_max_connections,
                         pool_wait=q.redis_pool_wait)
        store = RedisQuotaStore(client, tz=zone(q.time_zone), hash_tag=q.hash_tag)
        return Governor(q, store=store, ledger=RedisLedger(client, hash_tag=q.hash_tag, owns_client=False),
                        tokenizer=tokenizer, on_store_error=on_store_error,
                        spool=Spool(q.pending_path) if q.pending_path else None)
    path = q.ledger_path or "quota.sqlite3"
    embedded, recovered = open_embedded(path, tz=zone(q.time_zone))
    if recovered:
        log.warning("%d quota holds were open when the gateway last stopped (killed?): recorded as unknown in %s",
                    recovered, path)
    ledger = SqliteLedger(path, writer=embedded.state_file)
    return Governor(q, store=embedded, ledger=ledger, tokenizer=tokenizer, on_store_error=on_store_error)
