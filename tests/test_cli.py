"""The `tollgate` command as an operator types it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.harness import TOLLGATE

ROOT = Path(__file__).resolve().parent.parent


def tollgate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOLLGATE, *args], capture_output=True, text=True, input=stdin, cwd=ROOT, timeout=120)


def test_inject_prints_the_injected_manifests():
    r = tollgate("inject", "-f", "k8s/examples/app.yaml", "--config", "k8s/examples/gateway.yaml")
    assert r.returncode == 0, r.stderr
    expected = (ROOT / "k8s/examples/app.injected.yaml").read_text().split("\n", 1)[1]  # minus the generated-by line
    assert r.stdout == expected


def test_inject_reads_standard_input_and_refuses_bad_options():
    app = (ROOT / "k8s/examples/app.yaml").read_text()
    assert "tollgate-envoy" in tollgate("inject", "-f", "-", stdin=app).stdout
    r = tollgate("inject", "-f", "-", "--image", "has space", stdin=app)
    assert r.returncode == 2 and "image" in r.stderr


def test_validate_checks_the_config_and_its_envoy_rendering():
    r = tollgate("validate", "--config", "envoy/gateway.example.yaml")
    assert r.returncode == 0 and "OK (3 models, 3 providers)" in r.stdout


def test_a_bad_config_is_reported_with_its_key_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  p: {type: nope}\nmodels: {}\n")
    r = tollgate("validate", "--config", str(bad))
    assert r.returncode == 2
    assert "providers.p.type: unknown provider type 'nope'" in r.stderr and "(line 2)" in r.stderr
