"""Browser sessions of the web UI, built on the identity service's logins.

A UI login is an ordinary login of :class:`~provisioning.control_center.service.IdentityService`
(the same throttling, MFA check, audit record and refresh-token *family*); there is no second
session system. The ``__Host-prvng_session`` cookie (``Secure``, ``HttpOnly``, ``SameSite=Lax``,
``Path=/``, no ``Domain``, gone when the browser closes) holds the login's refresh token, which
the UI never rotates and the page's JavaScript cannot read. No access token ever reaches the
browser.

For each request the UI mints (and keeps for at most :attr:`SessionManager.remint_s`, or until
the signing key changes) an access token of that login — the one the identity service would
issue on refresh, with the family as ``sid`` — and authenticates it with the platform's
:class:`~provisioning.core.auth.Authenticator`. So a UI session ends exactly when its login
does: logout (the family is revoked), the user disabled, their password changed or their
sessions ended (every family of the user revoked, ``sessions_valid_after`` moved), the refresh
token expiring (idle/absolute limits of the login), or the refresh token being used elsewhere
(``/auth/refresh`` with a stolen cookie: the UI then presents it once more, which the identity
service treats as reuse and revokes the family). After a key rotation the next request gets a
token signed by the new key.

The access token calls the other services (orchestrator, ops-keeper) on the user's behalf,
server-side, so their Cedar checks apply unchanged.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection
from starlette.requests import Request
from starlette.responses import Response

from provisioning.control_center.identity import hash_secret
from provisioning.control_center.service import Actor, IdentityService
from provisioning.control_center.tables import refresh_tokens, users
from provisioning.core.auth import Authenticator, Identity
from provisioning.core.clock import as_utc
from provisioning.core.errors import Unauthorized
from provisioning.core.logging import get_logger
from provisioning.core.signing import KeyRing

__all__ = [
    "PRE_COOKIE",
    "SESSION_COOKIE",
    "PendingLogin",
    "SessionManager",
    "UiSession",
    "bearer_request",
    "clear_cookie",
    "set_cookie",
]

log = get_logger("control_center.ui")

SESSION_COOKIE = "__Host-prvng_session"
PRE_COOKIE = "__Host-prvng_pre"  # pre-login nonce: binds the login forms' CSRF token
_MAX_COOKIE = 256
_PENDING_TTL_S = 300.0
_PENDING_TRIES = 5


@dataclass(frozen=True)
class UiSession:
    """A request's authenticated session: who, the access token acting for them (server-side
    only), the login (refresh family) id and the session's CSRF token."""

    identity: Identity
    token: str
    family: str
    csrf: str


@dataclass
class PendingLogin:
    """A login whose password was right and whose TOTP code is still to come."""

    username: str
    password: str
    deadline: float
    next: str
    tries: int = 0


@dataclass
class _Minted:
    family: str
    token: str
    kid: str
    at: float  # monotonic


def set_cookie(response: Response, name: str, value: str, max_age: int | None = None) -> None:
    """A ``__Host-`` cookie: Secure, HttpOnly, SameSite=Lax, Path=/ and no Domain."""
    response.set_cookie(
        name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="lax"
    )


def clear_cookie(response: Response, name: str) -> None:
    response.set_cookie(
        name, "", max_age=0, expires=0, path="/", secure=True, httponly=True, samesite="lax"
    )


def bearer_request(request: Request, token: str) -> Request:
    """The same request as seen by the API's authentication: credentials from the session,
    never from what the browser sent (its own ``Authorization``/``X-API-Key``/cookies are
    dropped, so nothing but the session authenticates a UI request)."""
    scope = dict(request.scope)
    dropped = {b"authorization", b"x-api-key", b"cookie"}
    headers = [(k, v) for k, v in request.scope["headers"] if k.lower() not in dropped]
    headers.append((b"authorization", f"Bearer {token}".encode()))
    scope["headers"] = headers
    return Request(scope)


def _actor(request: Request, identity: Identity | None = None) -> Actor:
    return Actor(
        identity=identity,
        source=request.client.host if request.client else None,
        request_id=request.headers.get("x-request-id"),
    )


