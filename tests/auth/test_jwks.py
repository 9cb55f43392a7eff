"""Signing keys: only asymmetric signing keys are kept; URLs are cached, refreshed sparingly, and survive IdP outages."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from extproc.auth.jwks import FileJwks, JwksError, KeySet, UrlJwks
from extproc.auth.verifier import TokenVerifier, TrustedIssuer
from extproc.auth.settings import Issuer
from extproc.errors import Unauthenticated, Unavailable
from tests.fake_idp import FakeIdP
from tests.harness import free_port


@pytest.fixture
def idp():
    with FakeIdP() as f:
        yield f


def small_rsa_jwk(kid: str, bits: int) -> dict:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid}


def test_symmetric_encryption_and_weak_keys_are_dropped_from_a_jwks():
    good = FakeIdP().jwks()["keys"]
    doc = {"keys": [
        {"kty": "oct", "kid": "shared", "k": "c2VjcmV0"},
        {**good[0], "kid": "for-encryption", "use": "enc"},
        {**good[0], "kid": "oaep", "alg": "RSA-OAEP"},
        small_rsa_jwk("weak", 1024),
        *good,
    ]}
    assert KeySet.parse(doc).kids == {"rsa-1", "ec-1"}


@pytest.mark.parametrize("doc", [b"not json", b"[]", b'{"keys": "no"}', json.dumps({"keys": [{"kty": "oct", "k": "eA"}]})])
def test_a_jwks_without_usable_keys_is_an_error(doc):
    with pytest.raises(JwksError):
        KeySet.parse(doc)


def test_a_jwks_file_is_read_at_start_and_again_when_it_changes(tmp_path):
    idp, path = FakeIdP(), tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [k for k in idp.jwks()["keys"] if k["kid"] == "rsa-1"]}))
    removed = []
    source = FileJwks(str(path), "k8s", on_change=lambda: removed.append(True))
    assert source.current(0.0).kids == {"rsa-1"}
    tmp = tmp_path / "new.json"
    tmp.write_text(json.dumps({"keys": [k for k in idp.jwks()["keys"] if k["kid"] == "ec-1"]}))
    os.replace(tmp, path)  # the way a ConfigMap update lands
    assert source.current(0.5).kids == {"rsa-1"}  # looked at most once a second
    assert source.current(1.5).kids == {"ec-1"}
    assert removed == [True]  # rsa-1 was withdrawn: verified-token caches must forget it
    path.write_text("garbage")
    assert source.current(3.0).kids == {"ec-1"}  # a broken edit keeps the keys read before


def test_a_missing_jwks_file_fails_at_start(tmp_path):
    with pytest.raises(JwksError, match="cannot read"):
        FileJwks(str(tmp_path / "absent.json"), "k8s")


def url_verifier(idp: FakeIdP, url: str | None = None, min_interval: float = 60.0,
                 clock=None) -> tuple[TokenVerifier, UrlJwks]:
    settings = Issuer(issuer=idp.issuer, audiences=("tollgate",))
    kw = {"clock": clock} if clock else {}
    source = UrlJwks(url or idp.jwks_url, idp.issuer, ttl=600, min_interval=min_interval, timeout=2, **kw)
    return TokenVerifier([TrustedIssuer(settings, source)], wait_budget=2, **kw), source


async def verify(v: TokenVerifier, token: str) -> dict:
    result = v.verify(token)
    return result if isinstance(result, dict) else await result


async def test_keys_are_fetched_once_and_then_served_from_memory(idp):
    v, source = url_verifier(idp)
    await source.start()
    for _ in range(5):
        assert isinstance(v.verify(idp.mint()), dict)
    await source.close()
    assert idp.jwks_hits == 1


async def test_an_unknown_kid_fetches_the_keys_again_which_finds_a_rotated_key(idp):
    v, source = url_verifier(idp, min_interval=0)
    await source.start()
    idp.add_key("rsa-2", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    claims = await verify(v, idp.mint(kid="rsa-2"))
    await source.close()
    assert claims["sub"] == "alice"
    assert idp.jwks_hits == 2


async def test_a_flood_of_made_up_kids_costs_the_idp_at_most_one_fetch_per_interval(idp):
    clock = [0.0]

    v, source = url_verifier(idp, min_interval=60, clock=lambda: clock[0])
    await source.start()
    clock[0] = 61.0
    refused = 0
    for i in range(50):
        try:
            await verify(v, idp.mint(headers={"kid": f"bogus-{i}"}))
        except Unauthenticated as e:
            refused += e.code == "unknown_kid"
    await source.close()
    assert refused == 50
    assert idp.jwks_hits == 2  # the start-up fetch, then one for the whole flood


async def test_when_the_idp_goes_down_the_last_good_keys_keep_working(idp):
    v, source = url_verifier(idp, min_interval=0)
    await source.start()
    idp.down = True
    await source.refresh()  # fails, and keeps what it had
    claims = await verify(v, idp.mint())
    with pytest.raises(Unauthenticated):
        await verify(v, idp.mint(headers={"kid": "rsa-404"}))
    await source.close()
    assert claims["sub"] == "alice"


async def test_with_no_keys_ever_fetched_verification_fails_closed_with_503(idp):
    v, source = url_verifier(idp, url=f"http://127.0.0.1:{free_port()}/jwks", min_interval=0)
    await source.start()
    with pytest.raises(Unavailable) as e:
        await verify(v, idp.mint())
    await source.close()
    err = e.value
    assert (err.status, err.code) == (503, "auth_unavailable")


async def test_stale_keys_are_refreshed_in_the_background_while_still_serving(idp):
    clock = [0.0]

    settings = Issuer(issuer=idp.issuer, audiences=("tollgate",))
    source = UrlJwks(idp.jwks_url, idp.issuer, ttl=10, min_interval=1, timeout=2, clock=lambda: clock[0])
    v = TokenVerifier([TrustedIssuer(settings, source)], clock=lambda: clock[0])
    await source.start()
    clock[0] = 11.0
    assert isinstance(v.verify(idp.mint()), dict)  # answered from the cache at once...
    await asyncio.sleep(0.3)  # ...while a refresh ran behind it
    await source.close()
    assert idp.jwks_hits == 2
