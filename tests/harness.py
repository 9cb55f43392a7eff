"""Start the real gateway (Envoy + ext_proc) on free ports, for end-to-end tests.

Nothing here fakes our own code: ``Gateway`` runs ``tollgate run`` (or, for
tests that kill the Python side, ``tollgate extproc`` next to an Envoy started
from ``tollgate render-envoy``) as real processes, and stops them afterwards.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

BIN = Path(sys.executable).parent
TOLLGATE = str(BIN / "tollgate")
ENVOY = str(BIN / "envoy")


def free_port() -> int:
    """A port nobody listens on now (never one of the fixed 10000/50051/9464/9901)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in (10000, 50051, 9464, 9901):
            return port


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


class StartFailed(RuntimeError):
    """A process of the gateway exited while starting."""


def wait_ready(admin_port: int, timeout: float = 30.0, watch: tuple[subprocess.Popen[bytes] | None, ...] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in watch:
            if p is not None and p.poll() is not None:
                raise StartFailed(f"{p.args[0]} exited with code {p.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=0.5) as r:
                if r.status == 200:
                    return
        except (OSError, http.client.HTTPException):  # not up yet, or someone else's server on that port
            time.sleep(0.05)
    raise TimeoutError("envoy did not become ready")


# A port picked free can be taken by another process before the gateway binds it: start again on new ones.
_PORT_TAKEN = ("already in use", "address in use", "cannot listen", "cannot bind", "failed to bind")


class Gateway:
    """One gateway under test. ``config`` is the gateway YAML as a dict, minus the ports."""

    envoy_concurrency = 2  # Envoy's worker threads when split (benches compare others)
    extproc_prefix: tuple[str, ...] = ()  # a command the split ext_proc server runs under (e.g. nice)

    def __init__(self, tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None, split: bool = False):
        self.tmp = tmp
        self.given = dict(config)
        self.config_path = tmp / "tollgate.yaml"
        self._assign_ports()
        self.env = {**os.environ, "TOLLGATE_NO_UVLOOP": "", **(env or {})}
        self.split = split
        self.runtime = tmp / "runtime"
        self.log_path = tmp / "gateway.log"
        self.envoy_log_path = tmp / "envoy.log"
        self.proc: subprocess.Popen[bytes] | None = None  # tollgate run / tollgate extproc
        self.envoy: subprocess.Popen[bytes] | None = None  # only when split
        self.exit_codes: list[tuple[str, int]] = []  # (what, code) of every process of ours that ended
        self.tracebacks_allowed = False  # a test that provokes a logged traceback on purpose says so

    def _assign_ports(self) -> None:
        ports: list[int] = []
        while len(ports) < 4:  # four different ones: two quick picks can return the same free port
            if (p := free_port()) not in ports:
                ports.append(p)
        self.port, self.extproc_port, self.admin_port, self.metrics_port = ports
        config = dict(self.given)
        sock = config.pop("extproc_unix_socket", None)  # test knob: serve ext_proc on a unix socket
        self.config = {
            **config,
            "listen": {"host": "127.0.0.1", "port": self.port},
            "extproc": {"unix_socket": sock} if sock else {"host": "127.0.0.1", "port": self.extproc_port},
            "metrics": {"host": "127.0.0.1", "port": self.metrics_port},
            "envoy": {**config.get("envoy", {}), "admin": {"host": "127.0.0.1", "port": self.admin_port}},
        }
        self.config_path.write_text(yaml.safe_dump(self.config))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Gateway:
        for attempt in range(3):
            try:
                return self._start()
            except StartFailed as e:
                log = (self.log() + self.envoy_log()).lower()
                self.stop()
                self.exit_codes.clear()  # a start that failed on a taken port is retried, not held against the test
                if attempt == 2 or not any(t in log for t in _PORT_TAKEN):
                    raise StartFailed(f"{e}:\n{(self.log() + self.envoy_log())[-3000:]}") from None
                self._assign_ports()
        raise AssertionError("unreachable")

    def envoy_log(self) -> str:
        return self.envoy_log_path.read_text(errors="replace") if self.envoy_log_path.exists() else ""

    def _start(self) -> Gateway:
        self.runtime.mkdir(exist_ok=True)
        if self.split:
            rendered = self.tmp / "envoy.yaml"
            out = subprocess.run(
                [TOLLGATE, "render-envoy", "--config", str(self.config_path), "--demo-socket",
                 str(self.runtime / "demo.sock")],
                check=True, capture_output=True, env=self.env,
            ).stdout
            rendered.write_bytes(out)
            self.start_extproc()
            self.envoy = subprocess.Popen(
                [ENVOY, "-c", str(rendered), "--disable-hot-restart", "--concurrency", str(self.envoy_concurrency),
                 "-l", "warning"],
                stdout=self.envoy_log_path.open("ab"), stderr=subprocess.STDOUT,
            )
            wait_ready(self.admin_port, watch=(self.proc, self.envoy))
        else:
            self.proc = subprocess.Popen(
                [TOLLGATE, "run", "--config", str(self.config_path), "--runtime-dir", str(self.runtime), "--grace", "5"],
                stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT, env=self.env,
            )
            wait_ready(self.admin_port, watch=(self.proc,))
        wait_port(self.port)
        return self

    def start_extproc(self) -> None:
        self.proc = subprocess.Popen(
            [*self.extproc_prefix, TOLLGATE, "extproc", "--config", str(self.config_path), "--runtime-dir", str(self.runtime)],
            stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT, env=self.env,
        )
        if "port" in self.config["extproc"]:
            wait_port(self.extproc_port)

    def kill_extproc(self) -> None:
        """SIGKILL the Python server (a test of what clients see then); its exit code is not held against it."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def kill_sidecar(self) -> None:
        """SIGKILL ``tollgate run`` and every process it started at once (a container killed outright: no
        child gets the chance to stop gracefully, as it does when only its parent dies)."""
        assert self.proc is not None
        family = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> int | None:
        code = None
        for p in (self.proc, self.envoy):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (self.proc, self.envoy):
            if p is None:
                continue
            try:
                c = p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                c = p.wait(5)
            if p is self.proc:
                code = c
            self.exit_codes.append((Path(str(p.args[0])).name, c))
        self.proc = self.envoy = None
        return code

    def problems(self) -> list[str]:
        """What went wrong behind the test's back: a process that exited non-zero, a logged traceback."""
        found = [f"{what} exited with code {code}" for what, code in self.exit_codes if code != 0]
        if not self.tracebacks_allowed:
            for name, text in (("gateway", self.log()), ("envoy", self.envoy_log())):
                at = text.find("Traceback (most recent call last)")
                if at != -1:
                    found.append(f"the {name} log has a traceback:\n{text[max(0, at - 300):at + 3000]}")
        return found

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading what happened
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def access_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{") and '"request_id"' in line:
                out.append(json.loads(line))
        return out

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        """A plain HTTP call, for what the SDKs would never send."""
        req = urllib.request.Request(self.base_url.removesuffix("/v1") + path, data=body, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found through /proc/<pid>/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in children.read_text().split()]
                found += kids
                todo += kids
    return found
