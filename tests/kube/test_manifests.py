"""The install manifests in k8s/: what `kubectl apply -k k8s/` would create, checked offline.

There is no kustomize binary here, so ``build`` resolves the kustomizations itself, for exactly the
features they use (resources, components, JSON 6902 patches, a ConfigMap generator) and refuses any
other key, so that a kustomization cannot silently grow past what is checked. Every object is then
validated against Kubernetes' schemas (kubernetes-validate, strict) for 1.29 and 1.37; cert-manager's
objects, whose schemas are not bundled, are checked for the fields that tie them to the rest. Then what
no schema can see: the webhook reaches the Service, the Service the container, the command line parses
with the real CLI, the Secret names agree across the two certificate paths, RBAC grants no more than
the code calls.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from extproc.cli import _parser
from extproc.kube.certs import service_names
from extproc.kube.injector import Injector, InjectorMetrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
VERSIONS = ("1.29", "1.37")
NOT_INSTALLED = {  # files in k8s/ that no kustomization applies, and why
    "examples/app.injected.yaml": "the output of `tollgate inject` for clusters without the injector",
    "examples/gateway.yaml": "a gateway config (inside configmap.yaml)",
    "mesh/istio-envoyfilter.yaml": "rendered for mesh operators to apply themselves",
    "mesh/envoy-gateway-policy.yaml": "rendered for mesh operators to apply themselves",
}
KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "configMapGenerator", "generatorOptions"}


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def build(where: Path, *, components: list[str] | None = None, used: set[Path] | None = None) -> list[dict[str, Any]]:
    """The objects a kustomization directory produces (``components`` replaces its own list)."""
    used = used if used is not None else set()
    k = yaml.safe_load((where / "kustomization.yaml").read_text())
    assert set(k) <= KUSTOMIZE_KEYS, f"{where}: kustomize features this test does not resolve: {set(k) - KUSTOMIZE_KEYS}"
    used.add(where / "kustomization.yaml")
    objects: list[dict[str, Any]] = []
    for item in k.get("resources") or []:
        path = (where / item).resolve()
        if path.is_dir():
            objects += build(path, used=used)
        else:
            used.add(path)
            objects += load(path)
    options = k.get("generatorOptions") or {}
    for gen in k.get("configMapGenerator") or []:
        assert options.get("disableNameSuffixHash") is True  # names the manifests refer to stay as written
        data = {}
        for f in gen["files"]:
            used.add((where / f).resolve())
            data[Path(f).name] = (where / f).read_text()
        meta = {"name": gen["name"], "namespace": gen["namespace"], "labels": gen["options"]["labels"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for comp in components if components is not None else k.get("components") or []:
        c = (where / comp).resolve()
        ck = yaml.safe_load((c / "kustomization.yaml").read_text())
        assert ck["kind"] == "Component" and set(ck) <= KUSTOMIZE_KEYS
        used.add(c / "kustomization.yaml")
        for item in ck.get("resources") or []:
            used.add(c / item)
            objects += load(c / item)
        objects = apply_patches(objects, c, ck.get("patches") or [], used)
    return apply_patches(objects, where, k.get("patches") or [], used)


def apply_patches(objects: list[dict[str, Any]], where: Path, patches: list[dict[str, Any]],
                  used: set[Path]) -> list[dict[str, Any]]:
    out = copy.deepcopy(objects)
    for p in patches:
        used.add(where / p["path"])
        ops = yaml.safe_load((where / p["path"]).read_text())
        hits = [i for i, o in enumerate(out) if o["kind"] == p["target"]["kind"]
                and o["metadata"]["name"] == p["target"]["name"]]
        assert len(hits) == 1, f"patch {p['path']} matches {len(hits)} objects"
        out[hits[0]] = jsonpatch.apply_patch(out[hits[0]], ops)
    return out


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (hit,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return hit


DEFAULT = build(K8S)
SELF_SIGNED = build(K8S, components=["self-signed"])
EXAMPLES = build(K8S / "examples")
ALL = [("default", o) for o in DEFAULT] + [("self-signed", o) for o in SELF_SIGNED if o not in DEFAULT] + \
      [("examples", o) for o in EXAMPLES]


def ident(o: tuple[str, dict[str, Any]]) -> str:
    return f"{o[0]}:{o[1]['kind']}/{o[1]['metadata']['name']}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant, obj", [o for o in ALL if o[1]["apiVersion"] != "cert-manager.io/v1"],
                         ids=[ident(o) for o in ALL if o[1]["apiVersion"] != "cert-manager.io/v1"])
def test_every_installed_object_is_valid_for_kubernetes(variant, obj, version):
    kubernetes_validate.validate(obj, version, strict=True)


def test_every_file_in_k8s_is_installed_or_says_why_not():
    used: set[Path] = set()
    build(K8S, used=used)
    build(K8S, components=["self-signed"], used=used)
    build(K8S / "examples", used=used)
    files = {p.relative_to(K8S).as_posix() for p in K8S.rglob("*") if p.suffix in (".yaml", ".json")}
    installed = {p.resolve().relative_to(K8S.resolve()).as_posix() for p in used}
    assert files - installed == set(NOT_INSTALLED)


def test_both_certificate_paths_install_the_same_injector():
    def core(objects):  # everything but the certificate machinery
        return [o for o in objects if o["apiVersion"] != "cert-manager.io/v1" and "certs" not in o["metadata"]["name"]
                and o["kind"] != "MutatingWebhookConfiguration"]
    assert core(DEFAULT) == core(SELF_SIGNED)


# --------------------------------------------------------------------------- the webhook reaches the injector


def injector_args(objects: list[dict[str, Any]]) -> Any:
    (c,) = find(objects, "Deployment", "tollgate-injector")["spec"]["template"]["spec"]["containers"]
    assert c["command"][0] == "tollgate"
    return _parser().parse_args(c["command"][1:]), c


def test_the_webhooks_reach_the_injectors_https_port_and_paths():
    hooks = find(DEFAULT, "MutatingWebhookConfiguration", "tollgate-injector")["webhooks"]
    service = find(DEFAULT, "Service", "tollgate-injector")
    args, container = injector_args(DEFAULT)
    routes = {r.resource.canonical for r in Injector.__new__(Injector).webhook_app().router.routes()
              if r.method == "POST"}
    for hook in hooks:
        svc = hook["clientConfig"]["service"]
        assert (svc["name"], svc["namespace"]) == (service["metadata"]["name"], service["metadata"]["namespace"])
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == svc["port"]]
        (cport,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
        assert cport["containerPort"] == args.port
        assert svc["path"] in routes
    assert {h["clientConfig"]["service"]["path"] for h in hooks} == {"/inject", "/inject-opted-in"}


def test_failure_policy_fail_is_scoped_away_from_the_injectors_namespace_and_kube_system():
    hooks = find(DEFAULT, "MutatingWebhookConfiguration", "tollgate-injector")["webhooks"]
    own = find(DEFAULT, "Deployment", "tollgate-injector")["metadata"]["namespace"]
    for hook in hooks:
        assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None" and hook["timeoutSeconds"] <= 5
        (excluded,) = [e for e in hook["namespaceSelector"]["matchExpressions"]
                       if e["key"] == "kubernetes.io/metadata.name"]
        assert excluded["operator"] == "NotIn" and {own, "kube-system"} <= set(excluded["values"])
        assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                  "resources": ["pods"], "scope": "Namespaced"}]
    by_name = {h["name"]: h for h in hooks}
    assert by_name["namespace.inject.tollgate.dev"]["namespaceSelector"]["matchLabels"] == {
        "tollgate.dev/injection": "enabled"}
    assert by_name["pod.inject.tollgate.dev"]["objectSelector"] == {"matchLabels": {"tollgate.dev/inject": "true"}}


def test_the_injector_runs_two_replicas_guarded_by_a_disruption_budget():
    dep = find(DEFAULT, "Deployment", "tollgate-injector")
    pdb = find(DEFAULT, "PodDisruptionBudget", "tollgate-injector")
    assert dep["spec"]["replicas"] == 2 and pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    probes = dep["spec"]["template"]["spec"]["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"


# --------------------------------------------------------------------------- certificates: both paths, one Secret


def tls_volume(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    args, c = injector_args(objects)
    spec = find(objects, "Deployment", "tollgate-injector")["spec"]["template"]["spec"]
    (mount,) = [m for m in c["volumeMounts"] if args.tls_cert.startswith(m["mountPath"] + "/")]
    assert args.tls_key.startswith(mount["mountPath"] + "/")
    (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert {i["path"] for i in vol["secret"]["items"]} == {"tls.crt", "tls.key"}  # never ca.key
    return vol, vol["secret"]["secretName"]


def test_cert_manager_issues_the_secret_the_injector_mounts_and_injects_its_ca():
    _, secret = tls_volume(DEFAULT)
    cert = find(DEFAULT, "Certificate", "tollgate-injector")
    assert cert["spec"]["secretName"] == secret
    assert set(cert["spec"]["dnsNames"]) <= set(service_names("tollgate-injector", "tollgate-system"))
    assert "tollgate-injector.tollgate-system.svc" in cert["spec"]["dnsNames"]  # the name the API server dials
    issuer = find(DEFAULT, "Issuer", cert["spec"]["issuerRef"]["name"])
    ca_cert = find(DEFAULT, "Certificate", "tollgate-injector-ca")
    assert issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"] and ca_cert["spec"]["isCA"] is True
    find(DEFAULT, "Issuer", ca_cert["spec"]["issuerRef"]["name"])
    hook = find(DEFAULT, "MutatingWebhookConfiguration", "tollgate-injector")
    ns, name = hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    assert (ns, name) == (cert["metadata"]["namespace"], cert["metadata"]["name"])


def test_the_self_signed_jobs_write_the_secret_the_injector_mounts_with_no_more_rights_than_they_use():
    _, secret = tls_volume(SELF_SIGNED)
    job = find(SELF_SIGNED, "Job", "tollgate-injector-certs")
    cron = find(SELF_SIGNED, "CronJob", "tollgate-injector-certs")
    for pod in (job["spec"]["template"]["spec"], cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]):
        (c,) = pod["containers"]
        args = _parser().parse_args(c["command"][1:])
        assert args.command == "injector-certs" and args.secret == secret and args.webhook == "tollgate-injector"
        assert pod["serviceAccountName"] == "tollgate-injector-certs"
        assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in c["env"]
    role = find(SELF_SIGNED, "Role", "tollgate-injector-certs")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret], "verbs": ["get", "update"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    cluster_role = find(SELF_SIGNED, "ClusterRole", "tollgate-injector-certs")
    assert cluster_role["rules"] == [{"apiGroups": ["admissionregistration.k8s.io"],
                                      "resources": ["mutatingwebhookconfigurations"],
                                      "resourceNames": ["tollgate-injector"], "verbs": ["get", "patch"]}]
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        binding = find(SELF_SIGNED, kind, "tollgate-injector-certs")
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tollgate-injector-certs",
                                        "namespace": "tollgate-system"}]
    assert "annotations" not in find(SELF_SIGNED, "MutatingWebhookConfiguration", "tollgate-injector")["metadata"]


def test_the_injector_itself_has_no_api_access():
    sa = find(DEFAULT, "ServiceAccount", "tollgate-injector")
    pod = find(DEFAULT, "Deployment", "tollgate-injector")["spec"]["template"]["spec"]
    assert sa["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False
    bound = [s for o in SELF_SIGNED if o["kind"].endswith("Binding") for s in o["subjects"]]
    assert all(s["name"] != "tollgate-injector" for s in bound)


# --------------------------------------------------------------------------- pods of the install


def pods(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((o["metadata"]["name"], o["spec"]["template"]["spec"]))
        elif o["kind"] == "CronJob":
            out.append((o["metadata"]["name"] + "-cron", o["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


@pytest.mark.parametrize("name, spec", pods(SELF_SIGNED), ids=[n for n, _ in pods(SELF_SIGNED)])
def test_every_pod_of_the_install_meets_the_restricted_pod_security_standard(name, spec):
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
    assert find(DEFAULT, "Namespace", "tollgate-system")["metadata"]["labels"][
        "pod-security.kubernetes.io/enforce"] == "restricted"


def test_redis_persists_with_aof_and_never_evicts():
    sts = find(DEFAULT, "StatefulSet", "tollgate-redis")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    command = " ".join(c["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction", "--dir /data"):
        assert flag in command
    assert "requirepass" in command and "$REDIS_PASSWORD" in command and "--requirepass" not in command
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/data"}
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    svc = find(DEFAULT, "Service", "tollgate-redis")
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_the_monitoring_config_maps_carry_the_repositorys_dashboard_and_scrape_config():
    dash = find(DEFAULT, "ConfigMap", "tollgate-grafana-dashboard")
    assert dash["data"]["grafana-dashboard.json"] == (K8S / "grafana-dashboard.json").read_text()
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    scrape = find(DEFAULT, "ConfigMap", "tollgate-prometheus-scrape")
    assert scrape["data"]["prometheus-scrape.yaml"] == (K8S / "prometheus-scrape.yaml").read_text()


def test_the_metrics_the_deployment_advertises_are_the_injectors():
    dep = find(DEFAULT, "Deployment", "tollgate-injector")
    args, _ = injector_args(DEFAULT)
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(args.health_port)
    names = {m.name for m in InjectorMetrics().registry.collect()}
    assert {"tollgate_injector_admissions", "tollgate_injector_certificate_expiry_timestamp_seconds"} <= names
