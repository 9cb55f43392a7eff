"""`tollgate injector` over real TLS: a real HTTPS client posts real AdmissionReview JSON, the certificate
is rotated on disk the way a Secret volume rotates, and new handshakes see the new certificate.

Certificates come from `trustme` (independent of the injector's own CA code, which tests/kube/test_certs.py
checks). The server runs in a thread with its own event loop; every test stops it.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from extproc.kube.admission import InjectorPolicy
from extproc.kube.inject import InjectOptions
from extproc.kube.injector import Injector, InjectorMetrics, Listen, ServingCertificate, serve_injector
from tests.harness import free_port
from tests.kube.test_admission import admission_review, pod

HOST = "tollgate-injector.tollgate-system.svc"


def write_pair(ca: trustme.CA, tmp: Path) -> x509.Certificate:
    """Write a serving pair issued by ``ca`` the way the kubelet updates a Secret volume: new files, then
    one rename each, so a reader sees a whole old file or a whole new one."""
    leaf = ca.issue_cert(HOST)
    for name, blob in (("tls.crt", leaf.cert_chain_pems[0].bytes()), ("tls.key", leaf.private_key_pem.bytes())):
        part = tmp / f".{name}.new"
        part.write_bytes(blob)
        part.replace(tmp / name)
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())


@dataclass
class Running:
    port: int
    health_port: int
    injector: Injector
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event
    thread: threading.Thread

    def client_context(self, ca: trustme.CA) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        return ctx

    def post(self, path: str, body: bytes, ca: trustme.CA) -> tuple[int, dict]:
        # connect to 127.0.0.1 but check the certificate for the Service's name, as the API server does
        conn = http.client.HTTPSConnection(HOST, self.port, context=self.client_context(ca), timeout=5)
        conn.sock = self.client_context(ca).wrap_socket(
            socket.create_connection(("127.0.0.1", self.port), timeout=5), server_hostname=HOST)
        conn.request("POST", path, body, {"content-type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, json.loads(data)

    def peer_certificate(self, ca: trustme.CA) -> x509.Certificate:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw, \
                self.client_context(ca).wrap_socket(raw, server_hostname=HOST) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der
        return x509.load_der_x509_certificate(der)

    def get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.health_port, timeout=5)
        conn.request("GET", path)
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        return resp.status, text


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def running(tmp_path: Path, ca: trustme.CA) -> Iterator[Running]:
    write_pair(ca, tmp_path)
    metrics = InjectorMetrics()
    cert = ServingCertificate(tmp_path / "tls.crt", tmp_path / "tls.key", metrics)
    injector = Injector(InjectorPolicy(options=InjectOptions(), own_namespace="tollgate-system"), cert, metrics)
    listen = Listen("127.0.0.1", free_port(), free_port(), reload_interval=0.05, shutdown_delay=0.3)
    loop = asyncio.new_event_loop()
    started, stop = asyncio.Event(), asyncio.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            loop.run_until_complete(serve_injector(injector, listen, started=started, stop=stop))
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            errors.append(e)
        finally:
            loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not started.is_set() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started.is_set(), errors
    r = Running(listen.port, listen.health_port, injector, loop, stop, thread)
    yield r
    if thread.is_alive():
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
    assert not thread.is_alive() and not errors, errors


def wait_until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def metric(text: str, line_start: str) -> float:
    (value,) = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return value


def test_a_review_posted_over_https_comes_back_with_the_patch(running: Running, ca: trustme.CA):
    body = admission_review(pod())
    status, doc = running.post("/inject", body, ca)
    assert status == 200
    response = doc["response"]
    assert response["uid"] == json.loads(body)["request"]["uid"] and response["allowed"] is True
    ops = json.loads(base64.b64decode(response["patch"]))
    assert any(op["path"] == "/spec/containers" for op in ops)


def test_the_opt_in_path_answers_only_pods_that_ask(running: Running, ca: trustme.CA):
    status, doc = running.post("/inject-opted-in", admission_review(pod()), ca)
    assert status == 200 and doc["response"]["allowed"] is True and "patch" not in doc["response"]


@pytest.mark.parametrize("body", [b"", b"{broken", b"\x00" * 100, json.dumps({"kind": "AdmissionReview"}).encode()])
def test_malformed_input_over_the_wire_is_answered_allowed_and_the_server_keeps_serving(running, ca, body):
    status, doc = running.post("/inject", body, ca)
    assert status == 200 and doc["response"]["allowed"] is True
    assert doc["response"]["status"]["message"].startswith("tollgate injector: ")
    status, doc = running.post("/inject", admission_review(pod()), ca)  # still serving
    assert status == 200 and "patch" in doc["response"]


def test_an_oversized_body_is_answered_allowed_too(running: Running, ca: trustme.CA):
    status, doc = running.post("/inject", b" " * (9 * 1024 * 1024), ca)
    assert status == 200 and doc["response"]["allowed"] is True


def test_health_readiness_and_metrics_count_injections_skips_and_refusals(running: Running, ca: trustme.CA):
    assert running.get("/healthz") == (200, "ok\n")
    assert running.get("/readyz") == (200, "ready\n")
    injected = pod()
    skipped = pod()
    skipped["metadata"]["annotations"] = {"tollgate.dev/inject": "false"}
    refused = pod(hostNetwork=True)
    for p in (injected, injected, skipped, refused):
        running.post("/inject", admission_review(p), ca)
    running.post("/inject", b"nonsense", ca)
    status, text = running.get("/metrics")
    assert status == 200
    assert metric(text, 'tollgate_injector_admissions_total{outcome="injected",reason="injected"}') == 2
    assert metric(text, 'tollgate_injector_admissions_total{outcome="skipped",reason="opted_out"}') == 1
    assert metric(text, 'tollgate_injector_admissions_total{outcome="refused",reason="host_network"}') == 1
    assert metric(text, 'tollgate_injector_admissions_total{outcome="passed",reason="malformed"}') == 1
    assert metric(text, "tollgate_injector_review_seconds_count") == 5


def serial_or_none(running: Running, ca: trustme.CA) -> int | None:
    try:
        return running.peer_certificate(ca).serial_number
    except ssl.SSLError:  # still the old certificate, which this trust does not verify
        return None


def test_a_rotated_certificate_is_served_to_new_handshakes_without_a_restart(running, ca, tmp_path):
    first = running.peer_certificate(ca)
    new_ca = trustme.CA()  # the worst case: the CA changed too
    second = write_pair(new_ca, tmp_path)
    wait_until(lambda: serial_or_none(running, new_ca) == second.serial_number)
    assert first.serial_number != second.serial_number
    with pytest.raises(ssl.SSLCertVerificationError):  # the old trust no longer verifies the new certificate
        running.peer_certificate(ca)
    status, doc = running.post("/inject", admission_review(pod()), new_ca)
    assert status == 200 and "patch" in doc["response"]
    _, text = running.get("/metrics")
    assert metric(text, 'tollgate_injector_certificate_reloads_total{result="loaded"}') == 2
    assert metric(text, "tollgate_injector_certificate_expiry_timestamp_seconds") == \
        second.not_valid_after_utc.timestamp()


def test_files_that_do_not_load_leave_the_current_certificate_serving(running, ca, tmp_path):
    before = running.peer_certificate(ca)
    (tmp_path / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    wait_until(lambda: 'result="failed"} 1' in running.get("/metrics")[1].replace(".0", ""))
    assert running.peer_certificate(ca).serial_number == before.serial_number
    assert running.get("/readyz")[0] == 200
    after = write_pair(ca, tmp_path)  # a whole pair again: taken
    wait_until(lambda: serial_or_none(running, ca) == after.serial_number)


def test_on_stop_it_reports_not_ready_before_closing(running: Running):
    running.loop.call_soon_threadsafe(running.stop.set)
    wait_until(lambda: running.get("/readyz") == (503, "shutting down\n"), timeout=2)
    running.thread.join(10)
    assert not running.thread.is_alive()


def test_the_tollgate_injector_command_serves_and_stops_cleanly_on_sigterm(tmp_path: Path, ca: trustme.CA):
    write_pair(ca, tmp_path)
    port, health = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "injector", "--tls-cert", str(tmp_path / "tls.crt"), "--tls-key",
         str(tmp_path / "tls.key"), "--host", "127.0.0.1", "--port", str(port), "--health-port", str(health),
         "--namespace", "tollgate-system", "--image", "registry.example.com/tollgate:9", "--shutdown-delay", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        r = Running(port, health, None, None, None, None)  # type: ignore[arg-type]  # a client only
        wait_until(lambda: proc.poll() is None and _ready(r), timeout=30)
        status, doc = r.post("/inject", admission_review(pod()), ca)
        ops = json.loads(base64.b64decode(doc["response"]["patch"]))
        (containers,) = [op["value"] for op in ops if op["path"] == "/spec/containers"]
        assert {c["image"] for c in containers[:2]} == {"registry.example.com/tollgate:9"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "injector serving on https://127.0.0.1" in (proc.stdout.read() if proc.stdout else "")


def _ready(r: Running) -> bool:
    try:
        return r.get("/readyz")[0] == 200
    except OSError:
        return False
