"""The authenticator: bearer header in, identity out; cheap for a token seen before; one audit line per decision."""

from __future__ import annotations

import json
import logging
import time

import pytest

from extproc.auth.audit import AuditLog
from extproc.auth.authenticator import Authenticator, bearer_token
from extproc.auth.deny_store import FileDenyStore, new_entry
from extproc.auth.denylist import DenyList, DenyListSync
from extproc.auth.devtoken import dev_keyset, mint_dev_token
from extproc.auth.identity import Identity, IdentityMapper
from extproc.auth.jwks import FileJwks, KeySet
from extproc.auth.policy import AccessPolicy
from extproc.auth.token_cache import VerifiedTokens
from extproc.auth.verifier import TokenVerifier, TrustedIssuer
from extproc.auth.settings import ClaimPaths, Issuer, Team
from extproc.errors import Forbidden, Unauthenticated
from tests.fake_idp import FakeIdP

IDP = FakeIdP()
TEAMS = {"ml": Team("ml", models=("gpt-4o",)), "research": Team("research")}


class CountingKeys:
    """A key source (the JwksSource protocol) that counts how often verification needed it."""

    def __init__(self, keys: KeySet) -> None:
        self.keys, self.label, self.lookups = keys, "counting", 0

    def current(self, now: float) -> KeySet | None:
        self.lookups += 1
        return self.keys

    def may_refresh(self, now: float) -> bool:
        return False

    async def refresh(self) -> KeySet | None:
        return self.keys

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def authenticator(tmp_path, keys=None, issuer: Issuer | None = None, cache: VerifiedTokens | None = None,
                  clock=time.monotonic) -> Authenticator:
    iss = issuer or Issuer(issuer=IDP.issuer, audiences=("tollgate",), claims=ClaimPaths(teams=("groups",)))
    source = keys or CountingKeys(KeySet.parse(IDP.jwks()))
    a = Authenticator(
        verifier=TokenVerifier([TrustedIssuer(iss, source)], clock=clock),
        mapper=IdentityMapper(TEAMS), policy=AccessPolicy(TEAMS),
        deny=DenyListSync(FileDenyStore(str(tmp_path / "deny.json"))), cache=cache if cache is not None else VerifiedTokens(100),
        audit=AuditLog(),
    )
    a._started = True  # these specs drive it without an event loop; nothing to start
    return a


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_a_token_seen_before_costs_no_verification(tmp_path):
    keys = CountingKeys(KeySet.parse(IDP.jwks()))
    auth = authenticator(tmp_path, keys)
    token = IDP.mint(sub="alice", groups=["ml"])
    first = auth.authenticate(bearer(token), "r1")
    second = auth.authenticate(bearer(token), "r2")
    assert first == second and isinstance(second, Identity) and second.team == "ml"
    assert keys.lookups == 1


def test_a_denial_applies_to_a_token_already_in_the_cache(tmp_path):
    auth = authenticator(tmp_path)
    token = IDP.mint(sub="mallory", groups=["ml"])
    auth.authenticate(bearer(token), "r1")
    auth.deny.snapshot = DenyList([new_entry("principal", "mallory")])  # what the poller would install
    with pytest.raises(Forbidden) as e:
        auth.authenticate(bearer(token), "r2")
    assert e.value.code == "principal_denied"


@pytest.mark.parametrize("value, code", [
    (None, "missing_token"),
    ("", "missing_token"),
    ("Basic YWxpY2U6cHc=", "invalid_token"),
    ("Bearer", "invalid_token"),
    ("Bearer abc def", "invalid_token"),
    ("Bearer abc\r\nx-injected: 1", "invalid_token"),
    ("Bearer abc\ndef", "invalid_token"),
    ("Bearer abc\x00def", "invalid_token"),
    ("Bearer " + "a" * 9000, "token_too_large"),
])
def test_only_a_well_formed_bearer_header_carries_a_token(value, code):
    with pytest.raises(Unauthenticated) as e:
        bearer_token(value, 8192)
    assert e.value.code == code


