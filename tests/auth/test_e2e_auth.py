"""End to end with auth on: the real openai SDK and raw sockets → real Envoy → Tollgate → fake providers.

One gateway serves the whole module (starting Envoy is the expensive part). It
trusts four issuers at once: a fake IdP over a JWKS URL (Okta/Entra style), an
IdP that is down, a cluster's ServiceAccount issuer from a JWKS file, and the
local dev key. Its deny list lives in a real redis-server, shared with a second
sidecar where a test needs one. Every refusal is checked to reach no provider;
the last test checks that no canary key leaked anywhere.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx2 as httpx  # the HTTP client this openai SDK is built on
import jwt
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

from tests.conftest import ANTHROPIC_KEY, AZURE_KEY, KEYS, OPENAI_KEY
from tests.fake_idp import FakeIdP
from tests.fake_provider import FakeProvider
from tests.harness import TOLLGATE, Gateway, free_port
from tests.quota.redis_process import RedisProcess
from tests.token_attacks import ATTACKS

pytestmark = pytest.mark.e2e

K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
DOWN_ISSUER = "https://idp-that-is-down.example"
AAD_SECRET = "aad-client-secret-canary-93e1"
ROTATING_KEYS = ("sk-rotating-canary-one-4d1f", "sk-rotating-canary-two-8b2c")
RECORDED: list[tuple[int, dict[str, str], bytes]] = []  # every response a client got in this module
MESSAGES = [{"role": "user", "content": "hi"}]


class World:
    """What the module's gateway is wired to."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.idp = FakeIdP().start()
        self.openai = FakeProvider("openai", api_key=OPENAI_KEY).start()
        self.anthropic = FakeProvider("anthropic", api_key=ANTHROPIC_KEY).start()
        self.rotating = FakeProvider("openai", api_key=None).start()  # records whichever key arrives
        self.azure = FakeProvider("azure", api_key=None).start()
        self.fakes = (self.openai, self.anthropic, self.rotating, self.azure)
        self.redis = RedisProcess(tmp / "redis").start()
        self.k8s_key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(ECAlgorithm.to_jwk(self.k8s_key.public_key()))
        (tmp / "cluster-jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "sa-1", "use": "sig"}]}))
        self.secret_dir = tmp / "secret"
        self.rotate_key(ROTATING_KEYS[0])
        self.gateways: list[Gateway] = []

    def rotate_key(self, key: str) -> None:
        """Rotate the way Kubernetes updates a Secret volume: a new directory, then one atomic symlink swap."""
        version = self.secret_dir / f"..{uuid.uuid4().hex[:8]}"
        version.mkdir(parents=True)
        (version / "openai-key").write_text(key + "\n")
        link = self.secret_dir / "..data.tmp"
        link.symlink_to(version.name)
        os.replace(link, self.secret_dir / "..data")
        if not (self.secret_dir / "openai-key").is_symlink():
            (self.secret_dir / "openai-key").symlink_to("..data/openai-key")

    def config(self) -> dict:
        idp = self.idp

        def provider(kind: str, fake: FakeProvider, **extra) -> dict:
            base = fake.base_url + ("/v1" if kind == "openai" else "")
            return {"type": kind, "base_url": base, **extra}

        def azure_ad(token_url: str) -> dict:
            return {"token_url": token_url, "client_id": "tollgate-app", "client_secret": {"env": "AAD_SECRET"}}

        azure = {"api_version": "2024-10-21"}
        target = lambda p, m="m": {"provider": p, "model": m}  # noqa: E731
        return {
            "redis": {"url": self.redis.url, "key_prefix": "e2e"},
            "providers": {
                "openai": provider("openai", self.openai, api_key={"env": "OPENAI_KEY"}),
                "anthropic": provider("anthropic", self.anthropic, api_key={"env": "ANTHROPIC_KEY"}),
                "openai-rotating": provider("openai", self.rotating,
                                            api_key={"file": str(self.secret_dir / "openai-key")}),
                "azure-ad": provider("azure_openai", self.azure, **azure, azure_ad=azure_ad(idp.token_url)),
                "azure-ad-broken": provider("azure_openai", self.azure, **azure,
                                            azure_ad=azure_ad(idp.broken_token_url)),
            },
            "models": {
                "gpt-4o": {"targets": [target("openai", "gpt-4o")]},
                "claude": {"targets": [target("anthropic", "claude-sonnet-4-5")]},
                "rotating": {"targets": [target("openai-rotating", "gpt-4o")]},
                "azure-ad": {"targets": [target("azure-ad", "gpt-4o-prod")]},
                "azure-ad-broken": {"targets": [target("azure-ad-broken", "gpt-4o-prod")]},
            },
            "teams": {
                "ml": {"models": ["gpt-4o", "rotating", "azure-ad", "azure-ad-broken"]},
                "research": {"models": ["*"]},
            },
            "auth": {
                "mode": "jwt",
                "leeway": "5s",
                "deny_list": {"poll_interval": "100ms"},
                "issuers": [
                    {"issuer": idp.issuer, "audience": "tollgate", "jwks_url": idp.jwks_url,
                     "jwks_refresh_min_interval": "500ms", "claims": {"principal": "sub", "teams": "groups"}},
                    {"issuer": DOWN_ISSUER, "audience": "tollgate", "jwks_url": f"http://127.0.0.1:{free_port()}/jwks"},
                    {"issuer": K8S_ISSUER, "audience": "tollgate", "jwks_file": str(self.tmp / "cluster-jwks.json"),
                     "algorithms": ["ES256"], "claims": {"teams": "kubernetes.io.namespace"}},
                    {"issuer": "tollgate-dev", "audience": "tollgate", "dev_key_file": str(self.tmp / "dev-key.pem"),
                     "claims": {"teams": "groups"}},
                ],
            },
        }

    def start_gateway(self) -> Gateway:
        d = self.tmp / f"gw{len(self.gateways)}"
        d.mkdir()
        g = Gateway(d, self.config(), env={**KEYS, "AAD_SECRET": AAD_SECRET})
        self.gateways.append(g)
        return g.start()

    def stop(self) -> None:
        for g in self.gateways:
            g.stop()
        for f in self.fakes:
            f.stop()
        self.idp.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("auth-e2e"))
    try:
        w.start_gateway()
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def gw(world) -> Gateway:
    return world.gateways[0]


