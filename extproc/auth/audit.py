"""One audit line per access decision: who, which team, which alias, allowed or not, and why.

Lines go to the ``tollgate.audit`` logger as ``audit {json}`` (the prefix keeps
them apart from access-log lines). They never carry token or key material:
only the verified principal, team, tier and issuer, and our own reason text.
"""

from __future__ import annotations

import json
import logging

from extproc.auth.identity import Identity
from extproc.errors import GatewayError


class AuditLog:
    def __init__(self, logger: logging.Logger | None = None, *, refusals_only: bool = False) -> None:
        self._log = logger or logging.getLogger("tollgate.audit")
        self._refusals_only = refusals_only

    def allowed(self, request_id: str, ident: Identity, alias: str | None) -> None:
        if not self._refusals_only:
            self._write(request_id, "allow", ident, alias, 200, None, None)

    def refused(self, request_id: str, err: GatewayError, ident: Identity | None, alias: str | None = None) -> None:
        reason = getattr(err, "description", None) or err.message
        self._write(request_id, "deny", ident, alias, err.status, err.code, reason)

    def _write(self, request_id: str, decision: str, ident: Identity | None, alias: str | None, status: int,
               code: str | None, reason: str | None) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        rec = {
            "request_id": request_id,
            "decision": decision,
            "status": status,
            "code": code,
            "reason": reason,
            "principal": ident.principal if ident else None,
            "team": ident.team if ident else None,
            "tier": ident.tier if ident else None,
            "issuer": ident.issuer if ident else None,
            "alias": alias,
        }
        self._log.info("audit %s", json.dumps(rec, separators=(",", ":"), ensure_ascii=False))
