"""``tollgate``: run the gateway, render or check its Envoy config, manage the deny list, mint dev tokens."""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import tempfile

from extproc.auth.commands import add_parsers, deny_command, dev_token_command
from extproc.config import ConfigError, load_config
from extproc.guardrails import score as guardrails_score
from extproc.quota import commands as quota_commands


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tollgate", description="An AI gateway beside Envoy.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start Envoy and the ext_proc server")
    run.add_argument("--config", help="gateway config file (default: $TOLLGATE_CONFIG, else the embedded demo)")
    run.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get on shutdown")
    run.add_argument("--runtime-dir", help="where the rendered Envoy config and sockets go (default: a temp dir)")
    ext = sub.add_parser("extproc", help="start only the ext_proc server (Envoy runs elsewhere)")
    ext.add_argument("--config")
    ext.add_argument("--grace", type=float, default=10.0)
    ext.add_argument("--runtime-dir", help="where the demo backend's socket goes")
    render = sub.add_parser("render-envoy", help="print the Envoy bootstrap rendered from the config")
    render.add_argument("--config")
    render.add_argument("--demo-socket", default="/tmp/tollgate-demo.sock")
    check = sub.add_parser("validate", help="check the config and run `envoy --mode validate` on its rendering")
    check.add_argument("--config")
    inj = sub.add_parser("inject", help="add the Tollgate sidecar to Kubernetes workloads (like kube-inject)")
    inj.add_argument("-f", "--filename", required=True, help="manifest file, or - for standard input")
    inj.add_argument("--config", help="the gateway config the pods will run (checked for pod use)")
    inj.add_argument("--image", help="the Tollgate image (python + `pip install tollgate`)")
    inj.add_argument("--config-map", help="ConfigMap holding tollgate.yaml and envoy.yaml")
    inj.add_argument("--secret", help="Secret with the provider keys ('' for none)")
    inj.add_argument("--drain-seconds", type=int, help="longest wait for in-flight streams on shutdown")
    inj.add_argument("--native-sidecars", action="store_true", help="use init-container sidecars (Kubernetes 1.29+)")
    add_parsers(sub)
    quota_commands.add_parsers(sub)
    guardrails_score.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.command == "guardrails":  # its --config is optional and means "that config's policy"
        return guardrails_score.score_command(args)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"tollgate: {e}", file=sys.stderr)
        return 2
    if args.command == "render-envoy":
        from extproc.control.envoy_config import render_yaml

        sys.stdout.write(render_yaml(cfg, demo_socket=args.demo_socket))
        return 0
    if args.command == "validate":
        return _validate(cfg)
    if args.command == "deny":
        return deny_command(cfg, args)
    if args.command == "dev-token":
        return dev_token_command(cfg, args)
    if args.command == "spend":
        return quota_commands.spend_command(cfg, args)
    if args.command == "inject":
        return _inject(cfg, args)
    from extproc.telemetry.logs import setup_logging
    from extproc.control.supervisor import serve, use_uvloop

    listener = setup_logging()
    use_uvloop()
    with_envoy = args.command == "run"
    try:
        return asyncio.run(serve(cfg, grace=args.grace, runtime_dir=args.runtime_dir, with_envoy=with_envoy))
    except ConfigError as e:  # e.g. a JWKS file or dev key that cannot be read
        print(f"tollgate: {e}", file=sys.stderr)
        return 2
    finally:
        listener.stop()


def _inject(cfg, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from extproc.kube.inject import InjectError, InjectOptions, check_config, inject_yaml

    given = {
        "image": args.image,
        "config_map": args.config_map,
        "secret": (args.secret or None) if args.secret is not None else ...,
        "drain_seconds": args.drain_seconds,
        "native_sidecars": True if args.native_sidecars else None,
    }
    overrides = {k: v for k, v in given.items() if v is not None and v is not ...}
    if args.secret == "":
        overrides["secret"] = None
    try:
        text = sys.stdin.read() if args.filename == "-" else open(args.filename, encoding="utf-8").read()
        opts = InjectOptions.from_config(cfg, **overrides) if args.config else InjectOptions(**overrides)
        for problem in check_config(cfg, opts) if args.config else []:
            print(f"tollgate: warning: {problem}", file=sys.stderr)
        sys.stdout.write(inject_yaml(text, opts))
    except (InjectError, OSError) as e:
        print(f"tollgate: {e}", file=sys.stderr)
        return 2
    return 0


def _validate(cfg) -> int:  # type: ignore[no-untyped-def]
    from extproc.control.envoy_config import render, render_yaml, typed_check
    from extproc.control.supervisor import find_envoy

    try:
        typed_check(render(cfg, demo_socket="/tmp/tollgate-demo.sock"))
    except ValueError as e:
        print(f"tollgate: {e}", file=sys.stderr)
        return 1
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(render_yaml(cfg, demo_socket="/tmp/tollgate-demo.sock"))
        f.flush()
        r = subprocess.run([find_envoy(cfg), "--mode", "validate", "-c", f.name, "-l", "error"], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout + r.stderr, file=sys.stderr)
        return 1
    print(f"{cfg.source}: OK ({len(cfg.models)} models, {len(cfg.providers)} providers)")
    return 0
