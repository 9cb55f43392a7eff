"""``tollgate injector`` and ``tollgate injector-certs``: argv → the webhook, or its certificates."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from extproc.config import GatewayConfig, environment
from extproc.control.supervisor import use_uvloop
from extproc.kube.admission import InjectorPolicy
from extproc.kube.api import ApiError, KubeApi
from extproc.kube.certs import CertTarget, ensure_certificates
from extproc.kube.inject import InjectError, InjectOptions, check_config
from extproc.kube.injector import Injector, InjectorMetrics, Listen, ServingCertificate, serve_injector


def add_option_args(p: argparse.ArgumentParser) -> None:
    """What an injected pod runs: shared by ``tollgate inject`` and ``tollgate injector``."""
    p.add_argument("--config", help="the gateway config the pods will run (its ports; checked for pod use)")
    p.add_argument("--image", help="the Tollgate image (k8s/image/Dockerfile)")
    p.add_argument("--config-map", help="ConfigMap holding tollgate.yaml and envoy.yaml")
    p.add_argument("--secret", help="Secret with the provider keys ('' for none)")
    p.add_argument("--drain-seconds", type=int, help="longest wait for in-flight streams on shutdown")


def options_from_args(cfg: GatewayConfig, args: argparse.Namespace, **more: Any) -> InjectOptions:
    overrides: dict[str, Any] = {k: v for k, v in {
        "image": args.image, "config_map": args.config_map, "drain_seconds": args.drain_seconds}.items()
        if v is not None}
    if args.secret is not None:
        overrides["secret"] = args.secret or None
    overrides.update(more)
    opts = InjectOptions.from_config(cfg, **overrides) if args.config else InjectOptions(**overrides)
    for problem in check_config(cfg, opts) if args.config else []:
        print(f"tollgate: warning: {problem}", file=sys.stderr)
    return opts


def add_parsers(sub: Any) -> None:
    inj = sub.add_parser("injector", help="serve the sidecar-injecting admission webhook over TLS")
    add_option_args(inj)
    inj.add_argument("--tls-cert", required=True, help="serving certificate (PEM); re-read when it changes")
    inj.add_argument("--tls-key", required=True)
    inj.add_argument("--host", default="0.0.0.0")  # noqa: S104 - reached through its Service
    inj.add_argument("--port", type=int, default=8443, help="HTTPS port for the API server")
    inj.add_argument("--health-port", type=int, default=8080, help="plain HTTP: /healthz, /readyz, /metrics")
    inj.add_argument("--namespace", default=environment().get("POD_NAMESPACE"),
                     help="the injector's own namespace, never injected (default: $POD_NAMESPACE)")
    inj.add_argument("--native-sidecars", choices=("jobs", "all", "none"), default="jobs",
                     help="jobs: only pods that run to completion (default); all; none: a cluster before 1.29")
    inj.add_argument("--reload-interval", type=float, default=10.0, help="seconds between looks at the cert files")
    inj.add_argument("--shutdown-delay", type=float, default=5.0)
    certs = sub.add_parser("injector-certs", help="create/renew the injector's CA and certificate, patch caBundle")
    certs.add_argument("--namespace", default=environment().get("POD_NAMESPACE"),
                       help="where the Secret and the injector's Service are (default: $POD_NAMESPACE)")
    certs.add_argument("--secret", default="tollgate-injector-tls")
    certs.add_argument("--service", default="tollgate-injector")
    certs.add_argument("--webhook", default="tollgate-injector", help="the MutatingWebhookConfiguration")
    certs.add_argument("--renew-before-days", type=int, default=30)
    certs.add_argument("--api-server", help="default: the in-cluster address")
    certs.add_argument("--api-ca", help="CA file for --api-server")
    certs.add_argument("--token-file", help="bearer token file for --api-server")


def injector_command(cfg: GatewayConfig, args: argparse.Namespace) -> int:
    try:
        opts = options_from_args(cfg, args)
        policy = InjectorPolicy(options=opts, own_namespace=args.namespace, native_sidecars=args.native_sidecars)
        metrics = InjectorMetrics()
        cert = ServingCertificate(Path(args.tls_cert), Path(args.tls_key), metrics)
    except (InjectError, ValueError, OSError) as e:
        print(f"tollgate: {e}", file=sys.stderr)
        return 2
    listen = Listen(args.host, args.port, args.health_port, args.reload_interval, args.shutdown_delay)
    use_uvloop()  # like the gateway (TOLLGATE_NO_UVLOOP=1: asyncio's own loop); tests/bench/injector.md
    return asyncio.run(serve_injector(Injector(policy, cert, metrics), listen))


def certs_command(args: argparse.Namespace) -> int:
    if not args.namespace:
        print("tollgate: injector-certs: give --namespace (or set POD_NAMESPACE)", file=sys.stderr)
        return 2
    api = KubeApi(args.api_server, args.api_ca, args.token_file) if args.api_server else None
    try:
        api = api or KubeApi.in_cluster()
        target = CertTarget(args.namespace, args.secret, args.service, args.webhook,
                            dt.timedelta(days=args.renew_before_days))
        _, changed = ensure_certificates(api, target)
    except ApiError as e:
        print(f"tollgate: {e}", file=sys.stderr)
        return 1
    for line in changed or ["the certificates and the caBundle are up to date"]:
        print(line)
    return 0
