"""Users, refresh-token families and API keys, as transaction functions.

Secrets are stored only as hashes: passwords with argon2id (``passwords.py``), refresh tokens
and API-key secrets (both ≥ 128 random bits) with SHA-256, compared in constant time.
A refresh token is single-use: using it marks it used and issues the next one of its *family*;
presenting a used token again means it was stolen, so the whole family is revoked.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from provisioning.control_center.tables import api_keys, refresh_tokens, users
from provisioning.core.clock import as_utc
from provisioning.core.errors import Conflict, NotFound, Unauthorized, ValidationError

__all__ = [
    "API_KEY_PREFIX",
    "IssuedRefresh",
    "check_api_key",
    "create_api_key",
    "create_user",
    "family_revoked",
    "find_user",
    "get_user",
    "hash_secret",
    "issue_refresh",
    "list_api_keys",
    "list_users",
    "parse_api_key",
    "revoke_api_key",
    "revoke_family",
    "revoke_other_families",
    "rotate_refresh",
    "update_user",
    "user_doc",
]

API_KEY_PREFIX = "prvng"
_KEY_ID_HEX = 16  # 64-bit public id
_KEY_SECRET_BYTES = 24  # 192-bit secret
_LAST_USED_GRANULARITY = timedelta(seconds=60)


def hash_secret(secret: str) -> str:
    """SHA-256 of a high-entropy secret (refresh token, API-key secret)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def user_doc(row: Any) -> dict[str, Any]:
    """What the API shows of a user: never the hash or the MFA secret."""
    return {
        "id": row.id,
        "username": row.username,
        "roles": list(row.roles or []),
        "disabled": bool(row.disabled),
        "mfa_enabled": row.mfa_secret is not None,
        "created_at": as_utc(row.created_at),
        "updated_at": as_utc(row.updated_at),
    }


# ---------------------------------------------------------------------- users


def create_user(
    conn: Connection, username: str, password_hash: str, roles: Sequence[str], now: datetime
) -> dict[str, Any]:
    """Raises: Conflict when the username is taken."""
    row = {
        "id": str(uuid.uuid4()),
        "username": username,
        "password_hash": password_hash,
        "roles": sorted(set(roles)),
        "disabled": False,
        "mfa_secret": None,
        "mfa_last_step": None,
        "created_at": now,
        "updated_at": now,
        "sessions_valid_after": now - timedelta(seconds=1),
    }
    try:
        with conn.begin_nested():
            conn.execute(users.insert().values(**row))
    except IntegrityError:
        raise Conflict(f"a user named {username!r} already exists") from None
    return user_doc(conn.execute(select(users).where(users.c.id == row["id"])).one())


def find_user(conn: Connection, username: str) -> Any | None:
    """The full row (with hash) of a user by name, or None."""
    return conn.execute(select(users).where(users.c.username == username)).first()


def get_user(conn: Connection, user_id: str) -> Any:
    """Raises: NotFound."""
    row = conn.execute(select(users).where(users.c.id == user_id)).first()
    if row is None:
        raise NotFound(f"user {user_id} not found", user_id=user_id)
    return row


def list_users(conn: Connection) -> list[dict[str, Any]]:
    return [user_doc(r) for r in conn.execute(select(users).order_by(users.c.username))]


def update_user(conn: Connection, user_id: str, now: datetime, **values: Any) -> dict[str, Any]:
    """Change a user; disabling or changing the password ends every session and key use.

    Raises: NotFound.
    """
    get_user(conn, user_id)
    end_sessions = values.pop("end_sessions", False)  # not a column, whatever else changes
    if values.get("disabled") or "password_hash" in values or end_sessions:
        # Whole seconds, like the ``iat`` of access tokens: a token issued later in this same
        # second (a login right after a password change) must not count as older. Tokens issued
        # earlier in it die with their refresh family, revoked below (see ``family_revoked``).
        values["sessions_valid_after"] = now.replace(microsecond=0)
        conn.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.user_id == user_id, refresh_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
    if "roles" in values:
        values["roles"] = sorted(set(values["roles"]))
    conn.execute(update(users).where(users.c.id == user_id).values(updated_at=now, **values))
    return user_doc(get_user(conn, user_id))


# ---------------------------------------------------------------------- refresh tokens


@dataclass(frozen=True)
class IssuedRefresh:
    token: str
    family_id: str
    expires_at: datetime


