"""Azure AD (Entra ID) client-credentials tokens for Azure OpenAI.

Each ``azure_openai`` provider with ``azure_ad`` gets one ``AzureAdToken``: a
background task fetches the token at start-up and again before it expires
(five minutes before, or halfway through a shorter lifetime), retrying with
backoff while the old token is still good. Requests only read the cached
value; the first request after start-up (or after a long outage) may wait for
a fetch, bounded so Envoy's message timeout is never reached. Every HTTP call
is aiohttp, so the event loop never blocks. When no valid token can be had,
the attempt fails with a 502 that says so (and Envoy moves on to the alias's
next target, if any).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from extproc.credentials.settings import AzureAd

log = logging.getLogger("tollgate.credentials")

MAX_BACKOFF = 30.0


class TokenEndpointError(Exception):
    """The token endpoint did not give us a token; the message is safe to log and show."""


class AzureAdToken:
    def __init__(self, provider: str, settings: AzureAd, secret: Callable[[], str | None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.provider = provider
        self.settings = settings
        self._secret = secret
        self._clock = clock
        self._token: str | None = None
        self._usable_until = float("-inf")
        self._refresh_at = float("-inf")
        self._fetch_task: asyncio.Task[bool] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.last_error: str | None = None
        self.fetches = 0

    def current(self, now: float) -> str | None:
        """The access token if it is still good, else None."""
        return self._token if now < self._usable_until else None

    def fresh(self, now: float) -> bool:
        return now < self._usable_until

    def fetch(self) -> asyncio.Task[bool]:
        """Fetch a token now; concurrent callers share one request."""
        if self._fetch_task is None:
            task = asyncio.get_running_loop().create_task(self._fetch())
            task.add_done_callback(self._fetched)
            self._fetch_task = task
        return self._fetch_task

    def _fetched(self, task: asyncio.Task[bool]) -> None:
        self._fetch_task = None

    async def ensure(self, budget: float) -> None:
        """Wait (at most ``budget`` seconds) until a token is available; the fetch goes on if it takes longer."""
        if self.fresh(self._clock()):
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.fetch()), budget)

    async def _fetch(self) -> bool:
        self.fetches += 1
        started = self._clock()
        try:
            token, lifetime = await self._request()
        except TokenEndpointError as e:
            self.last_error = str(e)
            log.error("azure ad token for provider %s: %s", self.provider, e)
            return False
        self._token = token
        self._usable_until = started + lifetime - min(30.0, lifetime / 10)
        self._refresh_at = started + lifetime - min(300.0, lifetime / 2)
        self.last_error = None
        return True

    async def _request(self) -> tuple[str, float]:
        s = self.settings
        secret = self._secret()
        if not secret:
            raise TokenEndpointError(f"client secret ({s.client_secret.describe()}) is empty or missing")
        form = {"grant_type": "client_credentials", "client_id": s.client_id, "client_secret": secret, "scope": s.scope}
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.timeout))
        try:
            async with self._session.post(s.token_url, data=form, headers={"accept": "application/json"}) as r:
                body: Any = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            raise TokenEndpointError(f"token endpoint unreachable ({type(e).__name__})") from None
        if status != 200 or not isinstance(body, dict):
            code = body.get("error") if isinstance(body, dict) else None
            raise TokenEndpointError(f"token endpoint answered HTTP {status}" + (f" ({code})" if code else ""))
        token, lifetime = body.get("access_token"), body.get("expires_in")
        try:
            seconds = float(lifetime) if lifetime is not None else 0.0  # a number; some proxies send a string
        except (TypeError, ValueError):
            seconds = 0.0
        if not isinstance(token, str) or not token or seconds <= 0:
            raise TokenEndpointError("token endpoint answered without access_token/expires_in")
        return token, seconds

    async def _refresh_loop(self) -> None:
        backoff = 1.0
        while True:
            wait = self._refresh_at - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if await self.fetch():
                backoff = 1.0
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def start(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        for t in (self._refresher, self._fetch_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        self._refresher = None
        if self._session is not None:
            await self._session.close()
