"""`tollgate injector-certs` against a fake Kubernetes API server: a small HTTPS server (trustme
certificate, bearer token required) that keeps Secrets and one MutatingWebhookConfiguration the way the
API does (404 for a missing object, 409 for a second create, resourceVersion checks, JSON-patch).

The command runs as the real CLI in a subprocess; what it leaves behind is checked with real TLS: the
injector serves the issued certificate, and a client trusting only the caBundle accepts it for the
Service's DNS name.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import trustme
import yaml
from cryptography import x509

from extproc.kube.certs import new_ca, new_serving, service_names
from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "fake-service-account-token"
NS = "tollgate-system"
SECRETS = f"/api/v1/namespaces/{NS}/secrets"
WEBHOOK = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/tollgate-injector"


@dataclass
class FakeApi:
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    version: int = 100
    race_on_create: dict[str, Any] | None = None  # another writer creates this Secret just before us

    def store(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.version)
        self.objects[path] = obj
        return obj

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        self.calls.append((method, path))
        if method == "GET":
            return (200, self.objects[path]) if path in self.objects else (404, status(404, "NotFound"))
        if method == "POST" and path == SECRETS:
            where = f"{SECRETS}/{body['metadata']['name']}"
            if self.race_on_create is not None:
                self.store(where, self.race_on_create)
                self.race_on_create = None
            if where in self.objects:
                return 409, status(409, "AlreadyExists")
            return 201, self.store(where, body)
        if method == "PUT" and path in self.objects:
            if body["metadata"].get("resourceVersion") != self.objects[path]["metadata"]["resourceVersion"]:
                return 409, status(409, "Conflict")
            return 200, self.store(path, body)
        if method == "PATCH" and path in self.objects:
            try:
                return 200, self.store(path, jsonpatch.apply_patch(self.objects[path], body))
            except jsonpatch.JsonPatchTestFailed:
                return 409, status(409, "Conflict")
        return 405, status(405, "MethodNotAllowed")


def status(code: int, reason: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
            "message": reason}


@pytest.fixture
def api_ca() -> trustme.CA:
    return trustme.CA()


@dataclass
class Api:
    url: str
    ca_file: Path
    token_file: Path
    fake: FakeApi


@pytest.fixture
def api(tmp_path: Path, api_ca: trustme.CA) -> Iterator[Api]:
    fake = FakeApi()
    (hook_config,) = [d for d in yaml.safe_load_all((ROOT / "k8s/base/webhook.yaml").read_text())]
    fake.store(WEBHOOK, hook_config)  # the shipped configuration, as `kubectl apply -k` created it

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            if self.headers.get("authorization") != f"Bearer {TOKEN}":
                self._send(401, status(401, "Unauthorized"))
                return
            n = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            if self.command == "PATCH":
                assert self.headers["content-type"] == "application/json-patch+json"
            self._send(*fake.handle(self.command, self.path, body))

        def _send(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = _serve  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    api_ca.issue_cert("127.0.0.1").configure_cert(ctx)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ca_file = tmp_path / "api-ca.pem"
    api_ca.cert_pem.write_to_path(str(ca_file))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    yield Api(f"https://127.0.0.1:{server.server_address[1]}", ca_file, token_file, fake)
    server.shutdown()
    server.server_close()
    thread.join(5)


def run_certs(api: Api, *extra: str, token_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", "injector-certs", "--namespace", NS, "--api-server", api.url,
         "--api-ca", str(api.ca_file), "--token-file", str(token_file or api.token_file), *extra],
        capture_output=True, text=True, timeout=60)


def secret_data(api: Api) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in api.fake.objects[f"{SECRETS}/tollgate-injector-tls"]["data"].items()}


def ca_bundles(api: Api) -> list[bytes]:
    return [base64.b64decode(h["clientConfig"]["caBundle"]) for h in api.fake.objects[WEBHOOK]["webhooks"]]


def handshake(cert: bytes, key: bytes, trust: bytes, tmp: Path, name: str) -> x509.Certificate:
    """Serve ``cert``/``key`` on a real TLS socket and connect trusting only ``trust``, checking ``name``."""
    (tmp / "c.pem").write_bytes(cert)
    (tmp / "k.pem").write_bytes(key)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    client_ctx = ssl.create_default_context(cadata=trust.decode())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        errors: list[BaseException] = []

        def accept() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError) as e:
                errors.append(e)

        t = threading.Thread(target=accept)
        t.start()
        with socket.create_connection(listener.getsockname()) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
        t.join(5)
    assert der
    return x509.load_der_x509_certificate(der)


def test_a_first_run_creates_the_secret_and_patches_every_webhooks_ca_bundle(api: Api, tmp_path: Path):
    r = run_certs(api)
    assert r.returncode == 0, r.stderr
    assert "created Secret tollgate-system/tollgate-injector-tls" in r.stdout
    assert "patched the caBundle" in r.stdout
    data = secret_data(api)
    assert set(data) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    assert api.fake.objects[f"{SECRETS}/tollgate-injector-tls"]["type"] == "kubernetes.io/tls"
    assert ca_bundles(api) == [data["ca.crt"], data["ca.crt"]]  # both webhooks
    for name in service_names("tollgate-injector", NS):  # the API server dials tollgate-injector.tollgate-system.svc
        served = handshake(data["tls.crt"], data["tls.key"], ca_bundles(api)[0], tmp_path, name)
        assert served.serial_number == x509.load_pem_x509_certificate(data["tls.crt"]).serial_number


def test_a_second_run_changes_nothing(api: Api):
    assert run_certs(api).returncode == 0
    before = copy.deepcopy(api.fake.objects)
    api.fake.calls.clear()
    r = run_certs(api)
    assert r.returncode == 0 and "up to date" in r.stdout
    assert api.fake.objects == before
    assert {m for m, _ in api.fake.calls} == {"GET"}


def test_renewal_replaces_the_serving_certificate_under_the_same_ca(api: Api, tmp_path: Path):
    assert run_certs(api).returncode == 0
    old = secret_data(api)
    r = run_certs(api, "--renew-before-days", "400")  # a 1-year certificate is now "about to expire"
    assert r.returncode == 0 and "renewed Secret" in r.stdout and "caBundle" not in r.stdout
    new = secret_data(api)
    assert new["ca.crt"] == old["ca.crt"] and new["tls.crt"] != old["tls.crt"]
    assert ca_bundles(api) == [old["ca.crt"]] * 2
    handshake(new["tls.crt"], new["tls.key"], ca_bundles(api)[0], tmp_path, "tollgate-injector.tollgate-system.svc")


def test_a_ca_bundle_someone_changed_is_put_right(api: Api):
    assert run_certs(api).returncode == 0
    api.fake.objects[WEBHOOK]["webhooks"][1]["clientConfig"]["caBundle"] = base64.b64encode(b"stale").decode()
    r = run_certs(api)
    assert r.returncode == 0 and "patched the caBundle" in r.stdout and "Secret" not in r.stdout
    assert ca_bundles(api) == [secret_data(api)["ca.crt"]] * 2


def test_when_another_run_created_the_secret_first_its_certificates_are_used(api: Api):
    ca_pem, ca_key = new_ca()
    cert, key = new_serving(ca_pem, ca_key, service_names("tollgate-injector", NS))
    theirs = {k: base64.b64encode(v).decode() for k, v in
              {"ca.crt": ca_pem, "ca.key": ca_key, "tls.crt": cert, "tls.key": key}.items()}
    api.fake.race_on_create = {"metadata": {"name": "tollgate-injector-tls"}, "data": theirs}
    r = run_certs(api)
    assert r.returncode == 0, r.stderr
    assert secret_data(api)["ca.crt"] == ca_pem and ca_bundles(api) == [ca_pem, ca_pem]


def test_a_wrong_token_is_a_clear_error(api: Api, tmp_path: Path):
    bad = tmp_path / "bad-token"
    bad.write_text("nope")
    r = run_certs(api, token_file=bad)
    assert r.returncode == 1 and "Kubernetes API: GET" in r.stderr and "(HTTP 401)" in r.stderr
    assert "nope" not in r.stderr + r.stdout


def test_without_the_webhook_configuration_it_says_what_to_apply(api: Api):
    del api.fake.objects[WEBHOOK]
    r = run_certs(api)
    assert r.returncode == 1 and "MutatingWebhookConfiguration tollgate-injector not found" in r.stderr
