"""The one error type of the gateway, and its wire shape.

Anything that should end an exchange with an answer to the client raises a
``GatewayError`` (or a subclass). ``server.py`` turns it into an Envoy
ImmediateResponse in one place; nothing else builds error bodies.
"""

from __future__ import annotations

import json


class GatewayError(Exception):
    """An error the client is allowed to see, in OpenAI's error shape."""

    status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}},
        ensure_ascii=False,
    ).encode()


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unauthenticated(GatewayError):
    """401: no usable credential. Carries the RFC 6750 challenge, with a description safe to show."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_token"

    def __init__(self, description: str, *, code: str | None = None) -> None:
        safe = "".join(c for c in description if c.isprintable() and c not in '"\\')[:200]
        challenge = f'Bearer realm="tollgate", error="invalid_token", error_description="{safe}"'
        super().__init__(f"authentication failed: {safe}", code=code, headers={"www-authenticate": challenge})
        self.description = safe


class Forbidden(GatewayError):
    """403: the caller is known but may not do this."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UpstreamError(GatewayError):
    status = 502
    type = "api_error"
    code = "upstream_error"


class Unavailable(GatewayError):
    """503: something the gateway depends on (an IdP, a store) cannot answer now; fails closed."""

    status = 503
    type = "api_error"
    code = "service_unavailable"


class Internal(GatewayError):
    status = 500
    type = "api_error"
    code = "internal_error"
