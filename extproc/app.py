"""The composition root: everything one running gateway shares between exchanges."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from extproc.config import GatewayConfig
from extproc.credentials import CredentialVault
from extproc.exchange import Exchanges


@dataclass
class Gateway:
    config: GatewayConfig
    vault: CredentialVault
    exchanges: Exchanges
    access_log: logging.Logger


def build_gateway(config: GatewayConfig, env: dict[str, str] | None = None) -> Gateway:
    return Gateway(
        config=config,
        vault=CredentialVault(config.providers, dict(os.environ) if env is None else env),
        exchanges=Exchanges(),
        access_log=logging.getLogger("tollgate.access"),
    )
