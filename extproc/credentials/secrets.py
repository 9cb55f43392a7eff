"""Secret sources: a credential's current value from an environment variable or a file.

Files (e.g. Kubernetes Secret volumes, where a rotation swaps a symlink) are
stat'ed on every use and re-read when their inode, size or modification time
changes, so a rotated secret is used at once without a restart. The
environment comes from ``config.environment()``, read once at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from extproc.config import RedisSettings, SecretRef


class FileSecret:
    """A secret file, stat'ed on every use (about a microsecond) and re-read when it changed."""

    __slots__ = ("path", "value", "stamp")

    def __init__(self, path: str) -> None:
        self.path = path
        self.value: str | None = None
        self.stamp: tuple[int, int, int] | None = None

    def get(self) -> str | None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self.stamp:
                with open(self.path, encoding="utf-8") as f:
                    self.value = f.read().strip() or None
                self.stamp = stamp
        except OSError:
            self.value, self.stamp = None, None
        return self.value


def secret_reader(ref: SecretRef, env: Mapping[str, str]) -> Callable[[], str | None]:
    """A function returning the secret's current value (a file is re-read when it changes)."""
    if ref.env:
        value = env.get(ref.env, "").strip() or None
        return lambda: value
    f = FileSecret(ref.file or "")
    return f.get


def redis_password(redis: RedisSettings | None, env: Mapping[str, str]) -> str | None:
    """The ``redis.password`` now, or None when there is no Redis or no password."""
    if redis is None or redis.password is None:
        return None
    return secret_reader(redis.password, env)()
