"""`tollgate spend` sums the usage ledger the gateway writes, for chargeback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from extproc.cli import main
from extproc.quota.ledger import SqliteLedger, UsageRecord
from extproc.quota.memory_store import open_embedded
from tests.quota.conftest import UTC

CONFIG = """
providers: {openai: {type: openai, api_key: {env: OPENAI_API_KEY}}}
models:
  gpt-4o: {targets: [{provider: openai, model: gpt-4o}]}
  claude: {targets: [{provider: openai, model: gpt-4o-mini}]}
quota:
  ledger: {path: LEDGER}
  limits: {teams: {ml: {usd_per_day: 50}}}
"""


def record(rid: str, team: str, model: str, micro: int) -> UsageRecord:
    return UsageRecord(rid, "alice", team, "gpt-4o", "openai", model, 100, 20, 0, micro)


def test_spend_prints_a_teams_totals_by_model(tmp_path: Path, runner: asyncio.Runner,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ledger_path = tmp_path / "quota.sqlite3"
    config = tmp_path / "gw.yaml"
    config.write_text(CONFIG.replace("LEDGER", str(ledger_path)))
    store, _ = open_embedded(str(ledger_path), tz=UTC)  # the gateway, still running while spend reads
    ledger = SqliteLedger(ledger_path, writer=store.state_file)
    for r in (record("a", "ml", "gpt-4o", 1_250_000), record("b", "ml", "gpt-4o-mini", 40),
              record("c", "ml", "gpt-4o", 750_000), record("d", "research", "gpt-4o", 9_000_000)):
        runner.run(ledger.append(r))
    assert main(["spend", "--config", str(config), "--team", "ml", "--since", "24h", "--by", "model"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("spend of team ml since ") and out[0].endswith("(24h)")
    rows = {line.split()[0]: line.split()[1:] for line in out[2:]}
    assert rows["gpt-4o"] == ["2", "0", "200", "0", "40", "2.000000"]
    assert rows["gpt-4o-mini"] == ["1", "0", "100", "0", "20", "0.000040"]
    assert rows["total"] == ["3", "0", "300", "0", "60", "2.000040"]
    assert main(["spend", "--config", str(config), "--team", "ml", "--by", "model", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["groups"]["gpt-4o"]["micro_usd"] == 2_000_000 and doc["total"]["micro_usd"] == 2_000_040
    assert doc["total"]["requests"] == 3 and doc["by"] == "model"
    runner.run(store.close())
    assert main(["spend", "--config", str(config), "--team", "nobody"]) == 0
    assert "no requests recorded" in capsys.readouterr().out


def test_spend_refuses_a_config_without_quotas_and_a_bad_window(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text(CONFIG.split("quota:")[0])
    assert main(["spend", "--config", str(bare)]) == 2
    assert "has no quota section" in capsys.readouterr().err
    with_quota = tmp_path / "q.yaml"
    with_quota.write_text(CONFIG.replace("LEDGER", str(tmp_path / "u.jsonl")))
    assert main(["spend", "--config", str(with_quota), "--since", "yesterday"]) == 2
    assert "--since" in capsys.readouterr().err
