"""The :class:`~provisioning.core.auth.IdentityProvider` of a service running apart from the
control center (``prvng serve <service>``): API keys and revocation state over HTTP.

API-key answers are cached by the authenticator; user and login states here for
``state_cache_s`` (so a disabled user or a logged-out login is refused within that many seconds
on other processes; immediately in the embedded platform, which shares the control center's
in-process provider).
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from provisioning.core.auth import AuditHook, Authenticator, Guard, Identity
from provisioning.core.errors import Unauthorized
from provisioning.core.rbac import Authorizer
from provisioning.core.settings import Settings
from provisioning.core.signing import HttpJwks, TokenVerifier

__all__ = ["HttpIdentityProvider", "standalone_guard"]


class HttpIdentityProvider:
    """Asks the control center at ``base_url``."""

    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        state_cache_s: float = 2.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._transport = transport
        self._timeout = timeout_s
        self._cache_s = state_cache_s
        self._states: dict[str, tuple[float, bool, float, bool]] = {}

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        async with httpx.AsyncClient(
            base_url=self.base_url, transport=self._transport, timeout=self._timeout
        ) as client:
            try:
                resp = await client.post(path, json=body)
            except httpx.TransportError:
                raise Unauthorized("control center unreachable: cannot check credentials") from None
        if resp.status_code != 200:
            raise Unauthorized("API key is not valid")
        return resp.json()["data"]

    async def api_key(self, key: str) -> Identity:
        data = await self._post("/auth/introspect", {"api_key": key})
        return Identity(
            subject=data["id"],
            username=data["username"],
            roles=tuple(data["roles"]),
            kind="apikey",
            scopes=tuple(data["scopes"]) if data.get("scopes") else None,
            key_id=data.get("key_id"),
            expires_at=float(data["expires_at"]) if data.get("expires_at") else None,
        )

    async def revoked(
        self, user_id: str, issued_at: float | None, session: str | None = None
    ) -> bool:
        # One answer per (user, login) for state_cache_s: a logout or a disabled user is seen
        # by this service within that many seconds; an ended login is remembered for good.
        now = time.monotonic()
        key = f"{user_id}/{session or ''}"
        state = self._states.get(key)
        if state is None or (not state[3] and now - state[0] > self._cache_s):
            body: dict[str, Any] = {"user_id": user_id}
            if session is not None:
                body["session"] = session
            try:
                data = await self._post("/auth/user-state", body)
            except Unauthorized:
                return True
            state = (
                now,
                bool(data["disabled"]),
                float(data["sessions_valid_after"]),
                bool(data.get("session_ended", False)),
            )
            if len(self._states) > 100000:
                self._states.clear()
            self._states[key] = state
        _at, disabled, valid_after, ended = state
        return ended or disabled or (issued_at is not None and issued_at < valid_after)


def standalone_guard(settings: Settings, audit: AuditHook | None = None) -> Guard:
    """The guard of a service running apart from the control center: access tokens verified
    against the control center's JWKS, API keys and revocations asked over HTTP, Cedar
    in-process, audit events to ``audit`` (the service's outbox)."""
    cc = settings.control_center_url
    verifier = TokenVerifier(
        HttpJwks(f"{cc}/.well-known/jwks.json"),
        audience=settings.control_center.audience,
        issuer=settings.control_center.issuer,
    )
    authorizer = Authorizer([settings.home / "config" / "policies"])
    return Guard(Authenticator(verifier, HttpIdentityProvider(cc)), authorizer, audit=audit)
