"""A fake identity provider for tests: signing keys, a JWKS endpoint, an Azure AD token endpoint.

It runs an aiohttp server on a free loopback port in its own thread, so the
gateway processes under test fetch keys from it over real HTTP. Tests mint
tokens with ``mint`` (good ones, and every kind of bad one), take the IdP
"down" to see what the gateway does without it, and rotate keys.

    with FakeIdP() as idp:
        token = idp.mint(sub="alice", groups=["ml"])
        idp.down = True            # /jwks answers 503 from now on
        idp.jwks_hits              # how often the gateway fetched keys
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

AUDIENCE = "tollgate"


class FakeIdP:
    def __init__(self, audience: str = AUDIENCE) -> None:
        self.audience = audience
        self.port = 0
        self.keys: dict[str, Any] = {}  # kid -> private key, all published
        self.add_key("rsa-1", rsa.generate_private_key(public_exponent=65537, key_size=2048))
        self.add_key("ec-1", ec.generate_private_key(ec.SECP256R1()))
        self.down = False
        self.jwks_hits = 0
        self.token_requests: list[dict[str, str]] = []
        self.issued: list[str] = []  # every Azure AD-style access token handed out
        self.minted: list[str] = []  # every JWT minted
        self.token_status = 200
        self.token_lifetime = 3600
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- keys and tokens
    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def broken_token_url(self) -> str:
        return f"{self.issuer}/broken/token"

    def add_key(self, kid: str, key: Any) -> None:
        self.keys[kid] = key

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, key in self.keys.items():
            if isinstance(key, rsa.RSAPrivateKey):
                jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
                out.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
            else:
                jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
                out.append({**jwk, "kid": kid, "use": "sig", "alg": "ES256"})
        return {"keys": out}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        base: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "sub": "alice", "iat": now, "nbf": now,
                                "exp": now + 600, "jti": uuid.uuid4().hex}
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}  # None drops a claim

    def mint(self, *, kid: str = "rsa-1", headers: dict[str, Any] | None = None, **claims: Any) -> str:
        key = self.keys[kid]
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        token = jwt.encode(self.claims(**claims), key, algorithm=alg, headers={"kid": kid, **(headers or {})})
        self.minted.append(token)
        return token

    # -- the server
    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        if self.down:
            return web.Response(status=503, text="down for maintenance")
        return web.json_response(self.jwks())

    async def _token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.token_requests.append({k: str(v) for k, v in form.items()})
        if self.token_status != 200:
            return web.json_response({"error": "invalid_client", "error_description": "AADSTS7000215: bad secret"},
                                     status=self.token_status)
        token = f"aad-token-{len(self.token_requests)}-{uuid.uuid4().hex[:8]}"
        self.issued.append(token)
        return web.json_response({"token_type": "Bearer", "expires_in": self.token_lifetime, "access_token": token})

    async def _broken_token(self, request: web.Request) -> web.Response:
        await request.post()
        return web.json_response({"error": "invalid_client", "error_description": "AADSTS7000215"}, status=401)

    def start(self) -> FakeIdP:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._serve())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-idp", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake IdP did not start")
        return self

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        app.router.add_post("/token", self._token)
        app.router.add_post("/broken/token", self._broken_token)  # always refuses the client
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> FakeIdP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
