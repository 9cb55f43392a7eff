"""Tokens an attacker might present, each with the 401 code the gateway must answer with.

Each entry is ``(name, make, code)``; ``make(idp)`` builds the token against a
``tests.fake_idp.FakeIdP``, so the same catalog drives the verifier's unit
specs and the end-to-end suite through Envoy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fake_idp import FakeIdP


def b64(data: bytes | dict) -> str:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def alg_none(idp: FakeIdP) -> str:
    return f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': 'rsa-1'})}.{b64(idp.claims(groups=['ml']))}."


def hs256_with_the_public_key(idp: FakeIdP) -> str:
    """The classic confusion: HMAC "signed" with the RSA public key, which the verifier has."""
    public_pem = idp.keys["rsa-1"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rsa-1'})}.{b64(idp.claims(groups=['ml']))}"
    sig = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def tampered(idp: FakeIdP) -> str:
    header, _, sig = idp.mint(sub="alice", groups=["ml"]).split(".")
    return f"{header}.{b64(idp.claims(sub='admin', groups=['research']))}.{sig}"


def signed_by_a_stranger_under_a_known_kid(idp: FakeIdP) -> str:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(idp.claims(groups=["ml"]), stranger, algorithm="RS256", headers={"kid": "rsa-1"})


def rs256_header_on_the_ec_key(idp: FakeIdP) -> str:
    return jwt.encode(idp.claims(groups=["ml"]), idp.keys["rsa-1"], algorithm="RS256", headers={"kid": "ec-1"})


def _now() -> int:
    return int(time.time())


ATTACKS: list[tuple[str, Callable[[FakeIdP], str], str]] = [
    ("alg none", alg_none, "algorithm_not_allowed"),
    ("HS256 signed with the RSA public key", hs256_with_the_public_key, "algorithm_not_allowed"),
    ("expired", lambda i: i.mint(exp=_now() - 3600, iat=_now() - 7200, nbf=_now() - 7200), "token_expired"),
    ("not valid yet", lambda i: i.mint(nbf=_now() + 3600), "token_not_yet_valid"),
    ("issued in the future", lambda i: i.mint(iat=_now() + 3600), "token_not_yet_valid"),
    ("wrong issuer", lambda i: i.mint(iss="https://evil.example"), "untrusted_issuer"),
    ("wrong audience", lambda i: i.mint(aud="another-app"), "invalid_audience"),
    ("no audience", lambda i: i.mint(aud=None), "invalid_token"),
    ("no expiry", lambda i: i.mint(exp=None), "invalid_token"),
    ("unknown kid", lambda i: i.mint(headers={"kid": "rsa-999"}), "unknown_kid"),
    ("payload tampered after signing", tampered, "invalid_signature"),
    ("signed by another key under a known kid", signed_by_a_stranger_under_a_known_kid, "invalid_signature"),
    ("algorithm of another key family", rs256_header_on_the_ec_key, "algorithm_not_allowed"),
    ("too large", lambda i: i.mint(padding="x" * 10_000), "token_too_large"),
    ("two segments", lambda i: ".".join(i.mint().split(".")[:2]), "invalid_token"),
    ("five segments (JWE)", lambda i: i.mint() + ".a.b", "invalid_token"),
    ("header not JSON", lambda i: "bm90IGpzb24." + i.mint().split(".", 1)[1], "invalid_token"),
    ("kid not a string", lambda i: f"{b64({'alg': 'RS256', 'kid': 7})}.{b64(i.claims())}.c2ln", "invalid_token"),
]
