"""Sidecar injection: what a pod gets, what it never gets, and every manifest in k8s/ against Kubernetes' schemas.

The schemas come from kubernetes-validate (bundled, offline). ``python -m tests.test_inject`` rewrites the
generated examples (k8s/examples/configmap.yaml and app.injected.yaml) after a change.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from extproc.config import load_config, parse_config
from extproc.control.envoy_config import render_yaml
from extproc.kube.inject import (
    DEFAULT_CONTAINER,
    ENVOY_CONTAINER,
    EXTPROC_CONTAINER,
    INJECT,
    INJECTED,
    METRICS_PORT_NAME,
    SECRETS_DIR,
    InjectError,
    InjectOptions,
    check_config,
    dump_manifests,
    inject,
    inject_yaml,
    load_manifests,
    render_configmap,
)
from tests.conftest import ANTHROPIC_KEY, AZURE_KEY, OPENAI_KEY
from tests.harness import ENVOY

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
EXAMPLES = K8S / "examples"
OURS = (EXTPROC_CONTAINER, ENVOY_CONTAINER)
K8S_VERSIONS = ("1.29", "1.37")  # 1.29: native sidecars (used for Jobs) are on by default from here
GENERATED = "# Generated from {src} by extproc.kube.inject (`python -m tests.test_inject` rewrites it); do not edit.\n"


# --------------------------------------------------------------------------- the generated examples


def example_config_text() -> str:
    return (EXAMPLES / "gateway.yaml").read_text()


def example_options() -> InjectOptions:
    return InjectOptions.from_config(parse_config(example_config_text(), source="tollgate.yaml", env={}))


def generated_files() -> dict[Path, str]:
    text = example_config_text()
    envoy = render_yaml(parse_config(text, source="tollgate.yaml", env={}))
    configmap = dump_manifests([render_configmap(text, envoy, "tollgate-config")])
    injected = inject_yaml((EXAMPLES / "app.yaml").read_text(), example_options())
    return {
        EXAMPLES / "configmap.yaml": GENERATED.format(src="k8s/examples/gateway.yaml") + configmap,
        EXAMPLES / "app.injected.yaml": GENERATED.format(src="k8s/examples/app.yaml") + injected,
    }


@pytest.mark.parametrize("path", list(generated_files()), ids=lambda p: p.name)
def test_the_generated_examples_are_in_step_with_the_injector(path):
    assert path.read_text() == generated_files()[path], f"{path.name} is stale: run `python -m tests.test_inject`"


def test_the_configmap_example_passes_envoy_validate(tmp_path):
    (cm,) = load_manifests((EXAMPLES / "configmap.yaml").read_text())
    out = tmp_path / "envoy.yaml"
    out.write_text(cm["data"]["envoy.yaml"])
    r = subprocess.run([ENVOY, "--mode", "validate", "-c", str(out), "-l", "error"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_example_gateway_config_is_fit_for_a_pod_and_the_repo_example_is_not():
    assert check_config(parse_config(example_config_text(), env={}), example_options()) == []
    problems = "\n".join(check_config(load_config(ROOT / "envoy" / "gateway.example.yaml", env={})))
    assert "env:OPENAI_API_KEY is not set in the injected container" in problems
    assert "unix_socket: /run/tollgate/extproc.sock" in problems  # ext_proc on TCP
    assert "metrics: bind 0.0.0.0" in problems


def test_options_that_disagree_with_the_config_are_reported():
    cfg = parse_config(example_config_text(), env={})
    assert check_config(cfg, InjectOptions.from_config(cfg, listen_port=8080)) == [
        "option listen_port=8080 disagrees with the config (10000)"
    ]


# --------------------------------------------------------------------------- what a pod gets


def deployment(**template_meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}, **template_meta},
                "spec": {"containers": [{"name": "app", "image": "registry.example.com/web:1"}]},
            },
        },
    }


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "Pod": lambda o: o["spec"],
        "CronJob": lambda o: o["spec"]["jobTemplate"]["spec"]["template"]["spec"],
    }.get(obj["kind"], lambda o: o["spec"]["template"]["spec"])(obj)


def pod_meta(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return obj["metadata"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]
    return obj["spec"]["template"]["metadata"]


def sidecars(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod_spec(obj)
    every = spec.get("initContainers", []) + spec["containers"]
    return {c["name"]: c for c in every if c["name"] in OURS}


def one(obj: dict[str, Any], opts: InjectOptions | None = None) -> dict[str, Any]:
    (out,) = inject([obj], opts or InjectOptions())
    return out


def test_a_deployment_gets_both_containers_first_and_keeps_its_own_as_the_default():
    out = one(deployment())
    spec = pod_spec(out)
    assert [c["name"] for c in spec["containers"]] == [EXTPROC_CONTAINER, ENVOY_CONTAINER, "app"]
    assert "initContainers" not in spec
    meta = pod_meta(out)
    assert meta["annotations"][INJECTED] == "true"
    assert meta["annotations"][DEFAULT_CONTAINER] == "app"  # kubectl logs/exec still land in the app
    assert meta["labels"] == {"app": "web"}
    envoy, ext = spec["containers"][1], spec["containers"][0]
    assert envoy["command"][:3] == ["envoy", "-c", "/etc/tollgate/envoy.yaml"]
    assert ext["command"][:4] == ["tollgate", "extproc", "--config", "/etc/tollgate/tollgate.yaml"]


def test_injecting_twice_changes_nothing():
    docs = load_manifests((EXAMPLES / "app.yaml").read_text()) + [deployment()]
    once = inject(docs, InjectOptions())
    assert inject(once, InjectOptions()) == once
    assert inject(once, InjectOptions(image="other:2", drain_seconds=5)) == once  # the annotation decides


def test_the_input_is_not_modified():
    docs = load_manifests((EXAMPLES / "app.yaml").read_text())
    before = copy.deepcopy(docs)
    inject(docs, InjectOptions())
    assert docs == before


@pytest.mark.parametrize("where", ["pod template", "workload"])
def test_an_opt_out_annotation_leaves_the_workload_alone(where):
    d = deployment()
    meta = pod_meta(d) if where == "pod template" else d["metadata"]
    meta["annotations"] = {INJECT: "false"}
    assert one(d) == d


@pytest.mark.parametrize("obj", [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}},
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "k"}, "stringData": {"a": "b"}},
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}},
    {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
     "spec": {"template": {"spec": {"containers": [{"name": "x"}]}}}},
], ids=lambda o: o["kind"])
def test_objects_that_are_not_workloads_pass_through_unchanged(obj):
    assert one(obj) == obj


def workloads() -> list[dict[str, Any]]:
    template = {"metadata": {"labels": {"app": "w"}}, "spec": {"containers": [{"name": "app", "image": "i:1"}]}}
    job_template = copy.deepcopy(template)
    job_template["spec"]["restartPolicy"] = "Never"
    sel = {"selector": {"matchLabels": {"app": "w"}}}
    meta = {"name": "w"}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {**sel, "template": template}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta,
         "spec": {**sel, "serviceName": "w", "template": template}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta, "spec": {**sel, "template": template}},
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": meta, "spec": {**sel, "template": template}},
        {"apiVersion": "v1", "kind": "ReplicationController", "metadata": meta,
         "spec": {"selector": {"app": "w"}, "template": template}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {"template": job_template}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta,
         "spec": {"schedule": "@hourly", "jobTemplate": {"spec": {"template": job_template}}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {**meta, "labels": {"app": "w"}}, "spec": template["spec"]},
    ]


@pytest.mark.parametrize("obj", workloads(), ids=lambda o: o["kind"])
def test_every_kind_of_workload_gets_the_sidecar(obj):
    out = one(obj)
    assert set(sidecars(out)) == set(OURS)
    assert pod_meta(out)["annotations"][INJECTED] == "true"
    assert one(out) == out


@pytest.mark.parametrize("obj", workloads(), ids=lambda o: o["kind"])
def test_pods_that_run_to_completion_get_native_sidecars_so_that_the_job_can_finish(obj):
    spec = pod_spec(one(obj))
    runs_to_completion = obj["kind"] in ("Job", "CronJob")
    init = [c["name"] for c in spec.get("initContainers", [])]
    if runs_to_completion:
        assert init == list(OURS) and [c["name"] for c in spec["containers"]] == ["app"]
        assert all(c["restartPolicy"] == "Always" for c in spec["initContainers"])
    else:
        assert init == [] and all("restartPolicy" not in c for c in spec["containers"])


def test_native_sidecars_can_be_chosen_for_long_running_pods_too():
    spec = pod_spec(one(deployment(), InjectOptions(native_sidecars=True)))
    assert [c["name"] for c in spec["initContainers"]] == list(OURS)
    assert [c["name"] for c in spec["containers"]] == ["app"]


def test_a_list_of_objects_is_injected_item_by_item():
    out = one({"apiVersion": "v1", "kind": "List", "items": [deployment(), {"apiVersion": "v1", "kind": "Namespace"}]})
    assert set(sidecars(out["items"][0])) == set(OURS)
    assert out["items"][1] == {"apiVersion": "v1", "kind": "Namespace"}


def test_volumes_mounts_and_ports():
    opts = InjectOptions(config_map="gw-config", secret="gw-keys", metrics_port=9999)
    out = one(deployment(), opts)
    volumes = {v["name"]: v for v in pod_spec(out)["volumes"]}
    assert volumes["tollgate-config"]["configMap"]["name"] == "gw-config"
    assert volumes["tollgate-keys"]["secret"]["secretName"] == "gw-keys"
    assert volumes["tollgate-run"]["emptyDir"]["medium"] == "Memory"
    c = sidecars(out)
    for container in c.values():
        for m in container["volumeMounts"]:
            assert m["name"] in volumes
        assert {"name": "tollgate-config", "mountPath": "/etc/tollgate", "readOnly": True} in container["volumeMounts"]
        assert {"name": "tollgate-run", "mountPath": "/run/tollgate"} in container["volumeMounts"]
    assert c[EXTPROC_CONTAINER]["ports"] == [{"name": METRICS_PORT_NAME, "containerPort": 9999, "protocol": "TCP"}]
    assert "ports" not in c[ENVOY_CONTAINER]  # Envoy's listener is on loopback: nothing to declare


def test_provider_keys_are_mounted_read_only_and_only_where_they_are_used():
    out = one(deployment())
    volumes = {v["name"]: v for v in pod_spec(out)["volumes"]}
    assert volumes["tollgate-keys"]["secret"]["defaultMode"] == 0o444
    c = sidecars(out)
    key_mounts = [m for m in c[EXTPROC_CONTAINER]["volumeMounts"] if m["name"] == "tollgate-keys"]
    assert key_mounts == [{"name": "tollgate-keys", "mountPath": SECRETS_DIR, "readOnly": True}]
    assert all(m["name"] != "tollgate-keys" for m in c[ENVOY_CONTAINER]["volumeMounts"])
    for container in c.values():
        assert all("value" in e and "KEY" not in e["name"] for e in container["env"])  # no key by env


def test_without_a_secret_there_is_no_key_volume():
    out = one(deployment(), InjectOptions(secret=None))
    assert "tollgate-keys" not in {v["name"] for v in pod_spec(out)["volumes"]}


def probe_commands(container: dict[str, Any]) -> dict[str, list[str]]:
    out = {}
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) - {"initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold"} == {"exec"}
        out[kind] = probe["exec"]["command"]
    for hook in ("postStart", "preStop"):
        out[hook] = container["lifecycle"][hook]["exec"]["command"]
    return out


def test_probes_and_hooks_run_inside_the_pod_against_the_configured_ports():
    opts = InjectOptions(listen_port=18000, admin_port=19901, extproc_target="127.0.0.1:15051", drain_seconds=300)
    c = sidecars(one(deployment(), opts))
    ext, envoy = probe_commands(c[EXTPROC_CONTAINER]), probe_commands(c[ENVOY_CONTAINER])
    for commands in (ext, envoy):
        assert all(cmd[:3] == ["python", "-m", "extproc.kube.probe"] for cmd in commands.values())
        assert commands["preStop"][3:] == ["wait-idle", "--admin", "127.0.0.1:19901", "--min-wait", "5",
                                           "--max-wait", "300"]
    assert ext["readinessProbe"][3:] == ["extproc", "--target", "127.0.0.1:15051"]
    assert ext["livenessProbe"][3:] == ["extproc", "--target", "127.0.0.1:15051", "--alive"]
    assert envoy["readinessProbe"][3:] == ["envoy", "--admin", "127.0.0.1:19901", "--listener", "127.0.0.1:18000"]
    assert envoy["postStart"][3:] == ["wait-ready", "--admin", "127.0.0.1:19901", "--listener", "127.0.0.1:18000",
                                      "--timeout", "60"]


def test_the_grace_period_covers_the_drain_and_never_shortens_the_apps():
    opts = InjectOptions(drain_seconds=200)
    spec = pod_spec(one(deployment(), opts))
    assert spec["terminationGracePeriodSeconds"] >= 200 + 10  # preStop wait, then tollgate's own --grace 10
    longer = deployment()
    pod_spec(longer)["terminationGracePeriodSeconds"] = 900
    assert pod_spec(one(longer, opts))["terminationGracePeriodSeconds"] == 900


def test_every_injected_container_is_locked_down():
    for c in sidecars(one(deployment())).values():
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "limits" in c["resources"] and "requests" in c["resources"]
        assert {"name": "tollgate-tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # the one writable scratch dir


def test_prometheus_annotations_are_added_but_an_apps_own_are_kept():
    assert {k: v for k, v in pod_meta(one(deployment()))["annotations"].items() if k.startswith("prometheus.io/")} == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9464", "prometheus.io/path": "/metrics"}
    own = {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/actuator/prometheus"}
    annotations = pod_meta(one(deployment(annotations=dict(own))))["annotations"]
    assert {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")} == own


def test_resources_and_image_come_from_the_options():
    res = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
    c = sidecars(one(deployment(), InjectOptions(image="registry.example.com/tollgate:9", extproc_resources=res,
                                                   image_pull_policy="Always")))
    assert c[EXTPROC_CONTAINER]["resources"] == res
    assert c[ENVOY_CONTAINER]["resources"]["requests"] == {"cpu": "100m", "memory": "64Mi"}
    assert {x["image"] for x in c.values()} == {"registry.example.com/tollgate:9"}
    assert {x["imagePullPolicy"] for x in c.values()} == {"Always"}


@pytest.mark.parametrize("change, message", [
    (lambda d: pod_spec(d)["containers"].append({"name": "tollgate", "image": "x"}), "container named 'tollgate'"),
    (lambda d: pod_spec(d).__setitem__("volumes", [{"name": "tollgate-run", "emptyDir": {}}]), "volume named"),
    (lambda d: pod_spec(d).__setitem__("hostNetwork", True), "hostNetwork"),
    (lambda d: pod_spec(d).__setitem__("containers", []), "no containers"),
    (lambda d: d["spec"].pop("template"), "no pod template at spec.template"),
], ids=["container-clash", "volume-clash", "host-network", "no-containers", "no-template"])
def test_what_cannot_be_injected_is_refused_with_the_objects_name(change, message):
    d = deployment()
    change(d)
    with pytest.raises(InjectError, match=message) as e:
        inject([d], InjectOptions())
    assert "Deployment/web" in str(e.value)


@pytest.mark.parametrize("kw", [
    {"image": ""}, {"image": "a b"}, {"config_map": "Not_A_Name"}, {"secret": "UPPER"}, {"listen_port": 0},
    {"metrics_port": 70000}, {"extproc_target": "nowhere"}, {"drain_seconds": -1}, {"metrics_path": "metrics"},
    {"image_pull_policy": "Sometimes"},
])
def test_bad_options_are_refused(kw):
    with pytest.raises(InjectError):
        InjectOptions(**kw)


def test_yaml_in_and_out():
    text = inject_yaml("---\n" + (EXAMPLES / "app.yaml").read_text() + "\n---\n", InjectOptions())
    docs = load_manifests(text)
    assert [d["kind"] for d in docs] == ["Service", "Deployment", "CronJob"]
    with pytest.raises(InjectError, match="document 1"):
        load_manifests("- just\n- a list\n")
    with pytest.raises(InjectError, match="not valid YAML"):
        load_manifests("a: [")


# --------------------------------------------------------------------------- secrets never in a manifest

KEY_SHAPES = re.compile(r"sk-[A-Za-z0-9_-]{16,}|sk-ant-[A-Za-z0-9_-]{16,}|\b[0-9a-f]{32}\b")


def test_no_provider_key_ever_reaches_a_manifest(tmp_path, monkeypatch):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, key in (("openai", OPENAI_KEY), ("azure", AZURE_KEY), ("anthropic", ANTHROPIC_KEY)):
        (secrets / name).write_text(key)
        monkeypatch.setenv(f"{name.upper()}_CANARY", key)
    text = example_config_text().replace("/var/run/secrets/tollgate/openai-api-key", str(secrets / "openai"))
    config = tmp_path / "tollgate.yaml"
    config.write_text(text)
    cfg = load_config(config)
    manifests = dump_manifests(
        [render_configmap(text, render_yaml(cfg), "tollgate-config")]
        + inject(load_manifests((EXAMPLES / "app.yaml").read_text()), InjectOptions.from_config(cfg))
    )
    for key in (OPENAI_KEY, AZURE_KEY, ANTHROPIC_KEY):
        assert key not in manifests


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_no_file_in_k8s_holds_anything_shaped_like_a_key(path):
    assert not KEY_SHAPES.findall(path.read_text())


def test_the_secret_template_holds_only_placeholders():
    (secret,) = load_manifests((EXAMPLES / "secret.example.yaml").read_text())
    assert secret["kind"] == "Secret" and "data" not in secret
    assert secret["stringData"] and all(v.startswith("PLACEHOLDER-not-a-real") for v in secret["stringData"].values())
    files = {ref.file for p in parse_config(example_config_text(), env={}).providers.values() for ref in p.api_keys}
    assert files == {f"{SECRETS_DIR}/{k}" for k in secret["stringData"]}  # every key the config reads is there


# --------------------------------------------------------------------------- schemas


# a gateway config; kustomize's own files. The install manifests outside examples/ are checked in tests/kube.
NOT_KUBERNETES_OBJECTS = {"gateway.yaml", "kustomization.yaml"}


def kubernetes_objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        if path.name in NOT_KUBERNETES_OBJECTS:
            continue
        for i, doc in enumerate(load_manifests(path.read_text())):
            out.append((f"{path.relative_to(K8S)}#{i}", doc))
    opts = InjectOptions()
    for obj in workloads():
        out.append((f"injected {obj['kind']}", one(obj, opts)))
    out.append(("injected natively", one(deployment(), InjectOptions(native_sidecars=True, secret=None))))
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name, obj", kubernetes_objects(), ids=[n for n, _ in kubernetes_objects()])
def test_every_manifest_is_valid_for_kubernetes(name, obj, version):
    kubernetes_validate.validate(obj, version, strict=True)  # strict: an unknown field is an error too


SVC_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")  # what a port name may be


@pytest.mark.parametrize("name, obj", kubernetes_objects(), ids=[n for n, _ in kubernetes_objects()])
def test_what_the_schemas_cannot_check(name, obj):
    if obj["kind"] not in ("Deployment", "CronJob", "Job", "StatefulSet", "DaemonSet", "ReplicaSet",
                           "ReplicationController", "Pod"):
        return
    spec = pod_spec(obj)
    containers = spec.get("initContainers", []) + spec["containers"]
    assert len({c["name"] for c in containers}) == len(containers)
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in containers:
        assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes
        for port in c.get("ports", []):
            assert "name" not in port or SVC_NAME.match(port["name"]), port["name"]
    for c in spec["containers"]:
        assert "restartPolicy" not in c  # only init containers may have one


# --------------------------------------------------------------------------- the Prometheus scrape config


def test_the_prometheus_job_finds_what_the_injector_annotates():
    (job,) = yaml.safe_load((K8S / "prometheus-scrape.yaml").read_text())["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    injected = one(deployment())
    annotations = pod_meta(injected)["annotations"]
    assert job["metrics_path"] == annotations["prometheus.io/path"]
    meta_labels = {}
    for rule in job["relabel_configs"]:
        assert set(rule) <= {"source_labels", "regex", "action", "target_label", "replacement", "separator"}
        assert rule.get("action", "replace") in ("keep", "drop", "replace")
        re.compile(rule.get("regex", "(.*)"))
        for label in rule.get("source_labels", []):
            assert label.startswith("__meta_kubernetes_")
        if rule.get("action") in ("keep", "drop"):
            (label,) = rule["source_labels"]
            meta_labels[label] = (rule["action"], rule["regex"])
    sanitized = {"__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
                 for k, v in annotations.items()}
    sanitized["__meta_kubernetes_pod_container_port_name"] = sidecars(injected)[EXTPROC_CONTAINER]["ports"][0]["name"]
    sanitized["__meta_kubernetes_pod_phase"] = "Running"
    for label, (action, regex) in meta_labels.items():
        matches = re.fullmatch(regex, sanitized.get(label, "")) is not None
        assert matches == (action == "keep"), f"an injected pod would be dropped by the rule on {label}"


# --------------------------------------------------------------------------- regenerate


if __name__ == "__main__":
    for target, content in generated_files().items():
        target.write_text(content)
        print(f"wrote {target.relative_to(ROOT)}")


def test_the_sidecar_asks_for_a_core_share_and_memory_per_ext_proc_worker():
    text = example_config_text()
    assert "workers" not in text
    one = InjectOptions.from_config(parse_config(text, source="tollgate.yaml", env={}))
    three = InjectOptions.from_config(parse_config(
        re.sub(r"(?m)^extproc:\s*\{([^}]*)\}", r"extproc: {\1, workers: 3}", text), source="tollgate.yaml", env={}))
    assert one.extproc_resources == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    assert three.extproc_resources == {"requests": {"cpu": "300m", "memory": "384Mi"}, "limits": {"memory": "896Mi"}}
