"""``tollgate spend``: what was spent, summed from the usage ledger, for chargeback."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime

from extproc.config import GatewayConfig, environment
from extproc.credentials.secrets import redis_password
from extproc.quota.ledger import GROUPS, Totals, format_totals, open_ledger, parse_since, totals, totals_json
from extproc.quota.store import QuotaUnavailable


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("spend", help="tokens and money spent, from the usage ledger (by team, model, ...)")
    p.add_argument("--config")
    p.add_argument("--team", help="only this team")
    p.add_argument("--principal", help="only this principal")
    p.add_argument("--since", default="24h", help="how far back: 90m, 24h, 7d (default 24h)")
    p.add_argument("--by", choices=GROUPS, help="one line per model, team, principal, alias, provider or cache status")
    p.add_argument("--json", action="store_true", help="print the sums as JSON (money in integer micro-dollars)")


def spend_command(cfg: GatewayConfig, args: argparse.Namespace) -> int:
    if cfg.quota is None:
        print(f"tollgate: {cfg.source} has no quota section, so nothing is recorded", file=sys.stderr)
        return 2
    try:
        window = parse_since(args.since)
    except ValueError as e:
        print(f"tollgate: --since: {e}", file=sys.stderr)
        return 2
    try:
        groups = asyncio.run(_spend(cfg, environment(), args, time.time() - window))
    except (QuotaUnavailable, OSError) as e:
        print(f"tollgate: the usage ledger cannot be read: {e}", file=sys.stderr)
        return 1
    start = datetime.fromtimestamp(time.time() - window, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.json:
        print(json.dumps({"since": start, "team": args.team, "principal": args.principal,
                          **totals_json(groups, args.by)}, indent=2))
        return 0
    who = " ".join(f"{k} {v}" for k, v in (("team", args.team), ("principal", args.principal)) if v) or "everyone"
    print(f"spend of {who} since {start} ({args.since})")
    print(format_totals(groups, args.by) if groups else "no requests recorded")
    return 0


async def _spend(cfg: GatewayConfig, env: dict[str, str], args: argparse.Namespace, since: float) -> dict[str, Totals]:
    assert cfg.quota is not None
    ledger = open_ledger(cfg.quota, password=redis_password(cfg.redis, env))
    try:
        return await totals(ledger, since=since, team=args.team, principal=args.principal, by=args.by)
    except Exception as e:  # redis-py raises its own errors from a read
        if isinstance(e, (QuotaUnavailable, OSError)):
            raise
        raise QuotaUnavailable(str(e)) from e
    finally:
        await ledger.close()
