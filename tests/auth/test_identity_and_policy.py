"""Claims become an identity by configured paths; teams decide which aliases a caller may use."""

from __future__ import annotations

import pytest

from extproc.auth.identity import Identity, IdentityMapper, claim_at
from extproc.auth.policy import AccessPolicy
from extproc.auth.settings import ClaimPaths, Issuer, Team
from extproc.errors import Forbidden, Unauthenticated

K8S_CLAIMS = {
    "iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:ml:trainer", "exp": 2_000_000_000,
    "kubernetes.io": {"namespace": "ml", "serviceaccount": {"name": "trainer", "uid": "42"}},
}
OKTA_CLAIMS = {"iss": "https://idp", "sub": "00u1", "email": "alice@example.com", "groups": ["everyone", "ml", "research"],
               "tier": "gold", "exp": 2_000_000_000, "jti": "t-1"}


def issuer(**claims) -> Issuer:
    return Issuer(issuer="https://idp", audiences=("tollgate",), claims=ClaimPaths(**claims))


TEAMS = {
    "research": Team("research", models=None),
    "ml": Team("ml", models=("gpt-4o", "embed")),
    "platform": Team("platform", models=("gpt-4o",), claim_values=("b7d3-guid-of-an-entra-group",)),
}


@pytest.mark.parametrize("path, value", [
    ("sub", "system:serviceaccount:ml:trainer"),
    ("kubernetes.io.namespace", "ml"),
    ("kubernetes.io.serviceaccount.name", "trainer"),
    ("kubernetes.io.pod.name", None),
    ("sub.deeper", None),
])
def test_claim_paths_are_dotted_and_find_keys_that_contain_dots(path, value):
    assert claim_at(K8S_CLAIMS, path) == value


def test_an_okta_style_token_maps_to_principal_team_and_tier():
    ident = IdentityMapper(TEAMS).identity(OKTA_CLAIMS, issuer(principal=("email", "sub"), teams=("groups",),
                                                               tier=("tier",)))
    assert ident == Identity("alice@example.com", "research", "gold", "https://idp", "t-1", 2_000_000_000.0)


def test_the_team_is_the_first_configured_team_the_caller_belongs_to_not_the_idps_order():
    mapper = IdentityMapper({"ml": TEAMS["ml"], "research": TEAMS["research"]})
    assert mapper.team_of(["research", "ml"]) == "ml"


def test_claim_values_map_opaque_group_ids_to_a_team():
    assert IdentityMapper(TEAMS).team_of(["b7d3-guid-of-an-entra-group"]) == "platform"


def test_a_kubernetes_namespace_can_be_the_team():
    ident = IdentityMapper(TEAMS).identity(K8S_CLAIMS, issuer(teams=("kubernetes.io.namespace",)))
    assert (ident.principal, ident.team) == ("system:serviceaccount:ml:trainer", "ml")


def test_outsiders_get_the_default_team_or_none():
    assert IdentityMapper(TEAMS).team_of(["sales"]) is None
    assert IdentityMapper(TEAMS, default_team="research").team_of(["sales"]) == "research"


def test_without_configured_teams_the_first_team_claim_value_is_taken_as_is():
    assert IdentityMapper({}).team_of(["everyone", "ml"]) == "everyone"


def test_a_token_without_the_principal_claim_is_refused():
    with pytest.raises(Unauthenticated, match="email"):
        IdentityMapper(TEAMS).identity({"sub": "x", "exp": 1}, issuer(principal=("email",)))


def who(team: str | None) -> Identity:
    return Identity("alice", team, None, "https://idp", None, 2e9)


def test_a_team_may_call_exactly_its_aliases_and_the_refusal_names_the_alias():
    policy = AccessPolicy(TEAMS)
    policy.check(who("ml"), "gpt-4o")
    policy.check(who("research"), "claude")  # no list: every alias
    with pytest.raises(Forbidden) as e:
        policy.check(who("ml"), "claude")
    assert (e.value.status, e.value.code) == (403, "model_not_allowed")
    assert "'claude'" in e.value.message and "'ml'" in e.value.message


def test_with_teams_configured_a_caller_outside_all_of_them_is_refused():
    with pytest.raises(Forbidden) as e:
        AccessPolicy(TEAMS).check(who(None), None)
    assert e.value.code == "no_team"


def test_without_teams_every_authenticated_caller_may_call_every_alias():
    AccessPolicy({}).check(who(None), "anything")


def test_the_model_list_shows_what_the_team_may_call():
    aliases = ["gpt-4o", "claude", "embed"]
    assert AccessPolicy(TEAMS).visible(who("ml"), aliases) == ["gpt-4o", "embed"]
    assert AccessPolicy(TEAMS).visible(who("research"), aliases) == aliases
    assert AccessPolicy(TEAMS).visible(who("sales"), aliases) == []
