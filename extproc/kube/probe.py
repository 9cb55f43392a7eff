"""Probes and lifecycle hooks for the sidecar containers: ``python -m extproc.kube.probe ...``.

Everything the gateway listens on in a pod stays private: Envoy's admin and the
ext_proc server are on loopback or a unix socket, which the kubelet's own
``httpGet``/``tcpSocket``/``grpc`` probes cannot reach (they dial the pod IP).
So the injected containers run these checks with ``exec``, from inside the pod:

``extproc``     the ext_proc server answers the gRPC health check with SERVING
                (``--alive``: it answers at all, whatever the status);
``envoy``       Envoy's admin ``/ready`` says LIVE and the app-facing listener
                takes connections (``--alive``: the admin endpoint answers);
``wait-ready``  postStart: block (bounded) until the given parts are ready, so
                the kubelet starts the app's containers after the gateway;
``wait-idle``   preStop: let the app stop sending, then wait until Envoy has no
                request in flight (streams included), bounded by ``--max-wait``.

Exit status 0 means yes; 1 means no, with one line on stderr saying why
(Kubernetes shows it in the pod's events). The hooks always exit 0: a hook
that fails would get its container killed, which helps nobody.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_EXTPROC = "unix:/run/tollgate/extproc.sock"
DEFAULT_ADMIN = "127.0.0.1:9901"
DEFAULT_LISTENER = "127.0.0.1:10000"
ACTIVE_STAT = "http.tollgate.downstream_rq_active"  # the HCM's stat_prefix is "tollgate"


class NotReady(Exception):
    """A probe's answer was no; the message says why."""


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_extproc(target: str, *, timeout: float = 2.0, alive_only: bool = False) -> None:
    """The gRPC health check of the ext_proc server (service ``""``, the whole server)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as e:
            raise NotReady(f"ext_proc at {target}: {e.code().name}") from None
    if not alive_only and reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise NotReady(f"ext_proc at {target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")


def _admin_get(admin: str, path: str, timeout: float) -> tuple[int, str]:
    host, port = _split(admin)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        raise NotReady(f"envoy admin at {admin}: {e}") from None


def check_envoy(admin: str, listener: str | None, *, timeout: float = 2.0, alive_only: bool = False) -> None:
    """Envoy's admin ``/ready`` is LIVE, and the listener apps use accepts a connection.

    The listener itself is never sent a request: every request there goes through
    the gateway, and none of its answers says whether Envoy is healthy.
    """
    status, body = _admin_get(admin, "/ready", timeout)
    if alive_only:
        return
    if status != 200:
        raise NotReady(f"envoy is {body.strip() or status}")
    if listener:
        try:
            with socket.create_connection(_split(listener), timeout=timeout):
                pass
        except OSError as e:
            raise NotReady(f"envoy listener {listener}: {e}") from None


def active_requests(admin: str, *, timeout: float = 2.0) -> int | None:
    """Requests Envoy's listener is serving now (streams count until they end); None once Envoy is gone."""
    try:
        status, body = _admin_get(admin, f"/stats?filter=^{ACTIVE_STAT}$", timeout)
    except NotReady:
        return None
    if status != 200:
        return None
    for line in body.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == ACTIVE_STAT:
            return int(value.strip() or 0)
    return 0


def wait_until(check: Callable[[], None], *, timeout: float, interval: float = 0.2,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> str | None:
    """Retry ``check`` until it passes (None) or ``timeout`` runs out (the last reason)."""
    deadline = clock() + timeout
    while True:
        try:
            check()
            return None
        except NotReady as e:
            reason = str(e)
        if clock() >= deadline:
            return reason
        sleep(interval)


def wait_idle(admin: str, *, min_wait: float, quiet: float, max_wait: float,
              clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    """Sleep ``min_wait`` (the app is told to stop at the same moment and may still send), then wait
    until Envoy has had no request in flight for ``quiet`` seconds, or is gone, or ``max_wait`` passed.
    Returns the requests still in flight when it gave up (0 when idle)."""
    start = clock()
    sleep(min(min_wait, max_wait))
    idle_since: float | None = None
    while True:
        n = active_requests(admin)
        now = clock()
        if n is None:
            return 0
        if n == 0:
            idle_since = now if idle_since is None else idle_since
            if now - idle_since >= quiet:
                return 0
        else:
            idle_since = None
        if now - start >= max_wait:
            return n
        sleep(0.5)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m extproc.kube.probe", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ext = sub.add_parser("extproc", help="is the ext_proc server serving?")
    ext.add_argument("--target", default=DEFAULT_EXTPROC, help="host:port or unix:PATH")
    ext.add_argument("--alive", action="store_true", help="only check that it answers")
    env = sub.add_parser("envoy", help="is Envoy ready?")
    env.add_argument("--admin", default=DEFAULT_ADMIN)
    env.add_argument("--listener", default=DEFAULT_LISTENER, help="host:port apps connect to ('' to skip)")
    env.add_argument("--alive", action="store_true", help="only check that the admin endpoint answers")
    ready = sub.add_parser("wait-ready", help="postStart: wait until the named parts are ready")
    ready.add_argument("--extproc", help="ext_proc target to wait for")
    ready.add_argument("--admin", help="Envoy admin host:port to wait for")
    ready.add_argument("--listener", default=DEFAULT_LISTENER)
    ready.add_argument("--timeout", type=float, default=60.0)
    idle = sub.add_parser("wait-idle", help="preStop: wait until Envoy has no request in flight")
    idle.add_argument("--admin", default=DEFAULT_ADMIN)
    idle.add_argument("--min-wait", type=float, default=5.0, help="seconds to wait first, whatever happens")
    idle.add_argument("--quiet", type=float, default=2.0, help="seconds without a request that count as idle")
    idle.add_argument("--max-wait", type=float, default=120.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "extproc":
            check_extproc(args.target, alive_only=args.alive)
        elif args.command == "envoy":
            check_envoy(args.admin, args.listener or None, alive_only=args.alive)
        elif args.command == "wait-ready":
            _wait_ready(args.extproc, args.admin, args.listener or None, args.timeout)
        else:
            left = wait_idle(args.admin, min_wait=args.min_wait, quiet=args.quiet, max_wait=args.max_wait)
            if left:
                print(f"tollgate: stopping with {left} request(s) still in flight", file=sys.stderr)
    except NotReady as e:
        print(f"tollgate: {e}", file=sys.stderr)
        return 1
    return 0


def _wait_ready(extproc: str | None, admin: str | None, listener: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    if extproc:
        reason = wait_until(lambda: check_extproc(extproc), timeout=timeout)
        if reason:
            print(f"tollgate: not ready after {timeout:g}s: {reason}", file=sys.stderr)
    if admin:
        left = max(0.0, deadline - time.monotonic())
        reason = wait_until(lambda: check_envoy(admin, listener), timeout=left)
        if reason:
            print(f"tollgate: not ready after {timeout:g}s: {reason}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
