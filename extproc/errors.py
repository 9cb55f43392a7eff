"""The one error type of the gateway, and its wire shape.

Anything that should end an exchange with an answer to the client raises a
``GatewayError`` (or a subclass). ``server.py`` turns it into an Envoy
ImmediateResponse in one place; nothing else builds error bodies.

    GatewayError              (any status; the base)
      BadRequest          400
      Unauthenticated     401 (with a WWW-Authenticate challenge)
      Forbidden           403
      NotFound            404
      MethodNotAllowed    405
      PayloadTooLarge     413
      UnsupportedMediaType 415
      GuardrailViolation  400 (a guardrail rule blocked the request or answer)
      QuotaExceeded       429 (Retry-After; which limit refused)
      Internal            500
      UpstreamError       502
      Unavailable         503
"""

from __future__ import annotations

import json
from typing import Any


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


def error_object(message: str, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, the one builder behind every OpenAI error the gateway writes.

    Whole bodies (``error_body``), in-band stream events (``sse.error_event``),
    translated provider errors and Envoy's own local replies all start here, so
    a client sees one shape whichever part of the gateway answered.
    """
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps(error_object(message, type, code, param), ensure_ascii=False).encode()


# HTTP status -> Anthropic's error type (its Messages API names its errors by kind, not by code)
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 529: "overloaded_error"}


def anthropic_error_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error_body(status: int, message: str) -> bytes:
    """The same error for a client of Anthropic's API (``POST /v1/messages``):
    ``{"type": "error", "error": {"type", "message"}}``."""
    return json.dumps(anthropic_error_object(status, message), ensure_ascii=False).encode()


def anthropic_error_object(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error shape (whole bodies and the ``error`` stream event), built here only."""
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}


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


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class QuotaExceeded(GatewayError):
    """429: a token bucket or budget cannot take the request now.

    ``scope_kind`` (principal, team, org, alias, reservation) and ``kind``
    (tokens or money) say which limit refused, for metrics; the message
    names the scope itself.
    """

    status = 429
    type = "tokens"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, scope_kind: str, kind: str, headers: dict[str, str] | None = None) -> None:
        money = kind == "money"
        super().__init__(message, type="insufficient_quota" if money else "tokens",
                         code="insufficient_quota" if money else "rate_limit_exceeded", headers=headers)
        self.scope_kind = scope_kind
        self.kind = kind


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


class GuardrailViolation(BadRequest):
    """400: a guardrail rule blocks this request (or answer). Names the rule, never what matched."""

    code = "guardrail_violation"

    def __init__(self, rule: str, where: str, *, headers: dict[str, str] | None = None) -> None:
        what = "request" if where == "request" else "answer"
        super().__init__(f"the {what} was blocked by guardrail rule '{rule}'", param=None, headers=headers)
        self.rule = rule
