"""The few Kubernetes API calls ``tollgate injector-certs`` makes, over the API's plain REST shape.

A full client library would be a large dependency for five calls (get, create and replace a Secret;
get and JSON-patch a MutatingWebhookConfiguration). In a pod the address, the CA and the
ServiceAccount token come from where Kubernetes puts them; elsewhere (and in tests) they are given.
The token file is read for every call: Kubernetes rotates projected tokens in place.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.config import environment

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ApiError(RuntimeError):
    """The API server said no (``status`` is its HTTP status), or could not be reached (status 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API: {message}" + (f" (HTTP {status})" if status else ""))
        self.status = status


@dataclass(frozen=True)
class KubeApi:
    server: str  # https://host:port
    ca_file: str | None
    token_file: str | None
    timeout: float = 10.0

    @classmethod
    def in_cluster(cls) -> KubeApi:
        host, port = environment().get("KUBERNETES_SERVICE_HOST"), environment().get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ApiError(0, "not in a pod (KUBERNETES_SERVICE_HOST unset): pass --api-server")
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", str(SA_DIR / "ca.crt"), str(SA_DIR / "token"))

    def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self._call("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", path, body)

    def put(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("PUT", path, body)

    def patch_json(self, path: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        return self._call("PATCH", path, ops, content_type="application/json-patch+json")

    def _call(self, method: str, path: str, body: Any = None,
              content_type: str = "application/json") -> dict[str, Any]:
        headers = {"accept": "application/json"}
        if self.token_file:
            headers["authorization"] = "Bearer " + Path(self.token_file).read_text().strip()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = content_type
        req = urllib.request.Request(self.server.rstrip("/") + path, data=data, method=method, headers=headers)
        ctx = ssl.create_default_context(cafile=self.ca_file) if self.server.startswith("https:") else None
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=ctx) as resp:  # noqa: S310 - https only
                answer = json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, f"{method} {path}: {_status_message(e)}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ApiError(0, f"{method} {path}: {e}") from None
        if not isinstance(answer, dict):
            raise ApiError(0, f"{method} {path}: the answer is not a JSON object")
        return answer


def _status_message(e: urllib.error.HTTPError) -> str:
    try:
        status = json.loads(e.read())
        return str(status.get("message") or status.get("reason") or e.reason)
    except (ValueError, AttributeError):
        return str(e.reason)
