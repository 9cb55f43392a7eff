"""Answer Kubernetes AdmissionReview requests: the sidecar as a JSONPatch, or a clear reason why not.

The API server asks the injector about every new pod its MutatingWebhookConfiguration selects. The
answer is computed by the very code behind ``tollgate inject`` (``extproc.kube.inject``): the pod is
injected as a copy, and the patch is the difference between the two. So the CLI and the webhook can
never disagree about what a pod gets.

Four outcomes, each counted by the injector's metrics:

* ``injected``: allowed, with a JSONPatch;
* ``skipped``: allowed unchanged (opted out, already injected, not opted in, the injector's own
  namespace, a Job on a cluster without native sidecars), with a warning where a person should know;
* ``refused``: denied with a message naming the pod and the clash (a container, port or volume that
  the sidecar needs is taken, host networking, a bad override annotation). Refusing is how the
  message reaches ``kubectl`` and the ReplicaSet's events; a silent pod without its gateway would
  fail later and more obscurely;
* ``passed``: the review itself was unusable (not JSON, not an AdmissionReview v1, an unknown kind,
  no object) or the injector hit a bug: allowed unchanged with a message, never an exception. A pod
  without the sidecar cannot spend provider keys (they live only in the sidecar), so letting it
  through is safe, and it keeps a malformed request from turning into an outage.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from extproc.kube.inject import (
    INJECT,
    INJECTED,
    TEMPLATES,
    InjectError,
    InjectOptions,
    inject,
    object_name,
)

log = logging.getLogger("tollgate.injector")

API_VERSION = "admission.k8s.io/v1"
PROFILE = "tollgate.dev/config-profile"  # ConfigMap <config_map>-<profile> instead of <config_map>
NATIVE = "tollgate.dev/native-sidecars"  # "true" | "false": override the injector's choice for this pod
_RESOURCE_KEYS = {  # annotation -> (container, requests|limits, cpu|memory)
    f"tollgate.dev/{c}-{what}{suffix}": (c, kind, what)
    for c in ("extproc", "envoy")
    for what in ("cpu", "memory")
    for suffix, kind in (("", "requests"), ("-limit", "limits"))
}
_QUANTITY = re.compile(r"^(\d+(\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the injector decided about one review; ``reason`` is a short metrics label."""

    outcome: str  # injected | skipped | refused | passed
    reason: str
    message: str = ""


@dataclass(frozen=True)
class InjectorPolicy:
    """How the webhook decides. ``opt_in_only``: the pod itself must ask (label or annotation
    ``tollgate.dev/inject: "true"``); otherwise being sent here (the namespace label) is enough.
    ``native_sidecars``: ``jobs`` (pods that run to completion only), ``all``, or ``none`` for
    clusters older than 1.29, where pods that run to completion are skipped with a warning."""

    options: InjectOptions = field(default_factory=InjectOptions)
    own_namespace: str | None = None
    opt_in_only: bool = False
    native_sidecars: str = "jobs"

    def __post_init__(self) -> None:
        if self.native_sidecars not in ("jobs", "all", "none"):
            raise ValueError("native_sidecars: expected jobs, all or none")


def review(body: bytes, policy: InjectorPolicy) -> tuple[dict[str, Any], Verdict]:
    """The AdmissionReview to send back for ``body``, and the verdict behind it. Never raises."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:  # JSON errors are ValueErrors
        bad = Verdict("passed", "malformed", f"not a JSON AdmissionReview: {e}")
        return _answer("", None, bad), bad
    uid = ""
    if isinstance(doc, dict) and isinstance(doc.get("request"), dict):
        uid = str(doc["request"].get("uid") or "")
    try:
        patch, verdict = _decide(doc, policy)
    except Exception:  # a bug of ours must not block pod creation: admit without the sidecar
        log.exception("injector error")
        patch, verdict = None, Verdict("passed", "error", "tollgate injector error; admitted without the sidecar")
    return _answer(uid, patch, verdict), verdict


def _answer(uid: str, patch: list[dict[str, Any]] | None, v: Verdict) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": v.outcome != "refused"}
    if v.outcome == "refused":
        response["status"] = {"code": 403, "reason": "Forbidden", "message": f"tollgate injector: {v.message}"}
    elif v.message:
        response["status"] = {"code": 200, "message": f"tollgate injector: {v.message}"}
        if v.reason == "no_native_sidecars":  # a person should know this pod runs without the gateway
            response["warnings"] = [f"tollgate injector: {v.message}"]
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def _decide(doc: Any, policy: InjectorPolicy) -> tuple[list[dict[str, Any]] | None, Verdict]:
    if not isinstance(doc, dict) or doc.get("kind") != "AdmissionReview":
        return None, Verdict("passed", "malformed", "expected an AdmissionReview object")
    if doc.get("apiVersion") != API_VERSION:
        return None, Verdict("passed", "malformed", f"expected apiVersion {API_VERSION}, got {doc.get('apiVersion')!r}")
    req = doc.get("request")
    if not isinstance(req, dict) or not isinstance(req.get("uid"), str):
        return None, Verdict("passed", "malformed", "the review has no request or no request.uid")
    obj = req.get("object")
    kind = (req.get("kind") or {}).get("kind") if isinstance(req.get("kind"), dict) else None
    kind = kind or (obj.get("kind") if isinstance(obj, dict) else None)
    if kind not in TEMPLATES:
        return None, Verdict("passed", "unknown_kind", f"{kind or 'an object without a kind'} is not a workload")
    if req.get("operation", "CREATE") != "CREATE":
        return None, Verdict("skipped", "not_create", "only new objects get the sidecar")
    if not isinstance(obj, dict):
        return None, Verdict("passed", "malformed", "the review carries no object")
    namespace = req.get("namespace") or (obj.get("metadata") or {}).get("namespace")
    if policy.own_namespace and namespace == policy.own_namespace:
        return None, Verdict("skipped", "own_namespace", "the injector's own namespace is never injected")
    return _inject_one(dict(obj, kind=kind), policy)


def _pod_meta(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod template's metadata (the object's own for a Pod); {} when there is none."""
    node: Any = obj
    for key in TEMPLATES[obj["kind"]]:
        node = node.get(key) if isinstance(node, dict) else None
    meta = node.get("metadata") if isinstance(node, dict) else None
    return meta if isinstance(meta, dict) else {}