@pytest.fixture(autouse=True)
def nothing_reaches_a_provider_unless_meant_to(request, world):
    for f in world.fakes:
        f.reset()
    yield
    if "reaches_provider" not in request.keywords:
        assert [f.requests for f in world.fakes] == [[], [], [], []]


# --------------------------------------------------------------------------- helpers


def _record(response: httpx.Response) -> None:
    response.read()
    RECORDED.append((response.status_code, dict(response.headers), response.content))


def client(gw: Gateway, token: str) -> openai.OpenAI:
    http = httpx.Client(event_hooks={"response": [_record]}, timeout=30)
    return openai.OpenAI(base_url=gw.base_url, api_key=token, max_retries=0, http_client=http)


def call(gw: Gateway, headers: dict[str, str], path: str = "/v1/chat/completions", model: str = "gpt-4o"):
    body = json.dumps({"model": model, "messages": MESSAGES}).encode() if path.endswith("completions") else None
    status, hdrs, raw = gw.raw("POST" if body else "GET", path, body, headers)
    RECORDED.append((status, hdrs, raw))
    return status, hdrs, raw


def raw_socket(gw: Gateway, head: bytes) -> tuple[int, bytes]:
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES}).encode()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: tollgate\r\nConnection: close\r\n" + head
    request += b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        try:
            s.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # Envoy may answer and close before it has read a huge request
        out = b""
        while not _complete(out) and (chunk := s.recv(65536)):  # not waiting for Envoy's delayed close
            out += chunk
    RECORDED.append((0, {}, out))
    status = int(out.split(b" ", 2)[1])
    return status, out.split(b"\r\n\r\n", 1)[1]


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def openai_error(raw: bytes) -> dict:
    obj = json.loads(raw)
    assert set(obj) == {"error"} and {"message", "type", "code"} <= set(obj["error"])
    return obj["error"]


def assert_401(status: int, headers: dict[str, str], raw: bytes, code: str | None = None) -> dict:
    assert status == 401, raw
    assert headers["www-authenticate"].startswith('Bearer realm="tollgate", error="invalid_token", error_description="')
    err = openai_error(raw)
    if code:
        assert err["code"] == code
    return err


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def k8s_token(world: World, namespace: str, **claims) -> str:
    now = int(time.time())
    body = {"iss": K8S_ISSUER, "aud": ["tollgate"], "sub": f"system:serviceaccount:{namespace}:batch", "iat": now,
            "nbf": now, "exp": now + 600, "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": "batch"}},
            **claims}
    return jwt.encode(body, world.k8s_key, algorithm="ES256", headers={"kid": "sa-1"})


