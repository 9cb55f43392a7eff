"""The LiteLLM proxy as a side-by-side peer: set up from the pinned script, started, never silently absent.

The setup and config are not ours: they live beside the repository, in ``shared/peers/litellm/`` (a
pinned ``litellm[proxy]`` version, one chat model, a master key, no database). This module finds that
directory, creates the peer's venv on first use (the only step that needs the package index; the peer
then runs offline, with LiteLLM's bundled price map), starts one proxy per upstream and waits until it
answers its liveness probe. Whatever goes wrong comes back as one sentence for the report, with the
log to read, so a table can say why the peer's row is missing instead of leaving it out.

Logs stay in ``.bench/`` (ignored by git) after the run, for the post-mortem.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.harness import free_port

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-peer-master-1234"  # the master key start.sh gives the proxy unless told otherwise
MODEL = "gpt-4o-mini"  # the one model in the peer's config
SETUP_TIMEOUT = 900.0  # a fresh venv on 2 busy cores: resolving and installing ~150 wheels
START_TIMEOUT = 240.0  # importing litellm's proxy takes 15-40 s on an idle core, several times that when starved


def find_dir() -> Path | None:
    """``$LITELLM_PEER_DIR``, else ``shared/peers/litellm`` beside this checkout or any directory above it
    (a worktree sits deeper than the main checkout, so ``../shared`` is not always one level up)."""
    if os.environ.get("LITELLM_PEER_DIR"):
        return Path(os.environ["LITELLM_PEER_DIR"])
    for d in REPO.parents:
        if (d / "shared" / "peers" / "litellm" / "start.sh").is_file():
            return d / "shared" / "peers" / "litellm"
    return None


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " / ".join(line.strip()[:200] for line in text[-lines:]) or "(empty log)"


@dataclass
class Peer:
    """Where the peer's venv is (or will be), where its pinned setup lives, and where its logs go."""

    venv: Path
    home: Path | None
    logs: Path

    @classmethod
    def default(cls) -> Peer:
        venv = Path(os.environ.get("LITELLM_VENV", REPO / ".bench" / "litellm-venv"))
        return cls(venv=venv, home=find_dir(), logs=REPO / ".bench")

    def version(self) -> str:
        found = sorted(self.venv.glob("lib/python3*/site-packages/litellm-*.dist-info"))
        return found[-1].name.removeprefix("litellm-").removesuffix(".dist-info") if found else "?"

    def setup(self) -> str | None:
        """Create the peer's venv if it is missing; None when ready, else why it is not."""
        if self.home is None:
            return ("LiteLLM peer not available: no shared/peers/litellm/ beside this checkout "
                    "(set LITELLM_PEER_DIR)")
        if (self.venv / "bin" / "litellm").exists():
            return None
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / "litellm-setup.log"
        try:
            with log.open("wb") as out:
                r = subprocess.run(["bash", str(self.home / "setup.sh")], env={**os.environ, "VENV": str(self.venv)},
                                   stdout=out, stderr=subprocess.STDOUT, timeout=SETUP_TIMEOUT, cwd=REPO)
        except subprocess.TimeoutExpired:
            return f"LiteLLM peer could not be set up within {SETUP_TIMEOUT:.0f} s (log: {log})"
        if r.returncode != 0 or not (self.venv / "bin" / "litellm").exists():
            return f"LiteLLM peer could not be set up (exit {r.returncode}, log {log}): {_tail(log)}"
        return None

    def start(self, upstream_port: int, port: int | None = None) -> tuple[subprocess.Popen[bytes] | None, int, str]:
        """One proxy in front of ``upstream_port``: (process, port, note). The process is None when it did
        not come up, and the note says why (its exit code, or the time waited, and its log's last lines)."""
        why = self.setup()
        if why is not None:
            return None, 0, why
        assert self.home is not None
        port = port or free_port()
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"litellm-{port}.log"
        env = {**os.environ, "VENV": str(self.venv), "PORT": str(port), "MAX_SECONDS": "1800",
               "UPSTREAM": f"http://127.0.0.1:{upstream_port}/v1", "LITELLM_MASTER_KEY": KEY}
        # its own session, so that stopping it reaches the proxy behind start.sh's `timeout` as well
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            p = subprocess.Popen(["bash", str(self.home / "start.sh")], env=env, start_new_session=True,
                                 stdout=out, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_TIMEOUT:
            if p.poll() is not None:
                stop(p)  # whatever it left behind in its session
                return None, 0, f"LiteLLM peer exited with {p.returncode} while starting (log {log}): {_tail(log)}"
            if _alive(port):
                return p, port, f"LiteLLM {self.version()} proxy, 1 worker, no database (ready in {time.monotonic() - t0:.0f} s)"
            time.sleep(0.5)
        stop(p)
        return None, 0, f"LiteLLM peer did not answer its liveness probe within {START_TIMEOUT:.0f} s (log {log}): {_tail(log)}"


def _alive(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness", timeout=2) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def stop(p: subprocess.Popen[bytes] | None) -> None:
    """Stop one proxy we started: SIGTERM to its session (start.sh's `timeout` and the proxy behind it),
    SIGKILL to whatever of that session is left after 15 s."""
    if p is None:
        return
    group = p.pid  # started with start_new_session: its pid is the session's process group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        p.poll()  # reap it, or its zombie keeps the group alive
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(5)
