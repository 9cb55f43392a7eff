"""A hit's ledger record: cost 0, and what it saved, summed by `tollgate spend`."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from extproc.quota.ledger import SqliteLedger, UsageRecord, format_totals, totals
from extproc.quota.memory_store import open_embedded


def record(rid: str, status: str, *, micro: int = 0, saved_tokens: int = 0, saved: int = 0) -> UsageRecord:
    return UsageRecord(rid, "alice", "ml", "chat", "cache" if status.startswith("hit") else "openai", "gpt-4o",
                       0 if saved else 30, 0 if saved else 12, 0, micro, status, saved_tokens=saved_tokens,
                       saved_micro_usd=saved)


async def test_spend_sums_what_hits_saved_and_keeps_their_cost_at_zero(tmp_path):
    path = tmp_path / "quota.sqlite3"
    store, _ = open_embedded(str(path), tz=ZoneInfo("UTC"))  # the embedded store writes its ledger
    ledger = SqliteLedger(path, writer=store.state_file)
    await ledger.append(record("r1", "miss", micro=195))
    await ledger.append(record("r2", "hit_exact", saved_tokens=42, saved=195))
    await ledger.append(record("r3", "hit_semantic", saved_tokens=42, saved=195))
    await store.close()
    reread = SqliteLedger(path)  # what `tollgate spend` opens
    by_status = await totals(reread, since=0, by="cache_status")
    assert by_status["hit_exact"].micro_usd == 0 and by_status["hit_exact"].saved_micro_usd == 195
    everything = (await totals(reread, since=0))["total"]
    assert (everything.micro_usd, everything.saved_tokens, everything.saved_micro_usd) == (195, 84, 390)
    assert format_totals(by_status, "cache_status").splitlines()[-1] == "saved by the cache: 84 tokens, 0.000390 USD"