def test_the_bearer_scheme_is_case_insensitive():
    assert bearer_token("bearer a.b.c", 8192) == bearer_token("BEARER a.b.c", 8192) == "a.b.c"


def test_every_decision_writes_one_audit_line_without_token_material(tmp_path, caplog):
    auth = authenticator(tmp_path)
    good, expired = IDP.mint(sub="alice", groups=["ml"]), IDP.mint(exp=int(time.time()) - 3600)
    with caplog.at_level(logging.INFO, logger="tollgate.audit"):
        ident = auth.authenticate(bearer(good), "r1")
        auth.authorize(ident, "gpt-4o", "r1")
        with pytest.raises(Forbidden):
            auth.authorize(ident, "claude", "r2")
        with pytest.raises(Unauthenticated):
            auth.authenticate(bearer(expired), "r3")
    lines = [r.getMessage() for r in caplog.records if r.name == "tollgate.audit"]
    recs = [json.loads(line.removeprefix("audit ")) for line in lines]
    assert [(r["request_id"], r["decision"], r["alias"], r["status"]) for r in recs] == [
        ("r1", "allow", "gpt-4o", 200), ("r2", "deny", "claude", 403), ("r3", "deny", None, 401)]
    assert recs[0]["principal"] == "alice" and recs[0]["team"] == "ml"
    assert recs[1]["reason"] == "team 'ml' may not use model 'claude'"
    assert recs[2]["reason"] == "token has expired" and recs[2]["principal"] is None
    for token in (good, expired):
        assert not any(part in " ".join(lines) for part in token.split(".")[1:])


def test_a_key_withdrawn_from_the_jwks_forgets_the_tokens_it_signed(tmp_path):
    path, clock = tmp_path / "jwks.json", [0.0]
    path.write_text(json.dumps(IDP.jwks()))
    cache = VerifiedTokens(100)
    keys = FileJwks(str(path), "k8s", on_change=cache.clear)
    auth = authenticator(tmp_path, keys, cache=cache, clock=lambda: clock[0])
    old = IDP.mint(kid="rsa-1")
    auth.authenticate(bearer(old), "r1")
    path.write_text(json.dumps({"keys": [k for k in IDP.jwks()["keys"] if k["kid"] == "ec-1"]}))
    clock[0] = 2.0
    auth.authenticate(bearer(IDP.mint(kid="ec-1")), "r2")  # the next verification re-reads the file
    with pytest.raises(Unauthenticated) as e:
        auth.authenticate(bearer(old), "r3")
    assert e.value.code == "unknown_kid"


def test_a_dev_token_minted_with_the_local_key_is_accepted_by_a_dev_issuer(tmp_path):
    key_file = str(tmp_path / "dev" / "key.pem")
    dev = Issuer(issuer="tollgate-dev", audiences=("tollgate",), dev_key_file=key_file, algorithms=("ES256",),
                 claims=ClaimPaths(teams=("groups",), tier=("tier",)))
    token = mint_dev_token(dev, sub="alice", team="ml", tier="gold", ttl=60)
    auth = authenticator(tmp_path, CountingKeys(dev_keyset(key_file)), dev)
    ident = auth.authenticate(bearer(token), "r1")
    assert (ident.principal, ident.team, ident.tier, ident.issuer) == ("alice", "ml", "gold", "tollgate-dev")
    assert oct((tmp_path / "dev" / "key.pem").stat().st_mode & 0o777) == "0o600"


async def test_the_deny_list_is_read_from_its_store_when_the_authenticator_starts(tmp_path):
    await FileDenyStore(str(tmp_path / "deny.json")).add(new_entry("principal", "mallory"))
    auth = authenticator(tmp_path)
    auth._started = False
    await auth.start()
    try:
        with pytest.raises(Forbidden):
            auth.authenticate(bearer(IDP.mint(sub="mallory")), "r1")
    finally:
        await auth.close()
