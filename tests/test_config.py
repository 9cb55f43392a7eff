"""The gateway config is typed and checked at load; every error names the key and its line."""

from __future__ import annotations

import textwrap

import pytest

from extproc.config import ConfigError, load_config, parse_config

GOOD = """
providers:
  openai: {type: openai, api_key: {env: OPENAI_API_KEY}}
  claude: {type: anthropic, api_key: {file: /run/secrets/anthropic}}
models:
  gpt-4o:
    targets:
      - {provider: openai, model: gpt-4o}
      - {provider: claude, model: claude-sonnet-4-5}
    per_try_timeout: 250ms
    first_byte_timeout: 2m
"""


def parse(text: str, env: dict[str, str] | None = None):
    return parse_config(textwrap.dedent(text), source="t.yaml", env=env or {})


def test_a_good_config_loads_with_defaults_filled_in():
    cfg = parse(GOOD)
    alias = cfg.models["gpt-4o"]
    assert [(t.provider, t.model) for t in alias.targets] == [("openai", "gpt-4o"), ("claude", "claude-sonnet-4-5")]
    assert alias.per_try_timeout == 0.25 and alias.first_byte_timeout == 120
    assert cfg.providers["openai"].base_url == "https://api.openai.com/v1"
    assert cfg.providers["openai"].tls and cfg.providers["openai"].authority == "api.openai.com"
    assert (cfg.listen.host, cfg.listen.port, cfg.extproc.port, cfg.metrics.port) == ("127.0.0.1", 10000, 50051, 9464)


BAD = [
    ("unknown top-level key", "listen: {port: 1}\nlisten_port: 3\n" + GOOD, "listen_port: unknown key", 2),
    ("unknown provider type", GOOD.replace("type: openai", "type: opnai"), "providers.openai.type: unknown provider type 'opnai'", 3),
    ("target names a missing provider", GOOD.replace("provider: claude", "provider: claud"),
     "models.gpt-4o.targets[1].provider: unknown provider 'claud'", 9),
    ("bad duration", GOOD.replace("250ms", "soon"), "models.gpt-4o.per_try_timeout: expected a duration", 10),
    ("port out of range", "listen: {port: 70000}\n" + GOOD, "listen.port: expected a whole number", 1),
    ("provider without a key", GOOD.replace(", api_key: {env: OPENAI_API_KEY}", ""), "providers.openai: needs api_key", 3),
    ("secret with both env and file", GOOD.replace("{env: OPENAI_API_KEY}", "{env: A, file: /b}"),
     "providers.openai.api_key: expected exactly one of env", 3),
    ("azure without api_version", GOOD.replace("type: openai,", "type: azure_openai, base_url: https://x.openai.azure.com,"),
     "providers.openai.api_version: is required for azure_openai", 3),
    ("base_url not a URL", GOOD.replace("type: openai,", "type: openai, base_url: api.openai.com,"),
     "providers.openai.base_url: expected an http(s) URL", 3),
    ("empty targets", GOOD.replace("    targets:\n      - {provider: openai, model: gpt-4o}\n      - {provider: claude, model: claude-sonnet-4-5}\n",
                                   "    targets: []\n"), "models.gpt-4o.targets: expected a non-empty list", 7),
    ("not a mapping", "- a\n- b\n", "<root>: expected a mapping", None),
    ("yaml syntax", "providers: {a: [1, 2}\n", "not valid YAML", None),
]


@pytest.mark.parametrize("name, text, message, line", BAD, ids=[b[0] for b in BAD])
def test_a_bad_config_is_refused_with_the_key_and_line(name, text, message, line):
    with pytest.raises(ConfigError) as e:
        parse_config(text, source="t.yaml", env={})
    assert message in str(e.value)
    assert str(e.value).startswith("t.yaml: ")
    if line is not None:
        assert f"(line {line})" in str(e.value)


def test_optional_providers_switch_on_with_their_variable():
    text = """
    providers:
      demo: {type: demo}
      openai: {type: openai, when_env: OPENAI_API_KEY, api_key: {env: OPENAI_API_KEY}}
    models:
      demo: {targets: [{provider: demo, model: d}]}
      gpt: {targets: [{provider: openai, model: gpt-4o}, {provider: demo, model: d}]}
      only-openai: {targets: [{provider: openai, model: gpt-4o}]}
    """
    off = parse(text)
    assert set(off.models) == {"demo", "gpt"} and len(off.models["gpt"].targets) == 1
    on = parse(text, env={"OPENAI_API_KEY": "sk-x"})
    assert set(on.models) == {"demo", "gpt", "only-openai"} and len(on.models["gpt"].targets) == 2


def test_the_embedded_default_serves_the_demo_offline_and_real_models_with_keys():
    assert set(load_config(env={}).models) == {"demo", "demo-embedding"}
    with_keys = load_config(env={"OPENAI_API_KEY": "a", "ANTHROPIC_API_KEY": "b"})
    assert {"demo", "gpt-4o", "claude-sonnet"} <= set(with_keys.models)


def test_tollgate_config_names_the_file(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text(GOOD)
    assert load_config(env={"TOLLGATE_CONFIG": str(f)}).source == str(f)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(env={"TOLLGATE_CONFIG": str(tmp_path / "missing.yaml")})


def test_fallback_on_defaults_to_what_the_gateway_always_did_and_names_outcomes():
    assert parse(GOOD).models["gpt-4o"].fallback_on == {"5xx", "429", "timeout", "connect_failure"}
    older = parse(GOOD + "    retry_on_429: false\n").models["gpt-4o"]
    assert older.fallback_on == {"5xx", "timeout", "connect_failure"}
    chosen = parse(GOOD + "    fallback_on: [5xx, 401, 403, invalid_answer]\n").models["gpt-4o"]
    assert chosen.fallback_on == {"5xx", "401", "403", "invalid_answer"}
    assert parse(GOOD).providers["openai"].key_quarantine == 600


@pytest.mark.parametrize("extra, message", [
    ("    fallback_on: [5xx, 418]\n", "models.gpt-4o.fallback_on[1]: unknown outcome '418'"),
    ("    fallback_on: 5xx\n", "models.gpt-4o.fallback_on: expected a list"),
    ("    fallback_on: [5xx]\n    retry_on_429: true\n", "models.gpt-4o.retry_on_429: give fallback_on or retry_on_429"),
])
def test_a_bad_fallback_policy_is_refused_naming_the_key_and_line(extra, message):
    with pytest.raises(ConfigError) as caught:
        parse(GOOD + extra)
    assert message in str(caught.value) and "(line " in str(caught.value)
