"""``tollgate injector``: the mutating admission webhook, served over TLS, with health and metrics.

Two listeners, because they have different readers:

* HTTPS (default :8443) for the API server: ``POST /inject`` for pods of namespaces labelled
  ``tollgate.dev/injection: enabled`` (injected unless they opt out), ``POST /inject-opted-in`` for
  pods that ask themselves with the label ``tollgate.dev/inject: "true"``;
* plain HTTP (default :8080) for the kubelet and Prometheus: ``/healthz`` (the process serves),
  ``/readyz`` (it has a valid certificate and is not shutting down) and ``/metrics``.

The certificate is a pair of files from a Secret volume (cert-manager's or ``tollgate
injector-certs``'s). Kubernetes replaces a Secret volume's files in place when the Secret changes,
so they are re-read every ``reload_interval`` seconds and, when they changed and load, the serving
context takes them: new handshakes get the new certificate, open connections keep theirs, and no
restart (no failed admission) is needed. A half-written pair that does not load is ignored until
the next look, and the old certificate keeps serving.

Each review is a few dictionary copies (well under a millisecond), so it runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from extproc.kube.admission import InjectorPolicy, review

log = logging.getLogger("tollgate.injector")

MAX_REVIEW_BYTES = 8 * 1024 * 1024  # a pod is far smaller; the API server caps objects at ~3 MiB


class InjectorMetrics:
    """The injector's own registry: what it decided, how long that took, and its certificate."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.admissions = Counter(
            "tollgate_injector_admissions", "Admission reviews answered, by outcome (injected, skipped, refused, "
            "passed) and reason.", ("outcome", "reason"), registry=r)
        self.seconds = Histogram(
            "tollgate_injector_review_seconds", "Time to answer one admission review.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r)
        self.reloads = Counter(
            "tollgate_injector_certificate_reloads", "Serving certificate loads, by result (loaded, failed).",
            ("result",), registry=r)
        self.not_after = Gauge(
            "tollgate_injector_certificate_expiry_timestamp_seconds",
            "When the serving certificate in use expires (Unix time).", registry=r)


class ServingCertificate:
    """An SSL server context whose certificate follows a pair of files."""

    def __init__(self, cert: Path, key: Path, metrics: InjectorMetrics) -> None:
        self.cert, self.key, self.metrics = cert, key, metrics
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.not_after = 0.0
        self._loaded: tuple[bytes, bytes] | None = None
        if not self.reload():
            raise ValueError(f"cannot load the serving certificate from {cert} and {key}")

    def reload(self) -> bool:
        """Load the files if they changed; True when the context now serves them (or did already)."""
        try:
            pair = (self.cert.read_bytes(), self.key.read_bytes())
        except OSError as e:
            log.warning("certificate files unreadable: %s", e)
            self.metrics.reloads.labels("failed").inc()
            return self._loaded is not None
        if pair == self._loaded:
            return True
        try:
            self.context.load_cert_chain(self.cert, self.key)
            if (self.cert.read_bytes(), self.key.read_bytes()) != pair:  # changed while loading: next time
                return self._loaded is not None
            not_after = x509.load_pem_x509_certificate(pair[0]).not_valid_after_utc.timestamp()
        except (ssl.SSLError, OSError, ValueError) as e:
            log.warning("new certificate files do not load yet (%s); keeping the current one", e)
            self.metrics.reloads.labels("failed").inc()
            return self._loaded is not None
        first = self._loaded is None
        self._loaded, self.not_after = pair, not_after
        self.metrics.reloads.labels("loaded").inc()
        self.metrics.not_after.set(not_after)
        if not first:
            log.info("serving a new certificate (expires %s)", time.strftime("%Y-%m-%d", time.gmtime(not_after)))
        return True

    def valid(self) -> bool:
        return self._loaded is not None and time.time() < self.not_after


@dataclass
class Injector:
    policy: InjectorPolicy
    certificate: ServingCertificate
    metrics: InjectorMetrics
    draining: bool = False

    def answer(self, body: bytes, *, opt_in_only: bool) -> web.Response:
        started = time.perf_counter()
        policy = replace(self.policy, opt_in_only=opt_in_only) if opt_in_only else self.policy
        doc, verdict = review(body, policy)
        self.metrics.admissions.labels(verdict.outcome, verdict.reason).inc()
        self.metrics.seconds.observe(time.perf_counter() - started)
        if verdict.outcome != "injected":
            log.info("%s (%s): %s", verdict.outcome, verdict.reason, verdict.message)
        return web.json_response(doc)

    def webhook_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REVIEW_BYTES)

        def handler(opt_in_only: bool):  # type: ignore[no-untyped-def]
            async def handle(request: web.Request) -> web.Response:
                try:
                    body = await request.read()
                except web.HTTPRequestEntityTooLarge:
                    body = b"(too large)"  # answered like any other unusable review: admitted, with a message
                return self.answer(body, opt_in_only=opt_in_only)
            return handle

        app.router.add_post("/inject", handler(False))
        app.router.add_post("/inject-opted-in", handler(True))
        return app

    def health_app(self) -> web.Application:
        app = web.Application()

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def readyz(_: web.Request) -> web.Response:
            if self.draining:
                return web.Response(status=503, text="shutting down\n")
            if not self.certificate.valid():
                return web.Response(status=503, text="no valid serving certificate\n")
            return web.Response(text="ready\n")

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.metrics.registry),
                                headers={"content-type": CONTENT_TYPE_LATEST})

        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        return app


@dataclass(frozen=True)
class Listen:
    host: str = "0.0.0.0"  # noqa: S104 - the API server reaches the webhook through its Service
    port: int = 8443
    health_port: int = 8080
    reload_interval: float = 10.0
    shutdown_delay: float = 5.0  # not ready first, so that endpoints drop us before we stop


async def serve_injector(injector: Injector, listen: Listen, *, started: asyncio.Event | None = None,
                         stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); then report not ready, wait, and close."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):  # not the main thread (tests): the event is enough
            pass
    runners = [web.AppRunner(injector.webhook_app(), access_log=None),
               web.AppRunner(injector.health_app(), access_log=None)]
    for r in runners:
        await r.setup()
    await web.TCPSite(runners[0], listen.host, listen.port, ssl_context=injector.certificate.context).start()
    await web.TCPSite(runners[1], listen.host, listen.health_port).start()
    log.info("injector serving on https://%s:%d (health on :%d)", listen.host, listen.port, listen.health_port)
    if started:
        started.set()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), listen.reload_interval)
            except TimeoutError:
                injector.certificate.reload()
        injector.draining = True
        await asyncio.sleep(listen.shutdown_delay)
    finally:
        for r in reversed(runners):
            await r.cleanup()
    return 0