class SessionManager:
    """Logs browsers in and out and turns a request's cookie into a :class:`UiSession`."""

    def __init__(
        self,
        identity: IdentityService,
        authenticator: Authenticator,
        ring: KeyRing,
        csrf_token: Callable[[str, str], str],
        *,
        remint_s: float = 60.0,
    ) -> None:
        """``csrf_token(purpose, subject) -> str`` derives a session's CSRF token.
        ``remint_s``: how long a minted access token serves (a role change shows after it)."""
        self.identity = identity
        self.authenticator = authenticator
        self.ring = ring
        self.csrf_token = csrf_token
        self.remint_s = remint_s
        self._minted: dict[str, _Minted] = {}
        self._pending: dict[str, PendingLogin] = {}

    # ------------------------------------------------------------------ login and logout

    async def login(
        self, request: Request, username: str, password: str, code: str | None
    ) -> dict[str, Any]:
        """The identity service's login (throttled, audited); the answer holds the refresh
        token that becomes the cookie.

        Raises:
            Unauthorized: wrong credentials, or ``details.mfa_required`` when a TOTP code is
                missing or wrong.
            RateLimited: too many failures.
        """
        return await self.identity.login(username, password, code, _actor(request))

    def hold_for_mfa(self, nonce: str, username: str, password: str, next_url: str) -> None:
        """Keep a login whose password was right until its TOTP code comes (5 minutes, in
        memory, tied to the browser's pre-login nonce)."""
        now = time.monotonic()
        for key, held in list(self._pending.items()):
            if held.deadline < now:
                self._pending.pop(key, None)
        if len(self._pending) > 10_000:
            self._pending.clear()
        self._pending[nonce] = PendingLogin(username, password, now + _PENDING_TTL_S, next_url)

    def pending(self, nonce: str | None) -> PendingLogin | None:
        held = self._pending.get(nonce or "")
        if held is None or held.deadline < time.monotonic() or held.tries >= _PENDING_TRIES:
            self._pending.pop(nonce or "", None)
            return None
        return held

    def drop_pending(self, nonce: str | None) -> None:
        self._pending.pop(nonce or "", None)

    async def logout(self, request: Request, session: UiSession) -> None:
        """End the login (its refresh family) through the identity service."""
        raw = request.cookies.get(SESSION_COOKIE, "")
        await self.identity.logout(session.identity, raw or None, _actor(request, session.identity))
        self._minted.pop(hash_secret(raw), None)

    # ------------------------------------------------------------------ each request

    async def resolve(self, request: Request) -> UiSession | None:
        """The session of this request, or None when it has none that is still valid."""
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw or len(raw) > _MAX_COOKIE:
            return None
        key = hash_secret(raw)
        for fresh in (False, True):
            minted = None if fresh else self._usable(key)
            if minted is None:
                minted = await self._mint(request, raw, key)
                if minted is None:
                    return None
            try:
                who = await self.authenticator.authenticate(bearer_request(request, minted.token))
            except Unauthorized:
                self._minted.pop(key, None)
                continue  # revoked, or the key left the key set: ask the store once more
            if who is None:  # pragma: no cover - a bearer token is always looked at
                return None
            return UiSession(
                who, minted.token, minted.family, self.csrf_token("session", minted.family)
            )
        return None

    def _usable(self, key: str) -> _Minted | None:
        minted = self._minted.get(key)
        if minted is None:
            return None
        if time.monotonic() - minted.at > self.remint_s or minted.kid != self.ring.current.kid:
            self._minted.pop(key, None)
            return None
        return minted

    async def _mint(self, request: Request, raw: str, key: str) -> _Minted | None:
        """An access token for the login whose refresh token is ``raw``, if it is still valid."""
        now = datetime.now(UTC)
        digest = key

        def body(conn: Connection) -> tuple[Any, Any] | None:
            row = conn.execute(
                select(refresh_tokens).where(refresh_tokens.c.token_hash == digest)
            ).first()
            if row is None:
                return None
            user = conn.execute(select(users).where(users.c.id == row.user_id)).first()
            return row, user

        found = await self.identity.db.run_read(body)
        if found is None:
            return None
        row, user = found
        if row.used_at is not None and row.revoked_at is None:
            # The cookie's token was traded at /auth/refresh: somebody else has this login.
            # Presenting it again makes the identity service revoke the whole family.
            log.warning("a UI session's refresh token was used elsewhere; ending the login")
            try:
                await self.identity.refresh(raw, _actor(request))
            except Unauthorized:
                pass
            return None
        expires = as_utc(row.expires_at)
        if row.revoked_at is not None or expires is None or expires <= now:
            return None
        if user is None or user.disabled:
            return None
        # The token the identity service issues on refresh; it never leaves the server.
        doc = self.identity._access_token(user, mfa_ok=bool(row.mfa), session=row.family_id)
        minted = _Minted(
            row.family_id, doc["access_token"], self.ring.current.kid, time.monotonic()
        )
        if len(self._minted) > 10_000:
            self._minted.clear()
        self._minted[key] = minted
        return minted

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(24)