def issue_refresh(
    conn: Connection,
    user_id: str,
    *,
    mfa: bool,
    now: datetime,
    idle_s: float,
    absolute_s: float,
    family_id: str | None = None,
    family_started_at: datetime | None = None,
    source: str | None = None,
) -> IssuedRefresh:
    """A new refresh token (a new family at login, the next of a family on refresh)."""
    token = secrets.token_urlsafe(32)
    started = family_started_at or now
    expires = min(now + timedelta(seconds=idle_s), started + timedelta(seconds=absolute_s))
    fam = family_id or str(uuid.uuid4())
    conn.execute(
        refresh_tokens.insert().values(
            id=str(uuid.uuid4()),
            family_id=fam,
            user_id=user_id,
            token_hash=hash_secret(token),
            mfa=mfa,
            issued_at=now,
            family_started_at=started,
            expires_at=expires,
            used_at=None,
            revoked_at=None,
            source=(source or "")[:100] or None,
        )
    )
    return IssuedRefresh(token=token, family_id=fam, expires_at=expires)


def rotate_refresh(
    conn: Connection, token: str, *, now: datetime, idle_s: float, absolute_s: float
) -> tuple[Any, IssuedRefresh, bool]:
    """Use a refresh token: returns ``(user row, next token, mfa)``.

    Raises:
        Unauthorized: unknown, expired or revoked token, disabled user — or a token already
            used, in which case its whole family is revoked first (the revocation is kept even
            though the caller's request fails: the caller must commit before raising).
    """
    row = conn.execute(
        select(refresh_tokens).where(refresh_tokens.c.token_hash == hash_secret(token))
    ).first()
    if row is None:
        raise Unauthorized("refresh token is not valid; log in again")
    if row.used_at is not None or row.revoked_at is not None:
        if row.used_at is not None and row.revoked_at is None:
            revoke_family(conn, row.family_id, now)
            raise _ReuseDetected(row.family_id, row.user_id)
        raise Unauthorized("refresh token is not valid; log in again")
    if as_utc(row.expires_at) <= now:  # type: ignore[operator]
        raise Unauthorized("refresh token expired; log in again")
    user = get_user(conn, row.user_id)
    if user.disabled:
        raise Unauthorized("refresh token is not valid; log in again")
    conn.execute(update(refresh_tokens).where(refresh_tokens.c.id == row.id).values(used_at=now))
    nxt = issue_refresh(
        conn,
        row.user_id,
        mfa=bool(row.mfa),
        now=now,
        idle_s=idle_s,
        absolute_s=absolute_s,
        family_id=row.family_id,
        family_started_at=as_utc(row.family_started_at),
        source=row.source,
    )
    return user, nxt, bool(row.mfa)


class _ReuseDetected(Unauthorized):
    """A used refresh token came back: its family is revoked; log in again."""

    code = "unauthorized"

    def __init__(self, family_id: str, user_id: str) -> None:
        super().__init__("refresh token was already used; every session of this login is revoked")
        self.family_id = family_id
        self.user_id = user_id


