"""The mesh path: the Istio EnvoyFilter and the Envoy Gateway policy come from the sidecar's own renderer,
and what they would put into a mesh's Envoy passes `envoy --mode validate` inside a minimal bootstrap.

``python -m tests.kube.test_mesh`` rewrites the rendered examples in k8s/mesh/ after a change.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import GatewayConfig, load_config
from extproc.control.envoy_config import ext_proc_filter, render
from extproc.control.mesh import render_envoy_gateway, render_istio, render_mesh_yaml
from tests.harness import ENVOY

ROOT = Path(__file__).resolve().parents[2]
MESH = ROOT / "k8s" / "mesh"
CONFIGS = {"pod": ROOT / "k8s/examples/gateway.yaml", "laptop": ROOT / "envoy/gateway.example.yaml"}
EXAMPLES = {
    MESH / "istio-envoyfilter.yaml": dict(kind="istio", name="tollgate", namespace="default", selector="app=chat-app"),
    MESH / "envoy-gateway-policy.yaml": dict(kind="envoy-gateway", name="tollgate", namespace="default",
                                             route="chat-app"),
}


def config(which: str) -> GatewayConfig:
    return load_config(CONFIGS[which], env={})


def envoy_validate(boot: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(boot))
    r = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "-l", "error"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def patches(envoy_filter: dict[str, Any], apply_to: str) -> list[dict[str, Any]]:
    return [p["patch"]["value"] for p in envoy_filter["spec"]["configPatches"] if p["applyTo"] == apply_to]


@pytest.mark.parametrize("which", CONFIGS)
def test_the_istio_envoyfilter_carries_exactly_what_the_sidecar_bootstrap_has(which):
    cfg = config(which)
    ef = render_istio(cfg, name="tollgate", namespace="shop", selector={"app": "web"})
    boot = render(cfg)
    assert patches(ef, "LISTENER") == boot["static_resources"]["listeners"]
    assert patches(ef, "CLUSTER") == boot["static_resources"]["clusters"]
    assert {p["patch"]["operation"] for p in ef["spec"]["configPatches"]} == {"ADD"}
    assert {p["match"]["context"] for p in ef["spec"]["configPatches"]} == {"SIDECAR_OUTBOUND"}
    assert ef["spec"]["workloadSelector"] == {"labels": {"app": "web"}}


@pytest.mark.parametrize("which", CONFIGS)
def test_the_istio_patches_inside_a_minimal_bootstrap_pass_envoy_validate(which, tmp_path):
    ef = render_istio(config(which), name="tollgate", namespace="shop", selector={"app": "web"})
    boot = {"node": {"id": "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local", "cluster": "web.shop"},
            "static_resources": {"listeners": patches(ef, "LISTENER"), "clusters": patches(ef, "CLUSTER")}}
    envoy_validate(boot, tmp_path)


def ext_proc_from_policy(ext: dict[str, Any], cluster: str) -> dict[str, Any]:
    """The ext_proc filter an EnvoyExtensionPolicy entry asks for, field by field."""
    modes = {"Buffered": "BUFFERED", "Streamed": "STREAMED"}
    request = ext["processingMode"]["request"]
    return {"name": "tollgate.gateway", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
        "failure_mode_allow": ext["failOpen"],
        "message_timeout": ext["messageTimeout"],
        "allow_mode_override": ext["processingMode"]["allowModeOverride"],
        "metadata_options": {"receiving_namespaces": {"untyped": ext["metadata"]["writableNamespaces"]}},
        "processing_mode": {"request_header_mode": "SEND", "request_body_mode": modes[request["body"]],
                            "response_header_mode": "SKIP", "response_body_mode": "NONE"},
    }}


@pytest.mark.parametrize("which", CONFIGS)
def test_the_envoy_gateway_policy_asks_for_the_sidecars_gateway_filter_and_envoy_accepts_it(which, tmp_path):
    cfg = config(which)
    policy = render_envoy_gateway(cfg, name="tollgate", namespace="shop", route="chat")
    (ext,) = policy["spec"]["extProc"]
    ours = ext_proc_filter("tollgate.gateway", "gateway", cfg)["typed_config"]
    built = ext_proc_from_policy(ext, "tollgate_extproc")["typed_config"]
    for key in ("failure_mode_allow", "allow_mode_override", "metadata_options"):
        assert built[key] == ours[key], key
    assert ours["failure_mode_allow"] is False  # fails closed there too
    assert float(built["message_timeout"].rstrip("s")) == float(ours["message_timeout"].rstrip("s"))
    assert built["processing_mode"]["request_body_mode"] == ours["processing_mode"]["request_body_mode"]
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "eg", "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
           "http_filters": [ext_proc_from_policy(ext, "tollgate_extproc"), {
               "name": "envoy.filters.http.router",
               "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    extproc = render(cfg)["static_resources"]["clusters"][0]
    boot = {"static_resources": {
        "listeners": [{"name": "eg", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10080}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [extproc]}}
    envoy_validate(boot, tmp_path)


def generated() -> dict[Path, str]:
    cfg = config("pod")
    return {path: render_mesh_yaml(cfg, **kw) for path, kw in EXAMPLES.items()}


@pytest.mark.parametrize("path", list(EXAMPLES), ids=lambda p: p.name)
def test_the_rendered_mesh_examples_are_in_step_with_the_renderer(path):
    assert path.read_text() == generated()[path], f"{path.name} is stale: run `python -m tests.kube.test_mesh`"


def tollgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc", *args], capture_output=True, text=True, timeout=60)


def test_render_mesh_on_the_command_line_prints_the_same_objects():
    r = tollgate("render-mesh", "--config", str(CONFIGS["pod"]), "--selector", "app=chat-app")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout) == yaml.safe_load((MESH / "istio-envoyfilter.yaml").read_text())


@pytest.mark.parametrize("args, says", [
    (["--mesh", "istio"], "--selector: name at least one label"),
    (["--mesh", "istio", "--selector", "app"], "expected key=value"),
    (["--mesh", "envoy-gateway"], "--route: name the HTTPRoute"),
])
def test_render_mesh_refuses_what_it_cannot_render(args, says):
    r = tollgate("render-mesh", "--config", str(CONFIGS["pod"]), *args)
    assert r.returncode == 2 and says in r.stderr and not r.stdout


def test_the_demo_backend_cannot_go_into_a_mesh():
    r = tollgate("render-mesh", "--selector", "app=x")  # the embedded default serves the demo model
    assert r.returncode == 2 and "demo provider" in r.stderr


if __name__ == "__main__":
    MESH.mkdir(exist_ok=True)
    for p, text in generated().items():
        p.write_text(text)
        print(f"wrote {p.relative_to(ROOT)}")
