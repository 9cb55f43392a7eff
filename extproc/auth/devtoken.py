"""A local dev key, so people can try the JWT flow without an IdP.

``tollgate dev-token --sub alice --team ml`` signs a short-lived ES256 token
with the key in an issuer's ``dev_key_file``; a gateway whose config lists
that issuer trusts it. The key is created (mode 0600) by whichever side needs
it first. It is for laptops: never list a dev issuer in a shared deployment.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from extproc.auth.jwks import KeySet
from extproc.auth.settings import Issuer


def load_or_create_dev_key(path: str) -> ec.EllipticCurvePrivateKey:
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError:
        return _create(path)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{path} is not a P-256 EC private key")
    return key


def _create(path: str) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_or_create_dev_key(path)  # created meanwhile by the other side
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def _kid(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "dev-" + hashlib.sha256(der).hexdigest()[:16]


def dev_keyset(path: str) -> KeySet:
    key = load_or_create_dev_key(path)
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    return KeySet.parse({"keys": [{**jwk, "kid": _kid(key), "alg": "ES256", "use": "sig"}]})


def _nest(claims: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = claims
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def mint_dev_token(issuer: Issuer, *, sub: str, team: str | None = None, tier: str | None = None,
                   ttl: float = 3600.0, now: float | None = None) -> str:
    if not issuer.dev_key_file:
        raise ValueError(f"issuer {issuer.issuer!r} has no dev_key_file")
    key = load_or_create_dev_key(issuer.dev_key_file)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iss": issuer.issuer, "aud": issuer.audiences[0], "sub": sub, "iat": issued,
                              "nbf": issued, "exp": issued + int(ttl), "jti": uuid.uuid4().hex}
    if sub and issuer.claims.principal[0] != "sub":
        _nest(claims, issuer.claims.principal[0], sub)
    if team is not None:
        if not issuer.claims.teams:
            raise ValueError(f"issuer {issuer.issuer!r} maps no team claim (claims.teams)")
        _nest(claims, issuer.claims.teams[0], [team])
    if tier is not None:
        if not issuer.claims.tier:
            raise ValueError(f"issuer {issuer.issuer!r} maps no tier claim (claims.tier)")
        _nest(claims, issuer.claims.tier[0], tier)
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": _kid(key)})
