"""The webhook's answers, as the API server would see them: real AdmissionReview JSON in, the JSONPatch
applied with the `jsonpatch` library, the patched pod checked against Kubernetes' own Pod schema
(kubernetes-validate, offline), and compared with what `tollgate inject` makes of the same pod.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from extproc.kube.admission import InjectorPolicy, json_patch, review
from extproc.kube.inject import ENVOY_CONTAINER, EXTPROC_CONTAINER, INJECTED, InjectOptions, inject

ROOT = Path(__file__).resolve().parents[2]
OURS = [EXTPROC_CONTAINER, ENVOY_CONTAINER]
K8S_VERSIONS = ("1.29", "1.37")
POLICY = InjectorPolicy(options=InjectOptions(image="registry.example.com/tollgate:0.1.0"), own_namespace="tollgate-system")


def pod(name: str = "web-7d4b9c-x2k4p", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": name[:-5], "namespace": "shop", "labels": {"app": "web"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c",
                                          "uid": str(uuid.uuid4()), "controller": True}]},
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/web:1",
                                 "ports": [{"name": "http", "containerPort": 8080}]}], **spec},
    }


def admission_review(obj: Any, *, kind: str = "Pod", operation: str = "CREATE", namespace: str = "shop") -> bytes:
    group, _, version = ("", "", "v1") if kind == "Pod" else ("batch", "", "v1")
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": kind.lower() + "s"},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }).encode()


def answer(obj: Any, policy: InjectorPolicy = POLICY, **kw: Any) -> tuple[dict[str, Any], Any]:
    body = admission_review(obj, **kw)
    doc, verdict = review(body, policy)
    assert doc["apiVersion"] == "admission.k8s.io/v1" and doc["kind"] == "AdmissionReview"
    assert doc["response"]["uid"] == json.loads(body)["request"]["uid"]
    return doc["response"], verdict


def patched(obj: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(obj, ops)


def valid_pod(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def names(containers: list[dict[str, Any]] | None) -> list[str]:
    return [c["name"] for c in containers or []]


# --------------------------------------------------------------------------- round trips


def test_a_plain_pod_comes_back_with_the_sidecar_exactly_as_tollgate_inject_makes_it():
    p = pod()
    response, verdict = answer(p)
    out = patched(p, response)
    assert verdict.outcome == "injected"
    assert names(out["spec"]["containers"]) == [*OURS, "app"]
    (cli,) = inject([p], POLICY.options)  # the same engine: the webhook cannot drift from the CLI
    assert out == cli
    valid_pod(out)


def test_a_pod_with_init_containers_keeps_them_and_their_order():
    p = pod(initContainers=[{"name": "migrate", "image": "registry.example.com/web:1", "command": ["migrate"]}])
    out = patched(p, answer(p)[0])
    assert names(out["spec"]["initContainers"]) == ["migrate"]
    assert names(out["spec"]["containers"]) == [*OURS, "app"]
    valid_pod(out)


def test_a_pod_that_already_has_other_sidecars_keeps_them():
    p = pod(initContainers=[{"name": "istio-proxy", "image": "proxyv2:1.24", "restartPolicy": "Always"}])
    p["spec"]["containers"].append({"name": "log-shipper", "image": "fluent-bit:3", "ports": [{"containerPort": 2020}]})
    out = patched(p, answer(p)[0])
    assert names(out["spec"]["initContainers"]) == ["istio-proxy"]
    assert names(out["spec"]["containers"]) == [*OURS, "app", "log-shipper"]
    assert out["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"
    valid_pod(out)


def job_pod(owner: str = "Job") -> dict[str, Any]:
    p = pod("report-28712345-abcde", restartPolicy="Never")
    p["metadata"]["ownerReferences"][0].update(apiVersion="batch/v1", kind=owner, name="report-28712345")
    return p


def test_a_jobs_pod_gets_native_sidecars_so_that_the_job_can_finish():
    p = job_pod()
    out = patched(p, answer(p)[0])
    assert names(out["spec"]["initContainers"]) == OURS
    assert all(c["restartPolicy"] == "Always" for c in out["spec"]["initContainers"])
    assert names(out["spec"]["containers"]) == ["app"]
    valid_pod(out)


def test_a_cronjobs_pod_as_its_controller_creates_it_is_injected_like_a_jobs():
    (cron,) = [d for d in yaml.safe_load_all((ROOT / "k8s/examples/app.yaml").read_text()) if d["kind"] == "CronJob"]
    template = cron["spec"]["jobTemplate"]["spec"]["template"]
    p = {"apiVersion": "v1", "kind": "Pod",
         "metadata": {**copy.deepcopy(template.get("metadata") or {}), "generateName": "chat-app-nightly-summary-",
                      "namespace": "shop"},
         "spec": copy.deepcopy(template["spec"])}
    out = patched(p, answer(p)[0])
    assert names(out["spec"]["initContainers"]) == OURS
    valid_pod(out)


def test_a_cronjob_object_itself_can_be_injected_at_its_template():
    (cron,) = [d for d in yaml.safe_load_all((ROOT / "k8s/examples/app.yaml").read_text()) if d["kind"] == "CronJob"]
    response, verdict = answer(cron, kind="CronJob")
    out = patched(cron, response)
    spec = out["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert verdict.outcome == "injected" and names(spec["initContainers"]) == OURS
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(out, version, strict=True)


@pytest.mark.parametrize("doc_kind", ["Deployment", "CronJob"])
def test_every_pod_of_the_example_app_is_injected_to_a_valid_pod(doc_kind):
    (workload,) = [d for d in yaml.safe_load_all((ROOT / "k8s/examples/app.yaml").read_text())
                   if d["kind"] == doc_kind]
    template = workload["spec"]["template"] if doc_kind == "Deployment" else \
        workload["spec"]["jobTemplate"]["spec"]["template"]
    p = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "generateName": "chat-app-"},
         "spec": template["spec"]}
    out = patched(p, answer(p)[0])
    assert INJECTED in out["metadata"]["annotations"]
    valid_pod(out)


def test_an_already_injected_pod_is_left_alone():
    p = pod()
    once = patched(p, answer(p)[0])
    response, verdict = answer(once)
    assert response["allowed"] is True and "patch" not in response
    assert (verdict.outcome, verdict.reason) == ("skipped", "already_injected")


@pytest.mark.parametrize("where", ["annotations", "labels"])
def test_a_pod_that_opts_out_is_admitted_unchanged(where):
    p = pod()
    p["metadata"][where] = {**p["metadata"].get(where, {}), "tollgate.dev/inject": "false"}
    response, verdict = answer(p)
    assert response["allowed"] is True and "patch" not in response
    assert verdict.reason == "opted_out"


def test_the_injectors_own_namespace_is_never_injected():
    response, verdict = answer(pod(), namespace="tollgate-system")
    assert response["allowed"] is True and "patch" not in response and verdict.reason == "own_namespace"


def test_the_opt_in_path_injects_only_pods_that_ask():
    strict = InjectorPolicy(options=POLICY.options, opt_in_only=True)
    assert answer(pod(), strict)[1].reason == "not_opted_in"
    for where in ("labels", "annotations"):
        p = pod()
        p["metadata"].setdefault(where, {})["tollgate.dev/inject"] = "true"
        assert answer(p, strict)[1].outcome == "injected"


# --------------------------------------------------------------------------- refusals: clear, and they name the pod


@pytest.mark.parametrize("change, says", [
    (lambda p: p["spec"].update(hostNetwork=True), "hostNetwork pods share the node's loopback"),
    (lambda p: p["spec"]["containers"][0]["ports"].append({"containerPort": 10000}),
     "container 'app' uses port 10000, which is the gateway's listener"),
    (lambda p: p["spec"]["containers"][0]["ports"].append({"containerPort": 9464}), "the gateway's metrics"),
    (lambda p: p["spec"].update(initContainers=[{"name": "tollgate-envoy", "image": "x"}]),
     "already has a container named 'tollgate-envoy'"),
    (lambda p: p["spec"].update(volumes=[{"name": "tollgate-config", "emptyDir": {}}]),
     "already has a volume named 'tollgate-config'"),
    (lambda p: p["metadata"].update(annotations={"tollgate.dev/envoy-memory": "lots"}), "not a Kubernetes quantity"),
    (lambda p: p["metadata"].update(annotations={"tollgate.dev/config-profil": "x"}),
     "unknown annotation tollgate.dev/config-profil"),
])
def test_a_pod_that_cannot_take_the_sidecar_is_refused_with_the_reason(change, says):
    p = pod()
    change(p)
    response, verdict = answer(p)
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 403
    assert says in response["status"]["message"] and "Pod/web-7d4b9c-" in response["status"]["message"]
    assert verdict.outcome == "refused"


# --------------------------------------------------------------------------- per-pod overrides


def test_annotations_choose_the_config_profile_and_the_sidecars_resources():
    p = pod()
    p["metadata"]["annotations"] = {"tollgate.dev/config-profile": "batch", "tollgate.dev/envoy-cpu": "250m",
                                    "tollgate.dev/extproc-memory-limit": "1Gi"}
    out = patched(p, answer(p)[0])
    by_name = {c["name"]: c for c in out["spec"]["containers"]}
    config = {v["name"]: v for v in out["spec"]["volumes"]}["tollgate-config"]
    assert config["configMap"]["name"] == "tollgate-config-batch"
    assert by_name[ENVOY_CONTAINER]["resources"]["requests"] == {"cpu": "250m", "memory": "64Mi"}
    assert by_name[EXTPROC_CONTAINER]["resources"]["limits"] == {"memory": "1Gi"}
    valid_pod(out)


def test_native_sidecars_per_pod_and_the_fallback_for_clusters_without_them():
    p = pod()
    p["metadata"]["annotations"] = {"tollgate.dev/native-sidecars": "true"}
    out = patched(p, answer(p)[0])
    assert names(out["spec"]["initContainers"]) == OURS
    old_cluster = InjectorPolicy(options=POLICY.options, native_sidecars="none")
    response, verdict = answer(job_pod(), old_cluster)
    assert response["allowed"] is True and "patch" not in response
    assert verdict.reason == "no_native_sidecars" and "keep it from ever finishing" in response["warnings"][0]
    out = patched(pod(), answer(pod(), old_cluster)[0])  # long-running pods get ordinary containers there
    assert names(out["spec"]["containers"]) == [*OURS, "app"] and "initContainers" not in out["spec"]


# --------------------------------------------------------------------------- bad input never breaks the webhook


REVIEW = json.loads(admission_review(pod()))


def without(path: list[str]) -> bytes:
    doc = copy.deepcopy(REVIEW)
    node = doc
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return json.dumps(doc).encode()


@pytest.mark.parametrize("body, reason", [
    (b"", "malformed"),
    (b"{not json", "malformed"),
    (b"\xff\xfe", "malformed"),
    (b"[1, 2]", "malformed"),
    (b"null", "malformed"),
    (json.dumps({**REVIEW, "apiVersion": "admission.k8s.io/v1beta1"}).encode(), "malformed"),
    (json.dumps({**REVIEW, "kind": "ConfigMap"}).encode(), "malformed"),
    (without(["request"]), "malformed"),
    (without(["request", "uid"]), "malformed"),
    (without(["request", "object"]), "malformed"),
    (admission_review({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, kind="ConfigMap"),
     "unknown_kind"),
    (admission_review({"kind": "Pod", "metadata": {}, "spec": {"containers": "not a list"}}), "invalid"),
    (admission_review({"kind": "Pod", "metadata": {}, "spec": {"containers": [42]}}), "error"),
    (admission_review({"kind": "Pod", "metadata": None, "spec": None}), "invalid"),
    (admission_review(pod(), operation="UPDATE"), "not_create"),
])
def test_a_malformed_review_or_an_unknown_kind_gets_a_pass_through_answer_with_a_message(body, reason):
    doc, verdict = review(body, POLICY)
    response = doc["response"]
    assert verdict.reason == reason
    if verdict.outcome == "refused":  # a pod the sidecar cannot be added to: denied, with the reason
        assert response["allowed"] is False and response["status"]["message"]
    else:
        assert response["allowed"] is True and "patch" not in response
        assert response["status"]["message"].startswith("tollgate injector: ")


# --------------------------------------------------------------------------- the patch itself


def test_the_patch_escapes_keys_and_turns_one_document_into_the_other():
    old = {"metadata": {"annotations": {"a/b": "1", "c~d": "2"}}, "spec": {"x": [1, 2], "gone": True}}
    new = {"metadata": {"annotations": {"a/b": "3", "c~d": "2", "e/f": "4"}}, "spec": {"x": [2]}, "more": {}}
    ops = json_patch(old, new)
    assert {"op": "replace", "path": "/metadata/annotations/a~1b", "value": "3"} in ops
    assert jsonpatch.apply_patch(old, ops) == new
    assert json_patch(new, new) == []
