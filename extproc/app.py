"""The composition root: everything one running gateway shares between exchanges."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import time

from extproc.access_log import access_record
from extproc.auth.authenticator import Authenticator
from extproc.auth.build import build_authenticator, wait_budget
from extproc.config import GatewayConfig
from extproc.credentials import CredentialVault
from extproc.exchange import Exchange, Exchanges
from extproc.metrics import Metrics


@dataclass
class Gateway:
    config: GatewayConfig
    vault: CredentialVault
    exchanges: Exchanges
    access_log: logging.Logger
    metrics: Metrics
    auth: Authenticator | None = None  # None in auth.mode none: every request is anonymous

    def release(self, ex: Exchange) -> None:
        """One stream of ``ex`` is done; the last one records metrics and writes the access log line."""
        if self.exchanges.release(ex):
            now = time.monotonic()
            self.metrics.observe(ex, now)
            self.access_log.info(access_record(ex, now))


def build_gateway(config: GatewayConfig, env: dict[str, str] | None = None) -> Gateway:
    env = dict(os.environ) if env is None else env
    return Gateway(
        config=config,
        vault=CredentialVault(config.providers, env, wait_budget=wait_budget(config)),
        exchanges=Exchanges(),
        access_log=logging.getLogger("tollgate.access"),
        metrics=Metrics(config, teams=config.teams),
        auth=build_authenticator(config, env),
    )
