"""The auth subcommands of ``tollgate``: ``deny add|remove|list`` and ``dev-token``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from extproc.auth.build import deny_store
from extproc.auth.deny_store import DenyEntry, StoreUnavailable, new_entry
from extproc.auth.devtoken import mint_dev_token
from extproc.config import GatewayConfig, parse_duration

def duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds is None or seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90s, 30m, 12h or 7d, not {text!r}")
    return seconds


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    deny = sub.add_parser("deny", help="cut off a principal or one token now, on every sidecar (deny list)")
    actions = deny.add_subparsers(dest="action", required=True)
    for name, text in (("add", "deny a principal or a token id"), ("remove", "lift a denial")):
        p = actions.add_parser(name, help=text)
        p.add_argument("--config")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--principal", help="the principal, as the gateway maps it (e.g. the sub or email claim)")
        who.add_argument("--jti", help="one token's jti claim")
        if name == "add":
            p.add_argument("--reason", default="", help="why (shown by `deny list` and in logs)")
            p.add_argument("--for", dest="duration", type=duration, help="lift it automatically after this long")
    listing = actions.add_parser("list", help="show the deny list")
    listing.add_argument("--config")
    listing.add_argument("--json", action="store_true")
    dev = sub.add_parser("dev-token", help="mint a token signed by the local dev key (a dev issuer must be configured)")
    dev.add_argument("--config")
    dev.add_argument("--sub", required=True, help="the principal")
    dev.add_argument("--team", help="put this team into the issuer's team claim")
    dev.add_argument("--tier", help="put this tier into the issuer's tier claim")
    dev.add_argument("--ttl", type=duration, default=3600.0, help="lifetime (default 1h)")
    dev.add_argument("--issuer", help="which dev issuer, when the config lists several")


def deny_command(cfg: GatewayConfig, args: argparse.Namespace, redis_password: str | None = None) -> int:
    try:
        return asyncio.run(_deny(cfg, args, redis_password))
    except StoreUnavailable as e:
        print(f"tollgate: deny list unavailable: {e}", file=sys.stderr)
        return 1


async def _deny(cfg: GatewayConfig, args: argparse.Namespace, redis_password: str | None) -> int:
    store = deny_store(cfg, redis_password)
    where = f"redis {cfg.redis.url.split('@')[-1]}" if cfg.redis else f"file {cfg.auth.deny_list.file}"
    try:
        if args.action == "list":
            _print_entries(await store.entries(), as_json=args.json)
            return 0
        kind, value = ("principal", args.principal) if args.principal is not None else ("jti", args.jti)
        if not value:
            print("tollgate: the value must not be empty", file=sys.stderr)
            return 2
        if args.action == "add":
            await store.add(new_entry(kind, value, args.reason, args.duration))
            print(f"denied {kind} {value!r} ({where}; sidecars apply it within "
                  f"{cfg.auth.deny_list.poll_interval:g} s)")
            return 0
        if await store.remove(kind, value):
            print(f"lifted the denial of {kind} {value!r} ({where})")
            return 0
        print(f"{kind} {value!r} was not denied ({where})", file=sys.stderr)
        return 1
    finally:
        await store.close()


def _print_entries(entries: list[DenyEntry], *, as_json: bool) -> None:
    entries = sorted(entries, key=lambda e: (e.kind, e.value))
    if as_json:
        print(json.dumps([{"kind": e.kind, "value": e.value, "reason": e.reason, "added_at": e.added_at,
                           "until": e.until} for e in entries], indent=1))
        return
    now = time.time()
    print(f"{'KIND':<10} {'VALUE':<40} {'UNTIL':<22} REASON")
    for e in entries:
        until = "-" if e.until is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(e.until))
        if not e.active(now):
            until += " (over)"
        print(f"{e.kind:<10} {e.value:<40} {until:<22} {e.reason}")


def dev_token_command(cfg: GatewayConfig, args: argparse.Namespace) -> int:
    devs = [i for i in cfg.auth.issuers if i.dev_key_file and (args.issuer is None or i.issuer == args.issuer)]
    if not devs:
        print(f"tollgate: {cfg.source} trusts no dev issuer; add one to auth.issuers "
              "(issuer: tollgate-dev, audience: tollgate, dev_key_file: ~/.config/tollgate/dev-key.pem)",
              file=sys.stderr)
        return 2
    try:
        token = mint_dev_token(devs[0], sub=args.sub, team=args.team, tier=args.tier, ttl=args.ttl)
    except (ValueError, OSError) as e:
        print(f"tollgate: {e}", file=sys.stderr)
        return 2
    if cfg.auth.mode != "jwt":
        print("tollgate: note: auth.mode is not jwt in this config, so the gateway will not ask for the token",
              file=sys.stderr)
    print(token)
    return 0
