"""The injected pod as written: its containers' commands, probes and hooks, run here as processes.

No kubelet is involved: the test plays it. It renders a ConfigMap, injects a Deployment, lays the pod's
mounts out in a temp dir (the only change to the manifest is that path prefix, plus the hooks' 5-second
minimum wait cut to a fraction so the test stays short), starts both containers from their `command`,
runs postStart, the readiness and liveness probes, sends traffic, then runs preStop while a stream is
in flight and checks that it waits for the stream before the containers get SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from extproc.config import parse_config
from extproc.control.envoy_config import render_yaml
from extproc.kube.inject import (
    CONFIG_DIR,
    ENVOY_CONTAINER,
    EXTPROC_CONTAINER,
    RUNTIME_DIR,
    SECRETS_DIR,
    InjectOptions,
    check_config,
    inject,
    render_configmap,
)
from tests.conftest import OPENAI_KEY
from tests.fake_provider import Behaviour
from tests.harness import ENVOY, TOLLGATE, free_port

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "hi"}]


class Pod:
    """The two gateway containers of an injected pod, with the pod's mounts under ``root``."""

    def __init__(self, root: Path, containers: dict[str, dict[str, Any]], configmap: dict[str, Any],
                 keys: dict[str, str]) -> None:
        self.root = root
        root.mkdir()
        self.mounts = {SECRETS_DIR: root / "secrets", CONFIG_DIR: root / "config", RUNTIME_DIR: root / "run"}
        for d in self.mounts.values():
            d.mkdir()
        (root / "tmp").mkdir()
        for name, text in configmap["data"].items():
            (self.mounts[CONFIG_DIR] / name).write_text(self.local(text))
        for name, key in keys.items():
            (self.mounts[SECRETS_DIR] / name).write_text(key + "\n")
        self.containers = containers
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def local(self, text: str) -> str:
        for pod_path in sorted(self.mounts, key=len, reverse=True):
            text = text.replace(pod_path, str(self.mounts[pod_path]))
        return text

    def argv(self, command: list[str]) -> list[str]:
        exe = {"python": sys.executable, "tollgate": TOLLGATE, "envoy": ENVOY}[command[0]]
        args = [self.local(a) for a in command[1:]]
        if "--min-wait" in args:
            args[args.index("--min-wait") + 1] = "0.3"
        return [exe, *args]

    def env(self, container: str) -> dict[str, str]:
        env = {e["name"]: e["value"] for e in self.containers[container].get("env", [])}
        env["HOME"] = str(self.root / "tmp")
        return {**os.environ, **env, "TOLLGATE_NO_UVLOOP": ""}

    def start(self, container: str) -> None:
        log = (self.root / f"{container}.log").open("ab")
        self.procs[container] = subprocess.Popen(self.argv(self.containers[container]["command"]),
                                                 env=self.env(container), stdout=log, stderr=subprocess.STDOUT)

    def run(self, container: str, *where: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """A probe or hook: ``where`` is the path in the container spec, e.g. ("lifecycle", "postStart")."""
        node: Any = self.containers[container]
        for key in where:
            node = node[key]
        return subprocess.run(self.argv(node["exec"]["command"]), env=self.env(container), capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> dict[str, int]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait(5)
        return codes

    def log(self, container: str) -> str:
        return (self.root / f"{container}.log").read_text(errors="replace")


@pytest.fixture
def pod(tmp_path, fake_openai):
    listen, admin, metrics = free_port(), free_port(), free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": listen},
        "extproc": {"unix_socket": f"{RUNTIME_DIR}/extproc.sock"},
        "metrics": {"host": "127.0.0.1", "port": metrics},  # a pod binds 0.0.0.0; a test stays on loopback
        "envoy": {"admin": {"host": "127.0.0.1", "port": admin}},
        "providers": {"openai": {"type": "openai", "base_url": fake_openai.base_url + "/v1",
                                 "api_key": {"file": f"{SECRETS_DIR}/openai-api-key"}}},
        "models": {"gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}},
    }
    text = yaml.safe_dump(config, sort_keys=False)
    cfg = parse_config(text, env={})
    assert check_config(cfg) == ["metrics: bind 0.0.0.0 (or the pod IP) so that Prometheus can scrape it"]
    configmap = render_configmap(text, render_yaml(cfg), "tollgate-config")
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
                  "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "app:1"}]}}}}
    (injected,) = inject([deployment], InjectOptions.from_config(cfg))
    containers = {c["name"]: c for c in injected["spec"]["template"]["spec"]["containers"]}
    p = Pod(tmp_path / "pod", containers, configmap, {"openai-api-key": OPENAI_KEY})
    p.listen, p.metrics = listen, metrics  # type: ignore[attr-defined]
    yield p
    p.stop()


def test_the_injected_pod_starts_serves_and_drains_as_its_manifest_says(pod, fake_openai):
    # start-up, as the kubelet does it: each container, then its postStart hook, before the next one
    for name in (EXTPROC_CONTAINER, ENVOY_CONTAINER):
        pod.start(name)
        hook = pod.run(name, "lifecycle", "postStart")
        assert hook.returncode == 0 and hook.stderr == "", pod.log(name)
    for name in (EXTPROC_CONTAINER, ENVOY_CONTAINER):
        for probe in ("readinessProbe", "livenessProbe"):
            r = pod.run(name, probe)
            assert r.returncode == 0, f"{name} {probe}: {r.stderr}"

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{pod.listen}/v1", api_key="unused", max_retries=0)
    assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content
    assert fake_openai.requests[-1].headers["authorization"] == f"Bearer {OPENAI_KEY}"  # read from the key file
    with urllib.request.urlopen(f"http://127.0.0.1:{pod.metrics}/metrics", timeout=5) as r:
        assert b"tollgate_requests_total" in r.read()

    # shutdown: a 2-second stream is in flight when the pod is deleted
    fake_openai.default = Behaviour(chunks=10, token_delay=0.2)
    finished: list[float] = []

    def stream() -> None:
        list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
        finished.append(time.monotonic())

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)
    hooks = {name: threading.Thread(target=pod.run, args=(name, "lifecycle", "preStop")) for name in
             (EXTPROC_CONTAINER, ENVOY_CONTAINER)}
    for h in hooks.values():
        h.start()
    for h in hooks.values():
        h.join(60)
    hooks_done = time.monotonic()
    t.join(10)
    assert finished and finished[0] <= hooks_done, "preStop returned while a stream was still in flight"
    assert pod.stop() == {EXTPROC_CONTAINER: 0, ENVOY_CONTAINER: 0}
    r = pod.run(EXTPROC_CONTAINER, "readinessProbe")
    assert r.returncode == 1 and "ext_proc at unix:" in r.stderr