def _says(meta: Mapping[str, Any], value: str) -> bool:
    """Whether the pod's label or annotation ``tollgate.dev/inject`` says ``value``."""
    for where in ("annotations", "labels"):
        d = meta.get(where)
        if isinstance(d, dict) and str(d.get(INJECT, "")).lower() == value:
            return True
    return False


def _inject_one(obj: dict[str, Any], policy: InjectorPolicy) -> tuple[list[dict[str, Any]] | None, Verdict]:
    where = object_name(obj)
    meta = _pod_meta(obj)
    annotations: dict[str, Any] = meta["annotations"] if isinstance(meta.get("annotations"), dict) else {}
    if _says(meta, "false") or _says(obj.get("metadata") or {}, "false"):
        return None, Verdict("skipped", "opted_out", f"{where}: opted out ({INJECT}: \"false\")")
    if str(annotations.get(INJECTED, "")) == "true":
        return None, Verdict("skipped", "already_injected", f"{where}: already injected")
    if policy.opt_in_only and not (_says(meta, "true") or _says(obj.get("metadata") or {}, "true")):
        return None, Verdict("skipped", "not_opted_in", f"{where}: not opted in ({INJECT}: \"true\")")
    try:
        opts, native = _overrides(annotations, policy)
    except InjectError as e:
        return None, Verdict("refused", "bad_annotation", f"{where}: {e}")
    runs_to_completion = _runs_to_completion(obj)
    if runs_to_completion and native is False:
        return None, Verdict("skipped", "no_native_sidecars",
                             f"{where} runs to completion and this cluster has no native sidecars (Kubernetes 1.29+): "
                             "an ordinary sidecar container would keep it from ever finishing, so it runs without "
                             "the gateway; use `tollgate inject` with a wrapper, or upgrade")
    try:
        (out,) = inject([obj], replace(opts, native_sidecars=native))
    except InjectError as e:
        return None, Verdict("refused", e.reason, str(e))
    patch = json_patch(obj, out)
    return patch, Verdict("injected", "injected")


def _runs_to_completion(obj: dict[str, Any]) -> bool:
    if obj["kind"] in ("Job", "CronJob"):
        return True
    node: Any = obj
    for key in TEMPLATES[obj["kind"]]:
        node = node.get(key) if isinstance(node, dict) else None
    spec = node.get("spec") if isinstance(node, dict) else None
    return isinstance(spec, dict) and spec.get("restartPolicy") in ("Never", "OnFailure")


def _overrides(annotations: Mapping[str, Any], policy: InjectorPolicy) -> tuple[InjectOptions, bool | None]:
    """The options for one pod: the injector's, changed by the pod's ``tollgate.dev/*`` annotations."""
    opts = policy.options
    profile = annotations.get(PROFILE)
    if profile is not None:
        if not isinstance(profile, str) or not _DNS_LABEL.match(profile):
            raise InjectError(f"{PROFILE}: {profile!r} is not a DNS label")
        opts = replace(opts, config_map=f"{opts.config_map}-{profile}")
    resources = {"extproc": _copy(opts.extproc_resources), "envoy": _copy(opts.envoy_resources)}
    changed = False
    for key, value in annotations.items():
        if key in _RESOURCE_KEYS:
            if not isinstance(value, str) or not _QUANTITY.match(value):
                raise InjectError(f"{key}: {value!r} is not a Kubernetes quantity (e.g. 250m, 256Mi)")
            container, kind, what = _RESOURCE_KEYS[key]
            resources[container].setdefault(kind, {})[what] = value
            changed = True
        elif key.startswith("tollgate.dev/") and key not in (INJECT, INJECTED, PROFILE, NATIVE):
            raise InjectError(f"unknown annotation {key}")
    if changed:
        opts = replace(opts, extproc_resources=resources["extproc"], envoy_resources=resources["envoy"])
    native: bool | None = {"all": True, "none": False, "jobs": None}[policy.native_sidecars]
    said = annotations.get(NATIVE)
    if said is not None:
        if str(said).lower() not in ("true", "false"):
            raise InjectError(f"{NATIVE}: expected \"true\" or \"false\", got {said!r}")
        native = str(said).lower() == "true"
    return opts, native


def _copy(resources: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    return {k: dict(v) for k, v in resources.items()}


# --------------------------------------------------------------------------- JSONPatch


def json_patch(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """RFC 6902 operations that turn ``old`` into ``new``: objects are compared key by key, anything
    else (lists included) is replaced whole. Whole lists keep the patch short and obviously right:
    a container list is small, and index-by-index operations would depend on positions that another
    webhook running before this one may have shifted."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[dict[str, Any]] = []
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in new.items():
            where = f"{path}/{_escape(key)}"
            if key not in old:
                ops.append({"op": "add", "path": where, "value": copy.deepcopy(value)})
            elif old[key] != value:
                ops += json_patch(old[key], value, where)
        return ops
    if old == new and type(old) is type(new):
        return []
    return [{"op": "replace", "path": path, "value": copy.deepcopy(new)}]


def _escape(key: str) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")
