"""The auth, teams and redis sections are typed and checked at load; errors name the key and its line."""

from __future__ import annotations

import textwrap

import pytest

from extproc.config import ConfigError, parse_config

BASE = """
providers:
  openai: {type: openai, api_key: {env: OPENAI_API_KEY}}
models:
  gpt-4o: {targets: [{provider: openai, model: gpt-4o}]}
  claude: {targets: [{provider: openai, model: gpt-4o}]}
"""

GOOD = BASE + """
redis: {url: "redis://127.0.0.1:6379/0", password: {env: REDIS_PASSWORD}}
teams:
  ml: {models: [gpt-4o]}
  platform: {claim_values: [b7d3-guid]}
auth:
  mode: jwt
  leeway: 45s
  default_team: ml
  issuers:
    - issuer: https://login.microsoftonline.com/TENANT/v2.0
      audience: api://tollgate
      jwks_url: https://login.microsoftonline.com/TENANT/discovery/v2.0/keys
      claims: {principal: [preferred_username, sub], teams: [roles, groups]}
    - issuer: https://kubernetes.default.svc.cluster.local
      audiences: [tollgate]
      jwks_file: /etc/tollgate/cluster-jwks.json
      algorithms: [RS256]
      required_claims: [kubernetes.io]
      claims: {teams: kubernetes.io.namespace}
      leeway: 0s
"""


def parse(text: str, env: dict[str, str] | None = None):
    return parse_config(textwrap.dedent(text), source="t.yaml", env=env or {"HOME": "/home/u"})


def test_without_an_auth_section_the_gateway_is_open_as_before():
    cfg = parse(BASE)
    assert cfg.auth.mode == "none" and cfg.teams == {} and cfg.redis is None
    assert cfg.auth.deny_list.file == "/home/u/.local/state/tollgate/deny-list.json"


def test_a_full_auth_section_loads():
    cfg = parse(GOOD)
    entra, k8s = cfg.auth.issuers
    assert cfg.auth.mode == "jwt" and cfg.auth.default_team == "ml"
    assert entra.audiences == ("api://tollgate",) and entra.algorithms == ("RS256", "ES256") and entra.leeway == 45
    assert entra.claims.principal == ("preferred_username", "sub") and entra.claims.teams == ("roles", "groups")
    assert k8s.jwks_file == "/etc/tollgate/cluster-jwks.json" and k8s.leeway == 0 and k8s.algorithms == ("RS256",)
    assert cfg.teams["ml"].models == ("gpt-4o",) and cfg.teams["platform"].models is None
    assert cfg.teams["platform"].claim_values == ("b7d3-guid",) and cfg.teams["ml"].claim_values == ("ml",)
    assert cfg.redis.password.env == "REDIS_PASSWORD" and cfg.auth.deny_list.file is None


def test_a_dev_issuer_signs_with_es256_and_its_key_path_may_start_with_a_tilde():
    cfg = parse(BASE + """
auth:
  mode: jwt
  issuers: [{issuer: tollgate-dev, audience: tollgate, dev_key_file: ~/.config/tollgate/dev-key.pem}]
""")
    dev = cfg.auth.issuers[0]
    assert dev.dev_key_file == "/home/u/.config/tollgate/dev-key.pem" and dev.algorithms == ("ES256",)


