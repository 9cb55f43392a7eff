"""``tollgate``: run the gateway, render or check its Envoy config, manage the deny list, mint dev tokens."""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import tempfile

from extproc.auth.commands import add_parsers, deny_command, dev_token_command
from extproc.cache import commands as cache_commands
from extproc.config import ConfigError, load_config
from extproc.guardrails import score as guardrails_score
from extproc.kube import commands as kube_commands
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
    ext.add_argument("--worker", type=int, default=0,
                     help="serve as worker N of extproc.workers (on that worker's address; default 0)")
    ext.add_argument("--standby", action="store_true",
                     help="start up, then wait for a line on standard input before serving (the supervisor's spare)")
    render = sub.add_parser("render-envoy", help="print the Envoy bootstrap rendered from the config")
    render.add_argument("--config")
    render.add_argument("--demo-socket", default="/tmp/tollgate-demo.sock")
    check = sub.add_parser("validate", help="check the config and run `envoy --mode validate` on its rendering")
    check.add_argument("--config")
    inj = sub.add_parser("inject", help="add the Tollgate sidecar to Kubernetes workloads (like kube-inject)")
    inj.add_argument("-f", "--filename", required=True, help="manifest file, or - for standard input")
    kube_commands.add_option_args(inj)
    inj.add_argument("--native-sidecars", action="store_true", help="use init-container sidecars (Kubernetes 1.29+)")
    mesh = sub.add_parser("render-mesh", help="print Tollgate's config for a mesh's Envoy (Istio, Envoy Gateway)")
    mesh.add_argument("--config")
    mesh.add_argument("--mesh", choices=("istio", "envoy-gateway"), default="istio")
    mesh.add_argument("--name", default="tollgate")
    mesh.add_argument("--namespace", default="default")
    mesh.add_argument("--selector", default="", help="istio: labels of the workloads to change, e.g. app=web")
    mesh.add_argument("--route", default="", help="envoy-gateway: the HTTPRoute the policy attaches to")
    add_parsers(sub)
    quota_commands.add_parsers(sub)
    guardrails_score.add_parsers(sub)
    kube_commands.add_parsers(sub)
    cache_commands.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    own = {  # commands that read no gateway config (the score command's --config is optional: that config's policy)
        "guardrails": guardrails_score.score_command,
        "injector-certs": kube_commands.certs_command,
    }.get(args.command)
    if own is not None:
        return own(args)
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
        from extproc.config import environment
        from extproc.credentials.secrets import redis_password

        return deny_command(cfg, args, redis_password(cfg.redis, environment()))
    simple = {"dev-token": dev_token_command, "spend": quota_commands.spend_command,
              "cache": cache_commands.cache_command}  # commands that take the config and their arguments
    if args.command in simple:
        return simple[args.command](cfg, args)
    if args.command == "inject":
        return _inject(cfg, args)
    if args.command == "injector":
        return kube_commands.injector_command(cfg, args)
    if args.command == "render-mesh":
        return _render_mesh(cfg, args)
    from extproc.telemetry.logs import setup_logging
    from extproc.control.supervisor import serve, use_uvloop

    listener = setup_logging()
    use_uvloop()
    with_envoy = args.command == "run"
    try:
        return asyncio.run(serve(cfg, grace=args.grace, runtime_dir=args.runtime_dir, with_envoy=with_envoy,
                                 config_path=args.config, standby=getattr(args, "standby", False),
                                 worker=getattr(args, "worker", 0)))
    except ConfigError as e:  # e.g. a JWKS file or dev key that cannot be read
        print(f"tollgate: {e}", file=sys.stderr)
        return 2
    finally:
        listener.stop()


def _inject(cfg, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from extproc.kube.inject import InjectError, inject_yaml

    try:
        text = sys.stdin.read() if args.filename == "-" else open(args.filename, encoding="utf-8").read()
        native = {"native_sidecars": True} if args.native_sidecars else {}
        sys.stdout.write(inject_yaml(text, kube_commands.options_from_args(cfg, args, **native)))
    except (InjectError, OSError) as e:
        print(f"tollgate: {e}", file=sys.stderr)
        return 2
    return 0


def _render_mesh(cfg, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from extproc.control.mesh import render_mesh_yaml

    try:
        sys.stdout.write(render_mesh_yaml(cfg, kind=args.mesh, name=args.name, namespace=args.namespace,
                                          selector=args.selector, route=args.route))
    except ValueError as e:
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