def wait_for_log(gw: Gateway, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = gw.log()
        if needle in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never appeared in the gateway log")


# --------------------------------------------------------------------------- a good token


@pytest.mark.reaches_provider
def test_a_valid_idp_token_reaches_the_provider_which_sees_only_the_injected_key(gw, world):
    token = world.idp.mint(sub="alice", groups=["ml"])
    raw = client(gw, token).chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.parse().choices[0].message.content
    (req,) = world.openai.requests
    assert req.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    seen = json.dumps(req.headers) + req.body.decode()
    for part in token.split("."):
        assert part not in seen
    assert not any(h.startswith("x-tollgate-") for h in req.headers)
    rid = raw.headers["x-request-id"]
    log = wait_for_log(gw, f'"request_id":"{rid}","endpoint"')
    access = next(r for r in gw.access_records() if r["request_id"] == rid)
    assert (access["principal"], access["team"]) == ("alice", "ml")
    audit = [json.loads(line.removeprefix("audit ")) for line in log.splitlines() if line.startswith("audit ")]
    mine = [a for a in audit if a["request_id"] == rid]
    assert [(a["decision"], a["principal"], a["team"], a["alias"]) for a in mine] == [("allow", "alice", "ml", "gpt-4o")]


@pytest.mark.reaches_provider
def test_streaming_and_es256_tokens_work_too(gw, world):
    token = world.idp.mint(kid="ec-1", sub="alice", groups=["ml"])
    chunks = list(client(gw, token).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_the_model_list_shows_what_the_callers_team_may_use(gw, world):
    ml = {m.id for m in client(gw, world.idp.mint(groups=["ml"])).models.list()}
    research = {m.id for m in client(gw, world.idp.mint(groups=["research"])).models.list()}
    assert ml == {"gpt-4o", "rotating", "azure-ad", "azure-ad-broken"}
    assert research == ml | {"claude"}
    assert_401(*call(gw, {}, path="/v1/models"), code="missing_token")


# --------------------------------------------------------------------------- attacks


@pytest.mark.parametrize("make, code", [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_every_token_attack_is_refused_with_401(gw, world, make, code):
    err = assert_401(*call(gw, bearer(make(world.idp))), code=code)
    assert "authentication failed" in err["message"]


def test_the_openai_sdk_with_a_bad_token_gets_an_authentication_error(gw, world):
    with pytest.raises(openai.AuthenticationError) as e:
        client(gw, world.idp.mint(aud="another-app")).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.status_code == 401 and e.value.code == "invalid_audience"


def test_no_token_or_a_token_in_x_api_key_is_refused(gw, world):
    token = world.idp.mint(groups=["ml"])
    assert_401(*call(gw, {}), code="missing_token")
    assert_401(*call(gw, {"x-api-key": token}), code="missing_token")
    assert_401(*call(gw, {"api-key": token}), code="missing_token")
    assert_401(*call(gw, {"authorization": f"Basic {token}"}), code="invalid_token")


def test_a_token_over_our_limit_gets_our_401_and_a_1_mb_one_envoys_clean_431(gw, world):
    assert_401(*call(gw, bearer(world.idp.mint(padding="x" * 10_000))), code="token_too_large")
    status, body = raw_socket(gw, b"Authorization: Bearer " + b"A" * (1024 * 1024))
    assert status == 431
    assert openai_error(body)["code"] == "request_headers_too_large"


@pytest.mark.parametrize("value", [
    b"Bearer {token}\rX-Injected: 1",
    b"Bearer {head}\r\n {tail}",  # an obsolete line fold
    b"Bearer {head}\n{tail}",
    b"Bearer {head}\x00{tail}",
], ids=["bare CR", "CRLF fold", "bare LF", "NUL"])
def test_header_values_with_cr_lf_or_nul_are_refused(gw, world, value):
    token = world.idp.mint(groups=["ml"]).encode()
    head, tail = token[:40], token[40:]
    status, body = raw_socket(gw, b"Authorization: " + value.replace(b"{token}", token).replace(
        b"{head}", head).replace(b"{tail}", tail))
    assert status in (400, 401)
    if status == 401:  # ours: OpenAI-shaped; a 400 is Envoy's HTTP parser refusing the request outright
        openai_error(body)


def test_an_issuer_whose_keys_were_never_fetched_fails_closed_with_503(gw, world):
    token = world.idp.mint(iss=DOWN_ISSUER, groups=["ml"])
    status, headers, raw = call(gw, bearer(token))
    assert status == 503 and openai_error(raw)["code"] == "auth_unavailable"


@pytest.mark.reaches_provider
def test_with_the_idp_down_cached_keys_keep_working_and_unknown_kids_are_refused(gw, world):
    world.idp.down = True
    try:
        assert call(gw, bearer(world.idp.mint(sub="alice", groups=["ml"])))[0] == 200  # a token never seen before
        world.idp.add_key("rsa-while-down", rsa.generate_private_key(public_exponent=65537, key_size=2048))
        time.sleep(0.6)  # past the minimum refresh interval: the gateway does try the IdP
        assert_401(*call(gw, bearer(world.idp.mint(kid="rsa-while-down"))), code="unknown_kid")
    finally:
        world.idp.down = False
    assert len(world.openai.requests) == 1


@pytest.mark.reaches_provider
def test_a_key_the_idp_rotated_in_is_found_by_refreshing_on_its_unknown_kid(gw, world):
    world.idp.add_key("rsa-new", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    token = world.idp.mint(kid="rsa-new", groups=["ml"])
    deadline = time.monotonic() + 3
    while (status := call(gw, bearer(token))[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)  # a refresh ran less than the minimum interval ago
    assert status == 200


def test_a_flood_of_made_up_kids_does_not_hammer_the_idp(gw, world):
    before = world.idp.jwks_hits
    for i in range(30):
        assert_401(*call(gw, bearer(world.idp.mint(headers={"kid": f"bogus-{i}"}))), code="unknown_kid")
    assert world.idp.jwks_hits - before <= 3  # one per 500 ms interval at most


# --------------------------------------------------------------------------- identity and policy


def test_a_team_calling_an_alias_it_may_not_use_gets_403_naming_the_alias(gw, world):
    with pytest.raises(openai.PermissionDeniedError) as e:
        client(gw, world.idp.mint(sub="alice", groups=["ml"])).chat.completions.create(model="claude", messages=MESSAGES)
    assert e.value.status_code == 403 and e.value.code == "model_not_allowed"
    assert "'claude'" in e.value.message


def test_a_caller_in_none_of_the_teams_gets_403(gw, world):
    status, _, raw = call(gw, bearer(world.idp.mint(sub="eve", groups=["sales"])))
    assert status == 403 and openai_error(raw)["code"] == "no_team"


@pytest.mark.reaches_provider
def test_a_kubernetes_service_account_token_maps_its_namespace_to_a_team(gw, world):
    ok = client(gw, k8s_token(world, "research")).chat.completions.create(model="claude", messages=MESSAGES)
    assert ok.choices[0].message.content
    assert len(world.anthropic.requests) == 1
    with pytest.raises(openai.PermissionDeniedError):
        client(gw, k8s_token(world, "ml")).chat.completions.create(model="claude", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):  # the cluster issuer only signs ES256; its audience is ours
        client(gw, k8s_token(world, "research", aud="kubernetes")).chat.completions.create(model="claude",
                                                                                        messages=MESSAGES)


@pytest.mark.reaches_provider
def test_tollgate_dev_token_mints_a_token_the_dev_issuer_trusts(gw, world):
    out = subprocess.run([TOLLGATE, "dev-token", "--config", str(gw.config_path), "--sub", "dana", "--team", "ml"],
                         capture_output=True, text=True, check=True)
    token = out.stdout.strip()
    assert client(gw, token).chat.completions.create(model="gpt-4o", messages=MESSAGES).choices


# --------------------------------------------------------------------------- revocation


def deny(gw: Gateway, *args: str) -> str:
    out = subprocess.run([TOLLGATE, "deny", *args, "--config", str(gw.config_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.reaches_provider
def test_tollgate_deny_add_cuts_a_principal_off_on_a_second_sidecar_within_a_second(gw, world):
    second = world.start_gateway()  # another sidecar: its own Envoy and ext_proc, the same Redis
    token = world.idp.mint(sub="mallory", groups=["ml"])
    assert call(second, bearer(token))[0] == 200 and call(gw, bearer(token))[0] == 200
    deny(gw, "add", "--principal", "mallory", "--reason", "left the company")
    started = time.monotonic()  # the denial is in Redis now; the sidecars have not been told anything
    while (status := call(second, bearer(token))[0]) != 403:
        assert status == 200 and time.monotonic() - started < 1.0, "the denial took longer than a second"
        time.sleep(0.02)
    assert time.monotonic() - started < 1.0
    # the first sidecar polls on its own schedule: it too must refuse within the same second
    while (answer := call(gw, bearer(token)))[0] != 403:
        assert answer[0] == 200 and time.monotonic() - started < 1.0, "the denial took longer than a second"
        time.sleep(0.02)
    status, _, raw = answer
    assert status == 403 and openai_error(raw)["code"] == "principal_denied"
    assert "mallory" in deny(gw, "list") and "left the company" in deny(gw, "list")
    assert call(gw, bearer(world.idp.mint(sub="alice", groups=["ml"])))[0] == 200  # others are unaffected
    deny(gw, "remove", "--principal", "mallory")
    deadline = time.monotonic() + 2
    while call(second, bearer(token))[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.reaches_provider
def test_a_revoked_token_id_is_refused_while_the_principals_other_tokens_work(gw, world):
    revoked, other = world.idp.mint(sub="bob", groups=["ml"], jti="jti-stolen"), world.idp.mint(sub="bob", groups=["ml"])
    assert call(gw, bearer(revoked))[0] == 200
    deny(gw, "add", "--jti", "jti-stolen", "--for", "1h")
    try:
        deadline = time.monotonic() + 1
        while call(gw, bearer(revoked))[0] == 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert_401(*call(gw, bearer(revoked)), code="token_revoked")
        assert call(gw, bearer(other))[0] == 200
    finally:
        deny(gw, "remove", "--jti", "jti-stolen")


# --------------------------------------------------------------------------- the credential vault


@pytest.mark.reaches_provider
def test_a_rotated_key_file_is_used_for_the_next_request(gw, world):
    ml = client(gw, world.idp.mint(groups=["ml"]))
    ml.chat.completions.create(model="rotating", messages=MESSAGES)
    world.rotate_key(ROTATING_KEYS[1])
    ml.chat.completions.create(model="rotating", messages=MESSAGES)
    sent = [r.headers["authorization"] for r in world.rotating.requests]
    assert sent == [f"Bearer {ROTATING_KEYS[0]}", f"Bearer {ROTATING_KEYS[1]}"]


@pytest.mark.reaches_provider
def test_azure_openai_gets_an_azure_ad_token_by_client_credentials(gw, world):
    client(gw, world.idp.mint(groups=["ml"])).chat.completions.create(model="azure-ad", messages=MESSAGES)
    (req,) = world.azure.requests
    assert req.headers["authorization"] in {f"Bearer {t}" for t in world.idp.issued}
    assert "api-key" not in req.headers
    grant = world.idp.token_requests[0]
    assert (grant["grant_type"], grant["client_id"], grant["client_secret"]) == (
        "client_credentials", "tollgate-app", AAD_SECRET)


def test_a_failing_azure_ad_token_endpoint_is_a_clear_502(gw, world):
    with pytest.raises(openai.APIStatusError) as e:
        client(gw, world.idp.mint(groups=["ml"])).chat.completions.create(model="azure-ad-broken", messages=MESSAGES)
    assert e.value.status_code == 502
    assert "Azure AD" in e.value.message and "azure-ad-broken" in e.value.message


# --------------------------------------------------------------------------- leaks (keep last)


def test_no_canary_key_or_client_token_leaks_into_config_logs_or_responses(gw, world):
    assert len(RECORDED) > 50  # the module ran; this checks what it saw
    canaries = [OPENAI_KEY, ANTHROPIC_KEY, AZURE_KEY, AAD_SECRET, *ROTATING_KEYS, *world.idp.issued]
    config_dump = gw.admin("/config_dump?include_eds")
    logs = "".join(g.log() + (g.envoy_log_path.read_text() if g.envoy_log_path.exists() else "")
                   for g in world.gateways)
    responses = "".join(f"{s} {json.dumps(h)} {b.decode(errors='replace')}" for s, h, b in RECORDED)
    for canary in canaries:
        assert canary not in config_dump, f"{canary} is in Envoy's config_dump"
        assert canary not in logs, f"{canary} is in a gateway log"
        assert canary not in responses, f"{canary} reached a client"
    assert "audit {" in logs
    for token in world.idp.minted:  # the clients' own credentials are never logged either
        assert token.split(".")[2] not in logs
    assert not any(line.startswith("audit ") and "eyJ" in line for line in logs.splitlines())