ISSUER = "    - {issuer: https://idp, audience: tollgate, jwks_url: https://idp/keys"
BAD = [
    ("unknown auth key", "auth: {mode: jwt, isuers: []}", "auth.isuers: unknown key", 7),
    ("unknown mode", "auth: {mode: basic}", "auth.mode: expected one of none, jwt", 7),
    ("jwt without issuers", "auth: {mode: jwt}", "auth.issuers: mode jwt needs at least one issuer", 7),
    ("alg none", f"auth:\n  issuers:\n{ISSUER}, algorithms: [RS256, none]}}",
     "auth.issuers[0].algorithms[1]: none is never accepted", 9),
    ("HS256", f"auth:\n  issuers:\n{ISSUER}, algorithms: HS256}}", "auth.issuers[0].algorithms: HS256 is never accepted", 9),
    ("unknown alg", f"auth:\n  issuers:\n{ISSUER}, algorithms: [RS257]}}", "unknown algorithm 'RS257'", 9),
    ("no key source", "auth:\n  issuers:\n    - {issuer: https://idp, audience: tollgate}",
     "auth.issuers[0]: needs exactly one key source", 9),
    ("two key sources", f"auth:\n  issuers:\n{ISSUER}, jwks_file: /k.json}}", "needs exactly one key source", 9),
    ("no audience", "auth:\n  issuers:\n    - {issuer: https://idp, jwks_url: https://idp/keys}",
     "auth.issuers[0].audiences: is required", 9),
    ("plain http to a remote IdP", "auth:\n  issuers:\n    - {issuer: https://idp, audience: a, jwks_url: http://idp/keys}",
     "auth.issuers[0].jwks_url: expected an https:// URL", 9),
    ("issuer twice", f"auth:\n  issuers:\n{ISSUER}}}\n{ISSUER}}}", "auth.issuers[1].issuer: issuer 'https://idp' is listed twice", 10),
    ("negative leeway", "auth: {leeway: -5s}", "auth.leeway: expected a duration", 7),
    ("default team unknown", "auth: {default_team: sales}", "auth.default_team: unknown team 'sales'", 7),
    ("team names an unknown alias", "teams:\n  ml: {models: [gpt-4o, gpt-5]}", "teams.ml.models[1]: unknown model alias 'gpt-5'", 8),
    ("unknown team key", "teams:\n  ml: {modles: [gpt-4o]}", "teams.ml.modles: unknown key", 8),
    ("redis url", "redis: {url: 'http://localhost:6379'}", "redis.url: expected redis://", 7),
    ("deny file with redis", "redis: {url: 'redis://r'}\nauth: {deny_list: {file: /d.json}}",
     "auth.deny_list.file: the deny list lives in redis", 8),
    ("deny policy", "auth: {deny_list: {on_redis_down: open}}", "auth.deny_list.on_redis_down: expected last_known or refuse", 7),
]


@pytest.mark.parametrize("extra, message, line", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_auth_config_is_refused_naming_the_key_and_line(extra, message, line):
    with pytest.raises(ConfigError) as e:
        parse(BASE + extra)
    assert message in str(e.value)
    assert str(e.value).endswith(f"(line {line})")


AZURE = """
providers:
  azure:
    type: azure_openai
    base_url: https://contoso.openai.azure.com
    api_version: "2024-10-21"
    azure_ad: {tenant_id: contoso.onmicrosoft.com, client_id: 0000-app, client_secret: {file: /run/secrets/aad}}
models:
  gpt-4o: {targets: [{provider: azure, model: gpt-4o-prod}]}
"""


def test_azure_openai_may_authenticate_with_azure_ad_instead_of_a_key():
    aad = parse(AZURE).providers["azure"].azure_ad
    assert aad.token_url == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert aad.scope == "https://cognitiveservices.azure.com/.default"
    assert aad.client_secret.file == "/run/secrets/aad" and aad.client_id == "0000-app"


@pytest.mark.parametrize("change, message", [
    (("    azure_ad: {", "    api_key: {env: K}\n    azure_ad: {"), "providers.azure.azure_ad: give api_key(s) or azure_ad, not both"),
    (("client_secret: {file: /run/secrets/aad}", "client_secret: {}"), "client_secret: expected exactly one of env"),
    (("tenant_id: contoso.onmicrosoft.com, ", ""), "providers.azure.azure_ad: needs tenant_id (or token_url)"),
    (("type: azure_openai", "type: openai"), "only azure_openai providers authenticate with Azure AD"),
])
def test_bad_azure_ad_config_is_refused(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(AZURE.replace(*change))
