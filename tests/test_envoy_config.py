"""The Envoy config is rendered from the gateway config, checked by Envoy itself, and holds no secret."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from extproc.config import load_config
from extproc.control.envoy_config import render, render_yaml
from tests.conftest import ANTHROPIC_KEY, AZURE_KEY, OPENAI_KEY, providers_for
from tests.harness import ENVOY

ROOT = Path(__file__).resolve().parent.parent
ENVOY_DIR = ROOT / "envoy"
RENDERED = {"envoy.yaml": None, "envoy.example.yaml": ENVOY_DIR / "gateway.example.yaml"}
EXAMPLE_ENV = {"OPENAI_API_KEY": "x", "ANTHROPIC_API_KEY": "y"}


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "-l", "error"], capture_output=True, text=True)


@pytest.mark.parametrize("path", sorted(ENVOY_DIR.glob("envoy*.yaml")), ids=lambda p: p.name)
def test_every_envoy_config_in_the_repo_passes_envoy_validate(path):
    r = validate(path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("env", [{}, EXAMPLE_ENV], ids=["demo-only", "with-real-keys"])
def test_the_rendered_default_passes_envoy_validate(tmp_path, env):
    out = tmp_path / "envoy.yaml"
    out.write_text(render_yaml(load_config(env=env), demo_socket=str(tmp_path / "demo.sock")))
    r = validate(out)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name, source", RENDERED.items())
def test_the_envoy_configs_in_the_repo_are_what_the_gateway_config_renders(name, source):
    cfg = load_config(source, env={})
    assert (ENVOY_DIR / name).read_text() == render_yaml(cfg, demo_socket="/tmp/tollgate-demo.sock"), (
        f"envoy/{name} is stale: run `tollgate render-envoy{' --config ' + str(source.relative_to(ROOT)) if source else ''}"
        f" > envoy/{name}`"
    )


def test_the_rendered_config_fails_closed_and_lets_long_streams_finish():
    boot = render(load_config(ENVOY_DIR / "gateway.example.yaml", env={}))
    listener = boot["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    gateway_filter = hcm["http_filters"][0]["typed_config"]
    upstream_filters = hcm["http_filters"][1]["typed_config"]["upstream_http_filters"]
    assert [f["name"] for f in upstream_filters] == [
        "tollgate.outcome_unless_succeeded", "tollgate.chosen_target", "tollgate.attempt_unless_prepared",
        "tollgate.internal_headers_removed", "envoy.filters.http.upstream_codec"]
    outcome_filter = upstream_filters[0]["typed_config"]["extension_config"]["typed_config"]
    attempt_filter = upstream_filters[2]["typed_config"]["extension_config"]["typed_config"]
    for f in (gateway_filter, attempt_filter, outcome_filter):
        assert f["failure_mode_allow"] is False
        assert f["message_timeout"] == "1.000s"
        # a failed connection to the Python server (restarting) is retried; a circuit-breaker refusal is not
        assert f["grpc_service"]["retry_policy"]["retry_on"] == "connect-failure"
    assert listener["per_connection_buffer_limit_bytes"] == 4194304
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    gpt = next(r for r in routes if r["name"] == "alias:gpt-4o")
    assert gpt["route"]["timeout"] == "601.000s"  # no 15 s default cut-off: the answer_timeout (10 min), plus slack
    policy = gpt["route"]["retry_policy"]
    # three targets, and a second try on OpenAI with its second key (a key slot)
    assert policy["num_retries"] == 3
    assert policy["per_try_idle_timeout"] == "20.000s"
    # statuses are decided per attempt (the outcome stage marks what to retry); Envoy's own: no answer at all
    assert policy["retry_on"] == "retriable-headers,connect-failure,refused-stream,reset"
    assert policy["retriable_headers"] == [{"name": "x-tollgate-retry", "present_match": True}]
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    assert clusters["alias:gpt-4o"]["cluster_type"]["typed_config"]["clusters"] == [
        "target:gpt-4o#0", "target:gpt-4o#0~1", "target:gpt-4o#1", "target:gpt-4o#2"]
    tls = clusters["target:gpt-4o#1"]["transport_socket"]["typed_config"]
    assert tls["sni"] == "contoso-eastus.openai.azure.com"
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"].endswith(".crt")


@pytest.mark.e2e
def test_no_credential_appears_in_envoys_config_dump(gateway, fake_openai, fake_azure, fake_anthropic):
    gw = gateway({
        "providers": providers_for(fake_openai, fake_azure, fake_anthropic),
        "models": {"m": {"targets": [{"provider": "openai", "model": "a"}, {"provider": "azure", "model": "b"},
                                     {"provider": "anthropic", "model": "c"}]}},
    })
    dump = gw.admin("/config_dump?include_eds")
    assert "target:m#2" in dump
    for key in (OPENAI_KEY, AZURE_KEY, ANTHROPIC_KEY):
        assert key not in dump
    assert yaml.safe_load(dump)  # a well-formed dump, not an error page


def test_the_rendered_config_reads_into_envoys_typed_messages():
    from extproc.control.envoy_config import typed_check

    boot = yaml.safe_load((ENVOY_DIR / "envoy.example.yaml").read_text())
    typed_check(boot)
    boot["static_resources"]["listeners"][0]["per_connection_buffer_limt_bytes"] = 1
    with pytest.raises(ValueError, match="per_connection_buffer_limt_bytes"):
        typed_check(boot)
