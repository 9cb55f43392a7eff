"""The dev-auth example config works as its comments say: `tollgate dev-token` mints what it trusts."""

from __future__ import annotations

import pytest

from extproc.auth.build import build_authenticator
from extproc.auth.devtoken import mint_dev_token
from extproc.config import load_config
from extproc.errors import Forbidden
from tests.test_envoy_config import ENVOY_DIR


def test_a_dev_token_for_team_ml_may_call_demo_but_not_the_embedding_alias(tmp_path):
    env = {"HOME": str(tmp_path)}
    cfg = load_config(ENVOY_DIR / "gateway.dev-auth.yaml", env=env)
    token = mint_dev_token(cfg.auth.issuers[0], sub="alice", team="ml")
    auth = build_authenticator(cfg)
    auth._started = True  # no event loop here: the deny list stays empty
    ident = auth.authenticate({"authorization": f"Bearer {token}"}, "r1")
    assert (ident.principal, ident.team) == ("alice", "ml")
    auth.authorize(ident, "demo", "r1")
    with pytest.raises(Forbidden):
        auth.authorize(ident, "demo-embedding", "r2")
    assert (tmp_path / ".config" / "tollgate" / "dev-key.pem").exists()