def revoke_family(conn: Connection, family_id: str, now: datetime) -> int:
    result = conn.execute(
        update(refresh_tokens)
        .where(refresh_tokens.c.family_id == family_id, refresh_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount or 0)


def revoke_other_families(
    conn: Connection, user_id: str, keep: str | None, now: datetime
) -> tuple[list[str], int]:
    """End every login of the user but ``keep`` (a family id): the families ended, and how
    many of them could still have been renewed (a login whose refresh token had expired
    anyway is ended too, not counted)."""
    q = select(refresh_tokens.c.family_id, refresh_tokens.c.expires_at).where(
        refresh_tokens.c.user_id == user_id, refresh_tokens.c.revoked_at.is_(None)
    )
    if keep is not None:
        q = q.where(refresh_tokens.c.family_id != keep)
    live: set[str] = set()
    every: set[str] = set()
    for r in conn.execute(q):
        every.add(r.family_id)
        expires = as_utc(r.expires_at)
        if expires is not None and expires > now:
            live.add(r.family_id)
    for family_id in sorted(every):
        revoke_family(conn, family_id, now)
    return sorted(every), len(live)


def family_revoked(conn: Connection, family_id: str) -> bool:
    """Whether the login ``family_id`` was ended: logout, reuse of a rotated token, or every
    session of its user ended. Its access tokens (claim ``sid``) are refused from then on."""
    row = conn.execute(
        select(refresh_tokens.c.id)
        .where(refresh_tokens.c.family_id == family_id, refresh_tokens.c.revoked_at.is_not(None))
        .limit(1)
    ).first()
    return row is not None


def family_of(conn: Connection, token: str) -> Any | None:
    return conn.execute(
        select(refresh_tokens.c.family_id, refresh_tokens.c.user_id).where(
            refresh_tokens.c.token_hash == hash_secret(token)
        )
    ).first()


# ---------------------------------------------------------------------- API keys


def parse_api_key(key: str) -> tuple[str, str]:
    """``prvng_<id>_<secret>`` → ``(id, secret)``.

    Raises: Unauthorized for anything else.
    """
    parts = key.split("_", 2)
    if (
        len(parts) != 3
        or parts[0] != API_KEY_PREFIX
        or len(parts[1]) != _KEY_ID_HEX
        or not all(c in "0123456789abcdef" for c in parts[1])
        or not 20 <= len(parts[2]) <= 100
    ):
        raise Unauthorized("API key is not valid")
    return parts[1], parts[2]


def create_api_key(
    conn: Connection,
    user_id: str,
    name: str,
    scopes: Sequence[str],
    expires_at: datetime | None,
    now: datetime,
) -> tuple[dict[str, Any], str]:
    """A new key; returns its listing and the full key, which is never stored nor shown again."""
    key_id = secrets.token_hex(_KEY_ID_HEX // 2)
    secret = secrets.token_urlsafe(_KEY_SECRET_BYTES)
    conn.execute(
        api_keys.insert().values(
            id=key_id,
            user_id=user_id,
            name=name,
            secret_hash=hash_secret(secret),
            scopes=sorted(set(scopes)),
            created_at=now,
            expires_at=expires_at,
            last_used_at=None,
            revoked_at=None,
        )
    )
    row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()
    return _key_doc(row), f"{API_KEY_PREFIX}_{key_id}_{secret}"


def _key_doc(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "prefix": f"{API_KEY_PREFIX}_{row.id}",
        "user_id": row.user_id,
        "name": row.name,
        "scopes": list(row.scopes or []),
        "created_at": as_utc(row.created_at),
        "expires_at": as_utc(row.expires_at),
        "last_used_at": as_utc(row.last_used_at),
        "revoked_at": as_utc(row.revoked_at),
    }


def list_api_keys(conn: Connection, user_id: str | None) -> list[dict[str, Any]]:
    q = select(api_keys).order_by(api_keys.c.created_at.desc())
    if user_id is not None:
        q = q.where(api_keys.c.user_id == user_id)
    return [_key_doc(r) for r in conn.execute(q)]


def get_api_key(conn: Connection, key_id: str) -> dict[str, Any]:
    row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
    if row is None:
        raise NotFound(f"API key {key_id} not found", key_id=key_id)
    return _key_doc(row)


def revoke_api_key(conn: Connection, key_id: str, now: datetime) -> dict[str, Any]:
    """Raises: NotFound."""
    get_api_key(conn, key_id)
    conn.execute(
        update(api_keys)
        .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return get_api_key(conn, key_id)


def check_api_key(conn: Connection, key: str, now: datetime) -> tuple[dict[str, Any], Any]:
    """The key's listing and its owner's row; records the use (at most once a minute).

    Raises: Unauthorized when malformed, unknown, wrong secret, revoked, expired or the owner
    is disabled — all with the same message.
    """
    key_id, secret = parse_api_key(key)
    row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
    bad = Unauthorized("API key is not valid")
    if row is None:
        hmac.compare_digest(hash_secret(secret), "0" * 64)  # same work as a known id
        raise bad
    if not hmac.compare_digest(hash_secret(secret), row.secret_hash):
        raise bad
    if row.revoked_at is not None:
        raise bad
    expires = as_utc(row.expires_at)
    if expires is not None and expires <= now:
        raise bad
    user = get_user(conn, row.user_id)
    if user.disabled:
        raise bad
    last = as_utc(row.last_used_at)
    if last is None or now - last >= _LAST_USED_GRANULARITY:
        conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=now))
    return _key_doc(row), user


def validate_username(username: str) -> str:
    """Raises: ValidationError unless 1-64 of ``[a-z0-9._-]``, starting alphanumeric."""
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", username):
        raise ValidationError(
            "username must be 1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a "
            "letter or digit",
            field="username",
        )
    return username
