"""The token verifier accepts exactly the tokens its issuers signed, for this audience, now; and refuses every trick."""

from __future__ import annotations

import time

import jwt
import pytest

from extproc.auth.jwks import KeySet, StaticJwks
from extproc.auth.verifier import TokenVerifier, TrustedIssuer
from extproc.auth.settings import Issuer
from extproc.errors import Unauthenticated
from tests.fake_idp import FakeIdP
from tests.token_attacks import ATTACKS

IDP = FakeIdP()  # not started: its keys and mint() are all these specs need


def issuer(**kw) -> Issuer:
    return Issuer(issuer=IDP.issuer, audiences=("tollgate",), leeway=kw.pop("leeway", 5.0), **kw)


def verifier(*issuers: Issuer, keys: KeySet | None = None) -> TokenVerifier:
    ks = keys or KeySet.parse(IDP.jwks())
    return TokenVerifier([TrustedIssuer(i, StaticJwks(ks, i.issuer)) for i in issuers or (issuer(),)],
                         max_token_bytes=4096)


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


@pytest.mark.parametrize("make, code", [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_every_trick_is_refused_with_a_401_that_says_why_without_echoing_the_token(make, code):
    token = make(IDP)
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
