"""The mesh path: Tollgate's Envoy config for an Envoy someone else runs (``tollgate render-mesh``).

Nothing here is written by hand: every Envoy object comes out of ``envoy_config.render`` /
``ext_proc_filter``, the code that renders the sidecar's own bootstrap, so the mesh variant cannot
drift from what the end-to-end tests drive.

**Istio** (``EnvoyFilter``): the selected workloads' ``istio-proxy`` gets the gateway's whole
listener (``LISTENER ADD`` on 127.0.0.1, the same port the app's SDK already uses) and its clusters
(``CLUSTER ADD``: the ext_proc server, one per target, one aggregate per alias). Adding a listener
rather than patching filters into Istio's own outbound listeners keeps everything the gateway relies
on intact: its routes keyed by ``x-tollgate-route``, the retry policy across priorities, the
per-attempt upstream filters with the chosen-target header, the local replies in OpenAI's shape and
the early removal of a client's ``x-request-id``; and it touches none of the mesh's traffic. The
pod then runs only the ``tollgate`` container beside the app; ``istio-proxy`` is its Envoy. Traffic
from ``istio-proxy`` itself is not captured by the mesh's iptables rules, so the target clusters
reach the providers directly, with their own TLS, as in the sidecar.

**Envoy Gateway** (``EnvoyExtensionPolicy``): its API attaches an ext_proc service to a Gateway or
an HTTPRoute, with processing modes and fail-closed; it cannot add upstream (per-attempt) filters,
clusters or routes. So only the ``gateway`` stage runs there, and Envoy Gateway owns routing. The
policy's fields are read from the same ext_proc filter the sidecar uses.
"""

from __future__ import annotations

from typing import Any

import yaml

from extproc.config import GatewayConfig
from extproc.control.envoy_config import ext_proc_filter, render

ISTIO_API = "networking.istio.io/v1alpha3"
ENVOY_GATEWAY_API = "gateway.envoyproxy.io/v1alpha1"
_BODY_MODE = {"NONE": None, "BUFFERED": "Buffered", "STREAMED": "Streamed", "BUFFERED_PARTIAL": "BufferedPartial",
              "FULL_DUPLEX_STREAMED": "FullDuplexStreamed"}


def parse_selector(text: str) -> dict[str, str]:
    """``app=web,tier=api`` → labels; a mesh config must select workloads, so empty is an error."""
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"--selector: expected key=value[,key=value], got {part!r}")
        labels[key.strip()] = value.strip()
    if not labels:
        raise ValueError("--selector: name at least one label of the workloads to change")
    return labels


def render_istio(cfg: GatewayConfig, *, name: str, namespace: str, selector: dict[str, str]) -> dict[str, Any]:
    """An EnvoyFilter adding the gateway's listener and clusters to the selected sidecars."""
    boot = render(cfg)
    (listener,) = boot["static_resources"]["listeners"]
    patches: list[dict[str, Any]] = [
        {"applyTo": "LISTENER", "match": {"context": "SIDECAR_OUTBOUND"},
         "patch": {"operation": "ADD", "value": listener}},
    ]
    for cluster in boot["static_resources"]["clusters"]:
        patches.append({"applyTo": "CLUSTER", "match": {"context": "SIDECAR_OUTBOUND"},
                        "patch": {"operation": "ADD", "value": cluster}})
    return {
        "apiVersion": ISTIO_API,
        "kind": "EnvoyFilter",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "tollgate"}},
        "spec": {"workloadSelector": {"labels": selector}, "configPatches": patches},
    }


def render_envoy_gateway(cfg: GatewayConfig, *, name: str, namespace: str, route: str,
                         service: str = "tollgate-extproc", port: int = 50051) -> dict[str, Any]:
    """An EnvoyExtensionPolicy attaching the gateway stage to one HTTPRoute."""
    f = ext_proc_filter("tollgate.gateway", "gateway", cfg)["typed_config"]
    mode = f["processing_mode"]
    request: dict[str, Any] = {}
    if _BODY_MODE[mode["request_body_mode"]]:
        request["body"] = _BODY_MODE[mode["request_body_mode"]]
    ext = {
        "backendRefs": [{"name": service, "port": port}],
        "failOpen": f["failure_mode_allow"],
        "messageTimeout": f["message_timeout"].replace(".000s", "s"),
        # the response is switched on per request by the gateway stage (mode override), as in the sidecar
        "processingMode": {"request": request, "allowModeOverride": f["allow_mode_override"]},
        "metadata": {"writableNamespaces": list(f["metadata_options"]["receiving_namespaces"]["untyped"])},
    }
    return {
        "apiVersion": ENVOY_GATEWAY_API,
        "kind": "EnvoyExtensionPolicy",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "tollgate"}},
        "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": route}],
                 "extProc": [ext]},
    }


def render_mesh_yaml(cfg: GatewayConfig, *, kind: str, name: str, namespace: str, selector: str = "",
                     route: str = "") -> str:
    if kind == "istio":
        obj = render_istio(cfg, name=name, namespace=namespace, selector=parse_selector(selector))
    elif kind == "envoy-gateway":
        if not route:
            raise ValueError("--route: name the HTTPRoute the policy attaches to")
        obj = render_envoy_gateway(cfg, name=name, namespace=namespace, route=route)
    else:
        raise ValueError(f"unknown mesh {kind!r} (istio, envoy-gateway)")
    header = f"# Rendered by `tollgate render-mesh --mesh {kind}` from the gateway config; do not edit by hand.\n"
    return header + yaml.safe_dump(obj, sort_keys=False, width=120)
