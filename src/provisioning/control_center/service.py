"""Identity: logins, token refresh, users, API keys and the audit trail of all of it.

Every change the control center makes is written in the same transaction as its audit record.
The service is also the in-process :class:`~provisioning.core.auth.IdentityProvider` of the
embedded platform: revocations (disable, password change, logout everywhere) reach every
service's next request because they share this object's user-state cache.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.engine import Connection

from provisioning.control_center import audit_log, identity, mfa, passwords
from provisioning.control_center.audit_log import AuditEvent
from provisioning.control_center.tables import users
from provisioning.control_center.tables_audit import cc_audit
from provisioning.control_center.throttle import Throttle, retry_after
from provisioning.core.auth import Identity
from provisioning.core.clock import as_utc
from provisioning.core.errors import (
    Forbidden,
    InvalidState,
    NotFound,
    RateLimited,
    Unauthorized,
    ValidationError,
)
from provisioning.core.logging import get_logger
from provisioning.core.rbac import ACTIONS, ROLES, Authorizer, Resource
from provisioning.core.settings import ControlCenterSettings
from provisioning.core.signing import KeyRing
from provisioning.core.store import Database, upgrade

__all__ = ["Actor", "IdentityService"]

log = get_logger("control_center")
T = TypeVar("T")
_BAD_LOGIN = "invalid username or password"
_MFA_PENDING_S = 900.0  # how long a started MFA enrolment waits for its code


@dataclass(frozen=True)
class Actor:
    """Who does something, for the audit record."""

    identity: Identity | None
    source: str | None = None
    request_id: str | None = None

    def event(self, action: str, result: str = "success", **kw: Any) -> AuditEvent:
        ident = self.identity
        actor_type: Any = kw.pop("actor_type", None) or (ident.kind if ident else "anonymous")
        return AuditEvent(
            action=action,
            result=result,  # type: ignore[arg-type]
            actor=kw.pop("actor", None) or (ident.username if ident else None),
            actor_type=actor_type,
            source=self.source,
            request_id=self.request_id,
            service="control-center",
            **kw,
        )


def _now() -> datetime:
    return datetime.now(UTC)


class IdentityService:
    """See the module docstring."""

    def __init__(
        self,
        db: Database,
        settings: ControlCenterSettings,
        ring: KeyRing,
        authorizer: Authorizer,
        *,
        throttle: Throttle | None = None,
        hash_params: passwords.HashParams = passwords.DEFAULT_PARAMS,
    ) -> None:
        self.db = db
        self.settings = settings
        self.ring = ring
        self.authorizer = authorizer
        self.throttle = throttle or Throttle()
        self.hash_params = hash_params
        # user id -> (fetched at, disabled, sessions valid after): the revocation cache
        self._states: dict[str, tuple[float, bool, float]] = {}
        # login (refresh family) -> (fetched at, ended): logout reaches its access tokens too
        self._sessions: dict[str, tuple[float, bool]] = {}
        # (user id, login) -> (started at, secret) awaiting confirmation: only the login that
        # started an enrolment sees its secret again or confirms it, within _MFA_PENDING_S.
        self._pending_mfa: dict[tuple[str, str | None], tuple[float, str]] = {}

    async def migrate(self) -> None:
        await upgrade(
            self.db, Path(__file__).parent / "migrations", "alembic_version_control_center"
        )

    async def _write(self, fn: Callable[[Connection], T], *events: AuditEvent) -> T:
        """``fn`` and its audit records, in one transaction."""

        def body(conn: Connection) -> T:
            out = fn(conn)
            for ev in events:
                audit_log.append(conn, ev)
            return out

        return await self.db.run_write(body)

    async def audit(self, event: AuditEvent) -> None:
        """Record an event that changes nothing else (a denial, a failed login)."""
        await self.db.run_write(lambda c: audit_log.append(c, event))

    async def _hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(
            None, partial(passwords.hash_password, password, params=self.hash_params)
        )

    # ------------------------------------------------------------------ bootstrap

    async def bootstrap_admin(self, password: str = "") -> str | None:
        """Create ``admin`` when there is no user; return the password when it was generated."""
        existing = await self.db.run_read(identity.list_users)
        if existing:
            return None
        generated = not password
        pw = password or secrets.token_urlsafe(18)
        passwords.check_password_policy(pw, username="admin")
        digest = await self._hash(pw)
        now = _now()
        await self._write(
            lambda c: identity.create_user(c, "admin", digest, ["admin"], now),
            AuditEvent(
                action="user:create",
                actor="system",
                actor_type="system",
                object_type="User",
                object_id="admin",
                service="control-center",
                details={"roles": ["admin"], "first_run": True},
            ),
        )
        return pw if generated else None

    # ------------------------------------------------------------------ login

    def _access_token(self, user: Any, *, mfa_ok: bool, session: str) -> dict[str, Any]:
        ttl = self.settings.access_ttl_s
        enrol = not user.mfa_secret and bool(
            set(user.roles or ()) & set(self.settings.mfa_required_roles)
        )
        token = self.ring.sign(
            {
                "sub": user.id,
                "name": user.username,
                "roles": list(user.roles or []),
                "mfa": mfa_ok,
                "sid": session,
                **({"enrol_mfa": True} if enrol else {}),
            },
            audience=self.settings.audience,
            ttl_s=ttl,
            issuer=self.settings.issuer,
        )
        return {"access_token": token, "token_type": "Bearer", "expires_in": int(ttl)}

    async def login(
        self, username: str, password: str, mfa_code: str | None, actor: Actor
    ) -> dict[str, Any]:
        """Check credentials (throttled, same answer and work whether the user exists or not).

        Raises:
            RateLimited: too many failures for this account or address (``retry_after``).
            Unauthorized: wrong credentials, disabled user, or a missing/wrong MFA code
                (``details.mfa_required``).
        """
        source = actor.source or "unknown"
        wait = self.throttle.check(username, source)
        user = await self.db.run_read(lambda c: identity.find_user(c, username))
        if wait is not None:
            await self.audit(_login_event(actor, "denied", user, "throttled"))
            raise RateLimited(
                "too many failed logins; try again later", retry_after=retry_after(wait)
            )
        loop = asyncio.get_running_loop()
        if user is None:
            await loop.run_in_executor(
                None, partial(passwords.burn_equivalent_time, password, params=self.hash_params)
            )
            ok, new_hash = False, None
        else:
            ok, new_hash = await loop.run_in_executor(
                None,
                partial(
                    passwords.verify_password, user.password_hash, password, params=self.hash_params
                ),
            )
        if not ok or user is None or user.disabled:
            await self._login_failed(username, user, actor, "bad credentials")
            raise Unauthorized(_BAD_LOGIN)
        step: int | None = None
        if user.mfa_secret:
            if not mfa_code:
                raise Unauthorized("MFA code required", mfa_required=True)
            step = mfa.verify_totp(user.mfa_secret, mfa_code, last_used_step=user.mfa_last_step)
            if step is None:
                await self._login_failed(username, user, actor, "bad MFA code")
                raise Unauthorized("MFA code is not valid", mfa_required=True)
        self.throttle.record_success(username)
        now = _now()
        st = self.settings

        def body(conn: Connection) -> identity.IssuedRefresh:
            if step is None:
                # MFA confirmed since the user was read (outside this transaction): no login
                # without it now. The row lock orders this against ``mfa_confirm``, which
                # ends every other login in the transaction that sets the secret.
                q = select(users.c.mfa_secret).where(users.c.id == user.id)
                if conn.dialect.name == "postgresql":
                    q = q.with_for_update()
                if conn.execute(q).scalar():
                    raise Unauthorized("MFA code required", mfa_required=True)
            values: dict[str, Any] = {}
            if new_hash:
                values["password_hash"] = new_hash
            if step is not None:
                values["mfa_last_step"] = step
            if values:
                conn.execute(users.update().where(users.c.id == user.id).values(**values))
            return identity.issue_refresh(
                conn,
                user.id,
                mfa=step is not None,
                now=now,
                idle_s=st.refresh_idle_s,
                absolute_s=st.refresh_absolute_s,
                source=actor.source,
            )

        issued = await self._write(
            body,
            actor.event(
                "auth:login",
                actor=user.username,
                actor_type="user",
                object_type="User",
                object_id=user.id,
                details={"mfa": step is not None, "rehashed": bool(new_hash)},
            ),
        )
        out = self._access_token(user, mfa_ok=step is not None, session=issued.family_id)
        out.update(
            refresh_token=issued.token,
            refresh_expires_at=issued.expires_at,
            user=identity.user_doc(user),
        )
        return out

    async def _login_failed(self, username: str, user: Any, actor: Actor, reason: str) -> None:
        self.throttle.record_failure(username, actor.source or "unknown")
        await self.audit(_login_event(actor, "failure", user, reason))

    async def refresh(self, token: str, actor: Actor) -> dict[str, Any]:
        """Trade a refresh token for a new access token and the next refresh token.

        Raises:
            Unauthorized: not valid; a reused token also revokes its whole family.
        """
        now = _now()
        st = self.settings
        reuse: list[Any] = []

        def body(conn: Connection) -> tuple[Any, identity.IssuedRefresh, bool]:
            try:
                user, nxt, mfa_ok = identity.rotate_refresh(
                    conn, token, now=now, idle_s=st.refresh_idle_s, absolute_s=st.refresh_absolute_s
                )
                audit_log.append(
                    conn,
                    actor.event(
                        "auth:refresh",
                        actor=user.username,
                        actor_type="user",
                        object_type="User",
                        object_id=user.id,
                        details={"session": nxt.family_id},
                    ),
                )
                return user, nxt, mfa_ok
            except identity._ReuseDetected as exc:
                reuse.append(exc)
                audit_log.append(
                    conn,
                    actor.event(
                        "auth:refresh",
                        "denied",
                        actor_type="user",
                        object_type="User",
                        object_id=exc.user_id,
                        details={"reason": "reuse: family revoked", "session": exc.family_id},
                    ),
                )
                return None, None, False  # type: ignore[return-value]

        user, nxt, mfa_ok = await self.db.run_write(body)
        if reuse:
            self._sessions.pop(reuse[0].family_id, None)
            raise Unauthorized(str(reuse[0].message))
        out = self._access_token(user, mfa_ok=mfa_ok, session=nxt.family_id)
        out.update(refresh_token=nxt.token, refresh_expires_at=nxt.expires_at)
        return out

    async def logout(self, ident: Identity, refresh_token: str | None, actor: Actor) -> None:
        """End this login (its refresh family) — and, for a token, the access token too."""
        now = _now()

        def body(conn: Connection) -> str | None:
            fam = ident.session
            if refresh_token:
                row = identity.family_of(conn, refresh_token)
                if row is not None and row.user_id == ident.subject:
                    fam = row.family_id
            if fam:
                identity.revoke_family(conn, fam, now)
            return fam

        ended = await self._write(
            body, actor.event("auth:logout", object_type="User", object_id=ident.subject)
        )
        if ended:
            self._sessions.pop(ended, None)

    # ------------------------------------------------------------------ MFA

    async def mfa_enroll(self, ident: Identity, actor: Actor) -> dict[str, str]:
        """A new TOTP secret for the caller; active once confirmed with :meth:`mfa_confirm`.

        Raises:
            Forbidden: called with an API key (only the user, logged in, enrols).
        """
        if ident.kind == "apikey":
            raise Forbidden("MFA is enrolled by the user logged in, not with an API key")
        user = await self.db.run_read(lambda c: identity.get_user(c, ident.subject))
        if user.mfa_secret:
            raise InvalidState("MFA is already enabled for this user")
        secret = mfa.new_secret()
        now = time.monotonic()
        for key in [k for k, (at, _) in self._pending_mfa.items() if now - at > _MFA_PENDING_S]:
            del self._pending_mfa[key]  # abandoned enrolments: memory stays bounded
        self._pending_mfa[(ident.subject, ident.session)] = (now, secret)
        await self.audit(
            actor.event(
                "auth:mfa_enroll",
                object_type="User",
                object_id=ident.subject,
                details={"step": "started"},
            )
        )
        return {"secret": secret, "uri": mfa.provisioning_uri(secret, user.username)}

    def mfa_pending(self, ident: Identity) -> dict[str, str] | None:
        """The caller's enrolment awaiting confirmation (``{secret, uri}``, as
        :meth:`mfa_enroll` answered it), or None: the web UI shows it again next to a wrong
        code, to the same user only."""
        secret = self._mfa_pending_secret(ident)
        if secret is None or ident.kind == "apikey":
            return None
        return {"secret": secret, "uri": mfa.provisioning_uri(secret, ident.username)}

    def _mfa_pending_secret(self, ident: Identity) -> str | None:
        entry = self._pending_mfa.get((ident.subject, ident.session))
        if entry is None or time.monotonic() - entry[0] > _MFA_PENDING_S:
            return None
        return entry[1]

    async def mfa_confirm(self, ident: Identity, code: str, actor: Actor) -> None:
        if ident.kind == "apikey":
            raise Forbidden("MFA is enrolled by the user logged in, not with an API key")
        secret = self._mfa_pending_secret(ident)
        if secret is None:
            raise InvalidState(
                "no enrolment of this login is waiting: start with POST /auth/mfa/enroll "
                f"(in this same login; it waits {_MFA_PENDING_S // 60:g} minutes)"
            )
        step = mfa.verify_totp(secret, code, last_used_step=None)
        if step is None:
            raise ValidationError("MFA code is not valid", field="code")
        now = _now()

        def body(conn: Connection) -> list[str]:
            identity.update_user(conn, ident.subject, now, mfa_secret=secret, mfa_last_step=step)
            # Logins made without MFA end (a stolen password's session among them), except
            # the one that just proved the code.
            ended, live = identity.revoke_other_families(conn, ident.subject, ident.session, now)
            audit_log.append(
                conn,
                actor.event(
                    "auth:mfa_enroll",
                    object_type="User",
                    object_id=ident.subject,
                    details={"other_logins_ended": live},
                ),
            )
            return ended

        for family in await self.db.run_write(body):
            self._sessions.pop(family, None)  # not "still valid" from the cache
        # Other logins' pending enrolments of this user are void now.
        for pending in [k for k in self._pending_mfa if k[0] == ident.subject]:
            del self._pending_mfa[pending]

    # ------------------------------------------------------------------ users

    def _check_roles(self, roles: Sequence[str]) -> list[str]:
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise ValidationError(
                f"unknown role(s) {', '.join(unknown)}; roles are {', '.join(ROLES)}", field="roles"
            )
        return list(roles)

    async def create_user(
        self, username: str, password: str, roles: Sequence[str], actor: Actor
    ) -> dict[str, Any]:
        identity.validate_username(username)
        passwords.check_password_policy(password, username=username)
        roles = self._check_roles(roles)
        digest = await self._hash(password)
        now = _now()
        return await self._write(
            lambda c: identity.create_user(c, username, digest, roles, now),
            actor.event(
                "user:create", object_type="User", object_id=username, details={"roles": roles}
            ),
        )

    async def list_users(self) -> list[dict[str, Any]]:
        return await self.db.run_read(identity.list_users)

    async def get_user(self, user_id: str) -> dict[str, Any]:
        return identity.user_doc(await self.db.run_read(lambda c: identity.get_user(c, user_id)))

    async def find_user_id(self, name_or_id: str) -> str:
        def body(conn: Connection) -> str:
            row = identity.find_user(conn, name_or_id)
            return str(row.id) if row is not None else str(identity.get_user(conn, name_or_id).id)

        return await self.db.run_read(body)

    async def update_user(self, user_id: str, actor: Actor, **changes: Any) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if "roles" in changes and changes["roles"] is not None:
            values["roles"] = self._check_roles(changes["roles"])
        if changes.get("disabled") is not None:
            values["disabled"] = bool(changes["disabled"])
        if changes.get("password"):
            user = await self.db.run_read(lambda c: identity.get_user(c, user_id))
            passwords.check_password_policy(changes["password"], username=user.username)
            values["password_hash"] = await self._hash(changes["password"])
        if changes.get("end_sessions"):
            values["end_sessions"] = True
        now = _now()
        shown = {k: ("***" if k == "password_hash" else v) for k, v in values.items()}
        doc = await self._write(
            lambda c: identity.update_user(c, user_id, now, **values),
            actor.event("user:update", object_type="User", object_id=user_id, details=shown),
        )
        self._states.pop(user_id, None)
        if values.get("disabled") or "password_hash" in values or values.get("end_sessions"):
            self._sessions.clear()  # this user's logins were ended; their ids are not at hand
        return doc

    # ------------------------------------------------------------------ API keys

    async def create_api_key(
        self,
        owner: Identity,
        name: str,
        scopes: Sequence[str],
        expires_days: float | None,
        actor: Actor,
    ) -> dict[str, Any]:
        """A key whose scopes are a subset of what its owner may do; the secret is shown once.

        Raises:
            ValidationError: an unknown action in ``scopes``.
            Forbidden: a scope the owner may not use.
        """
        unknown = sorted(set(scopes) - set(ACTIONS))
        if unknown:
            raise ValidationError(f"unknown scope(s): {', '.join(unknown)}", field="scopes")
        # Decide as the key would be asked: scoped to what it asks for (so a scope only keys
        # may hold, such as audit:write, is judged as one), within the owner's own scopes.
        principal = owner.principal()
        if scopes:
            wanted = frozenset(scopes)
            principal = replace(
                principal, scopes=wanted if principal.scopes is None else wanted & principal.scopes
            )
        for scope in scopes:
            probe = Resource("Platform", "platform")
            kind = _scope_type(scope)
            own = (
                Resource("User", owner.subject)
                if kind == "User"
                else Resource(kind, "__own__", owner=owner.subject)
            )
            if not (
                self.authorizer.decide(principal, scope, probe).allowed
                or self.authorizer.decide(principal, scope, own).allowed
            ):
                raise Forbidden(f"{owner.username} may not {scope}, so a key cannot either")
        now = _now()
        expires = now + timedelta(days=expires_days) if expires_days else None
        doc, key = await self._write(
            lambda c: identity.create_api_key(c, owner.subject, name, list(scopes), expires, now),
            actor.event(
                "apikey:create",
                object_type="ApiKey",
                object_id=name,
                details={"scopes": list(scopes), "expires_at": expires},
            ),
        )
        return {**doc, "key": key}

    async def list_api_keys(self, user_id: str | None) -> list[dict[str, Any]]:
        return await self.db.run_read(lambda c: identity.list_api_keys(c, user_id))

    async def get_api_key(self, key_id: str) -> dict[str, Any]:
        return await self.db.run_read(lambda c: identity.get_api_key(c, key_id))

    async def revoke_api_key(self, key_id: str, actor: Actor) -> dict[str, Any]:
        now = _now()
        return await self._write(
            lambda c: identity.revoke_api_key(c, key_id, now),
            actor.event("apikey:revoke", object_type="ApiKey", object_id=key_id),
        )

    # ------------------------------------------------------------------ IdentityProvider

    async def api_key(self, key: str) -> Identity:
        now = _now()
        doc, user = await self.db.run_write(lambda c: identity.check_api_key(c, key, now))
        return Identity(
            subject=user.id,
            username=user.username,
            roles=tuple(user.roles or ()),
            kind="apikey",
            mfa=False,
            scopes=tuple(doc["scopes"]) or None,
            key_id=doc["id"],
            expires_at=doc["expires_at"].timestamp() if doc["expires_at"] else None,
        )

    async def revoked(
        self, user_id: str, issued_at: float | None, session: str | None = None
    ) -> bool:
        now = time.monotonic()
        state = self._states.get(user_id)
        if state is None or now - state[0] > 1.0:
            row = await self.db.run_read(
                lambda c: c.execute(users.select().where(users.c.id == user_id)).first()
            )
            if row is None:
                return True
            valid_after = as_utc(row.sessions_valid_after)
            assert valid_after is not None
            state = (now, bool(row.disabled), valid_after.timestamp())
            self._states[user_id] = state
        _fetched, disabled, valid_after_ts = state
        if disabled:
            return True
        if issued_at is not None and issued_at < valid_after_ts:
            return True
        return session is not None and await self._session_ended(session, now)

    async def _session_ended(self, session: str, now: float) -> bool:
        """Whether a login was ended (logout, refresh-token reuse, its user's sessions ended);
        an answer is kept a second, an ended login for good."""
        state = self._sessions.get(session)
        if state is None or (not state[1] and now - state[0] > 1.0):
            ended = await self.db.run_read(lambda c: identity.family_revoked(c, session))
            if len(self._sessions) > 100_000:
                self._sessions.clear()
            state = (now, ended)
            self._sessions[session] = state
        return state[1]

    async def user_state(self, user_id: str, session: str | None = None) -> dict[str, Any]:
        """Disabled flag, the time before which its tokens are dead, and whether the login
        ``session`` (a token's ``sid``) has ended (for other services)."""

        def body(conn: Connection) -> tuple[Any, bool]:
            row = conn.execute(users.select().where(users.c.id == user_id)).first()
            ended = session is not None and identity.family_revoked(conn, session)
            return row, ended

        row, ended = await self.db.run_read(body)
        if row is None:
            raise NotFound(f"user {user_id} not found")
        valid_after = as_utc(row.sessions_valid_after)
        assert valid_after is not None
        return {
            "disabled": bool(row.disabled),
            "sessions_valid_after": valid_after.timestamp(),
            "session_ended": ended,
        }

    # ------------------------------------------------------------------ audit

    async def ingest(self, events: Sequence[Mapping[str, Any]], by: str) -> dict[str, int]:
        """Record audit events forwarded by another service (``by``: the service key's prefix
        or the stream they came from), each id once (a batch sent again after a lost answer
        records nothing twice); all in one transaction."""

        def body(conn: Connection) -> dict[str, int]:
            # The chain's lock before looking for the ids: two services relaying the same
            # outbox rows at once (two orchestrator workers on one store) would otherwise both
            # find an id missing, and the second insert would fail on the unique id.
            audit_log.lock_chain(conn)
            ids = [str(e["id"]) for e in events]
            seen = set(conn.execute(select(cc_audit.c.id).where(cc_audit.c.id.in_(ids))).scalars())
            recorded = 0
            for e in events:
                if e["id"] in seen:
                    continue
                seen.add(e["id"])
                fields = {k: v for k, v in e.items() if k not in ("id", "details", "ts")}
                details = {**(e.get("details") or {}), "forwarded_by": by}
                if e.get("ts"):  # recorded at ingest; the source's own time is kept beside
                    details["source_ts"] = e["ts"]
                audit_log.append(conn, AuditEvent(**fields, details=details), event_id=e["id"])
                recorded += 1
            return {"recorded": recorded, "duplicates": len(events) - recorded}

        return await self.db.run_write(body)

    async def audit_query(self, **filters: Any) -> list[dict[str, Any]]:
        return await self.db.run_read(lambda c: audit_log.query(c, **filters))

    async def audit_export(self, **filters: Any) -> list[str]:
        return await self.db.run_read(lambda c: list(audit_log.export_lines(c, **filters)))

    async def audit_verify(self) -> audit_log.VerifyResult:
        return await self.db.run_read(audit_log.verify)

    async def rotate_keys(self, actor: Actor) -> dict[str, Any]:
        new = await asyncio.get_running_loop().run_in_executor(
            None, partial(self.ring.rotate, self.settings.key_overlap_s)
        )
        await self.audit(actor.event("keys:rotate", object_type="SigningKey", object_id=new.kid))
        return {"kid": new.kid, "jwks": self.ring.jwks()}


def _login_event(actor: Actor, result: str, user: Any, reason: str) -> AuditEvent:
    """A refused login. The name typed is kept only when it is an account's: an unknown name
    is often a password typed into the wrong field, and must not reach the audit log."""
    if user is None:
        return actor.event("auth:login", result, details={"reason": reason, "unknown_user": True})
    return actor.event(
        "auth:login",
        result,
        actor=user.username,
        actor_type="user",
        object_type="User",
        object_id=user.id,
        details={"reason": reason},
    )


def _scope_type(action: str) -> str:
    from provisioning.core.auth import _type_of

    return _type_of(action)
