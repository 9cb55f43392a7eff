"""The token verifier accepts exactly the tokens its issuers signed, for this audience, now; and refuses every trick."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from extproc.auth.jwks import KeySet, StaticJwks
from extproc.auth.verifier import TokenVerifier, TrustedIssuer
from extproc.config import Issuer
from extproc.errors import Unauthenticated
from tests.fake_idp import FakeIdP

IDP = FakeIdP()  # not started: its keys and mint() are all these specs need


def issuer(**kw) -> Issuer:
    return Issuer(issuer=IDP.issuer, audiences=("tollgate",), leeway=kw.pop("leeway", 5.0), **kw)


def verifier(*issuers: Issuer, keys: KeySet | None = None) -> TokenVerifier:
    ks = keys or KeySet.parse(IDP.jwks())
    return TokenVerifier([TrustedIssuer(i, StaticJwks(ks, i.issuer)) for i in issuers or (issuer(),)],
                         max_token_bytes=4096)


def b64(data: bytes | dict) -> str:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_a_token_the_issuer_signed_yields_its_claims_without_waiting():
    claims = verifier().verify(IDP.mint(sub="alice", groups=["ml"]))
    assert isinstance(claims, dict)  # no coroutine: the keys were at hand
    assert claims["sub"] == "alice" and claims["groups"] == ["ml"]


def test_es256_tokens_verify_with_the_ec_key():
    assert verifier().verify(IDP.mint(kid="ec-1"))["sub"] == "alice"


def test_leeway_forgives_a_little_clock_skew():
    now = int(time.time())
    assert verifier(issuer(leeway=30)).verify(IDP.mint(exp=now - 10, iat=now - 600))["sub"] == "alice"


def test_several_issuers_are_trusted_at_once_each_with_its_own_audience():
    other = Issuer(issuer="https://kubernetes.default.svc", audiences=("gw",))
    v = verifier(issuer(), other)
    assert v.verify(IDP.mint(iss="https://kubernetes.default.svc", aud="gw"))["iss"] == "https://kubernetes.default.svc"
    with pytest.raises(Unauthenticated):
        v.verify(IDP.mint(iss="https://kubernetes.default.svc", aud="tollgate"))


def _alg_none() -> str:
    return f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': 'rsa-1'})}.{b64(IDP.claims())}."


def _hs256_with_the_public_key() -> str:
    public_pem = IDP.keys["rsa-1"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rsa-1'})}.{b64(IDP.claims())}"
    sig = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def _tampered() -> str:
    header, _, sig = IDP.mint(sub="alice", groups=["ml"]).split(".")
    return f"{header}.{b64(IDP.claims(sub='admin', groups=['research']))}.{sig}"


def _signed_by_a_stranger_with_a_known_kid() -> str:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(IDP.claims(), stranger, algorithm="RS256", headers={"kid": "rsa-1"})


def _rs256_header_on_the_ec_key() -> str:
    return jwt.encode(IDP.claims(), IDP.keys["rsa-1"], algorithm="RS256", headers={"kid": "ec-1"})


NOW = int(time.time())
ATTACKS = [
    ("alg none", _alg_none, "algorithm_not_allowed"),
    ("HS256 signed with the RSA public key", _hs256_with_the_public_key, "algorithm_not_allowed"),
    ("expired", lambda: IDP.mint(exp=NOW - 3600, iat=NOW - 7200, nbf=NOW - 7200), "token_expired"),
    ("not valid yet", lambda: IDP.mint(nbf=NOW + 3600), "token_not_yet_valid"),
    ("issued in the future", lambda: IDP.mint(iat=NOW + 3600), "token_not_yet_valid"),
    ("wrong issuer", lambda: IDP.mint(iss="https://evil.example"), "untrusted_issuer"),
    ("wrong audience", lambda: IDP.mint(aud="another-app"), "invalid_audience"),
    ("no audience", lambda: IDP.mint(aud=None), "invalid_token"),
    ("no expiry", lambda: IDP.mint(exp=None), "invalid_token"),
    ("unknown kid", lambda: IDP.mint(kid="rsa-1", headers={"kid": "rsa-999"}), "unknown_kid"),
    ("payload tampered after signing", _tampered, "invalid_signature"),
    ("signed by another key under a known kid", _signed_by_a_stranger_with_a_known_kid, "invalid_signature"),
    ("algorithm of another key family", _rs256_header_on_the_ec_key, "algorithm_not_allowed"),
    ("too large", lambda: IDP.mint(padding="x" * 5000), "token_too_large"),
    ("two segments", lambda: ".".join(IDP.mint().split(".")[:2]), "invalid_token"),
    ("five segments (JWE)", lambda: IDP.mint() + ".a.b", "invalid_token"),
    ("header not JSON", lambda: "bm90IGpzb24." + IDP.mint().split(".", 1)[1], "invalid_token"),
    ("kid not a string", lambda: f"{b64({'alg': 'RS256', 'kid': 7})}.{b64(IDP.claims())}.c2ln", "invalid_token"),
]


@pytest.mark.parametrize("make", [a[1] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_every_trick_is_refused_with_a_401_that_says_why_without_echoing_the_token(make):
    code = next(c for _, m, c in ATTACKS if m is make)
    token = make()
    with pytest.raises(Unauthenticated) as e:
        verifier().verify(token)
    err = e.value
    assert (err.status, err.code) == (401, code)
    challenge = err.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="tollgate", error="invalid_token", error_description="')
    for part in token.split("."):
        if len(part) > 8:
            assert part not in err.message and part not in challenge


def test_an_algorithm_missing_from_the_issuers_allow_list_is_refused():
    es_only = issuer(algorithms=("ES256",))
    with pytest.raises(Unauthenticated) as e:
        verifier(es_only).verify(IDP.mint(kid="rsa-1"))
    assert e.value.code == "algorithm_not_allowed"


def test_required_claims_are_required():
    strict = issuer(required_claims=("email",))
    with pytest.raises(Unauthenticated, match="email"):
        verifier(strict).verify(IDP.mint())
    assert verifier(strict).verify(IDP.mint(email="a@example.com"))["email"] == "a@example.com"


def test_a_token_without_kid_is_accepted_only_when_the_issuer_has_a_single_key():
    token = jwt.encode(IDP.claims(), IDP.keys["rsa-1"], algorithm="RS256")
    with pytest.raises(Unauthenticated):
        verifier().verify(token)
    only_rsa = KeySet.parse({"keys": [k for k in IDP.jwks()["keys"] if k["kid"] == "rsa-1"]})
    assert verifier(keys=only_rsa).verify(token)["sub"] == "alice"
