"""The hash-chained audit log: append, verify, search and export, as transaction functions.

Every record carries the hash of the one before it::

    canonical = json.dumps(record without "hash", sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)          # ts as RFC 3339 UTC, microseconds
    hash      = sha256(prev_hash + canonical)           # hex; the first prev_hash is 64 zeros

``seq`` counts records from 1 without gaps and is part of the hashed content, so
:func:`verify` finds an edited record (its hash no longer matches), a deleted one (a gap in
``seq``) and reordered or swapped ones (a ``prev_hash`` that is not the previous record's hash).
Dropping the newest records leaves a valid shorter chain: pass a head remembered elsewhere
(``known_head``, e.g. kept by the audit mirror) to catch that too.

The functions are synchronous transaction bodies over a SQLAlchemy
:class:`~sqlalchemy.engine.Connection` (run them with ``Database.run_write``/``run_read``), so a
record is written in the same transaction as the change it records. :func:`append` reads the
chain's head inside its transaction: on PostgreSQL under a transaction-scoped advisory lock, so
two writers never fork the chain; on SQLite the single writer (``BEGIN IMMEDIATE``) already
serialises them. :func:`redact` masks secrets in ``details`` and :func:`append` always applies it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlalchemy import ColumnElement, Row, String, insert, select, text
from sqlalchemy.engine import Connection

from provisioning.control_center.tables_audit import cc_audit
from provisioning.core.errors import ValidationError

__all__ = [
    "GENESIS_HASH",
    "MAX_PAGE",
    "REDACTED",
    "ActorType",
    "AuditEvent",
    "AuditResult",
    "VerifyResult",
    "append",
    "canonical_json",
    "export_lines",
    "lock_chain",
    "query",
    "redact",
    "verify",
]

ActorType = Literal["user", "apikey", "anonymous", "system"]
AuditResult = Literal["success", "denied", "failure", "error"]
GENESIS_HASH = "0" * 64
REDACTED = "[redacted]"
MAX_PAGE = 1000
_ACTOR_TYPES = frozenset(get_args(ActorType))
_RESULTS = frozenset(get_args(AuditResult))
_LOCK_KEY = 0x7072766E67617564  # "prvngaud": serialises appends across PostgreSQL writers
_PAGE = 500


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """What happened, as the caller knows it; :func:`append` adds seq, id, ts and the hashes.

    ``action`` is ``<resource>:<verb>`` (``auth:login``, ``workflow:create``); ``source`` the
    client address. Text fields longer than their column are cut to fit.
    """

    action: str
    result: AuditResult = "success"
    actor: str | None = None
    actor_type: ActorType = "anonymous"
    object_type: str | None = None
    object_id: str | None = None
    source: str | None = None
    request_id: str | None = None
    service: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`.

    ``checked`` counts the records that verified (all of them when ``ok``); ``first_bad_seq``
    is the first record that did not (for a deletion, the first missing seq). ``last_seq`` and
    ``last_hash`` are the head of the verified part: keep them to detect truncation later.
    """

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None
    last_seq: int | None = None
    last_hash: str | None = None


# ---------------------------------------------------------------------- redaction

_SECRET_PARTS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "cookie",
    "refresh",
    "credential",
    "private_key",
    "privatekey",
    "csrf",
    "mfa_code",
)
_SECRET_WORDS = frozenset({"pwd", "pass", "otp", "totp", "pin", "jwt", "bearer"})
_SECRET_VALUES = (
    # A JWT (header.payload.signature, base64url JSON).
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # An API key prvng_<id>_<secret>; the bare prefix prvng_<id> stays visible.
    (re.compile(r"prvng_[A-Za-z0-9]+_[A-Za-z0-9_-]{16,}"), REDACTED),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + REDACTED),
)


def _is_secret_key(key: str) -> bool:
    snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()
    snake = re.sub(r"[^a-z0-9]+", "_", snake)
    if any(part in snake for part in _SECRET_PARTS):
        return True
    return not _SECRET_WORDS.isdisjoint(snake.split("_"))


def _redact_text(value: str) -> str:
    for pattern, replacement in _SECRET_VALUES:
        value = pattern.sub(replacement, value)
    return value


def redact(details: Any) -> Any:
    """A copy of ``details`` with secrets masked as ``"[redacted]"``, recursively.

    A value is masked whole when its key looks secret (password, secret, token, api_key,
    authorization, cookie, refresh, credential, otp, …, in any case or spelling: ``apiKey``,
    ``X-Auth-Token``). Inside other strings, bearer/basic credentials, JWTs and full API keys
    are masked where they appear.
    """
    if isinstance(details, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _is_secret_key(k) else redact(v)
            for k, v in details.items()
        }
    if isinstance(details, list | tuple | set | frozenset):
        return [redact(v) for v in details]
    if isinstance(details, str):
        return _redact_text(details)
    return details


# ---------------------------------------------------------------------- records


_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def _clean(value: str) -> str:
    # PostgreSQL text holds neither NUL nor lone surrogates, and UTF-8 cannot encode the latter:
    # a hostile username must not make the audit write (or the hash) fail.
    return _UNSTORABLE.sub("\ufffd", value)


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, so it reads back from either database exactly as hashed."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, Mapping):
        return {_clean(str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return _rfc3339(value)
    return _clean(str(value))


def _text(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    column_type = cc_audit.c[name].type
    limit = column_type.length if isinstance(column_type, String) else None
    cleaned = _clean(str(value))
    return cleaned[:limit] if limit else cleaned


def _utc(value: datetime) -> datetime:
    """Aware UTC; a naive value (SQLite reads them back so) is taken as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _rfc3339(value: datetime) -> str:
    return _utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(record: Mapping[str, Any]) -> str:
    """The canonical JSON of a record (every field but ``hash``), as hashed."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _chain_hash(prev_hash: str, record: Mapping[str, Any]) -> str:
    return hashlib.sha256((prev_hash + canonical_json(record)).encode("utf-8")).hexdigest()


def _record(row: Row[Any]) -> dict[str, Any]:
    record = dict(row._mapping)
    record["ts"] = _rfc3339(record["ts"])
    return record


# ---------------------------------------------------------------------- writing


def lock_chain(conn: Connection) -> None:
    """Serialise writers of the chain until the caller's transaction ends: on PostgreSQL a
    transaction-scoped advisory lock (taking it again in one transaction is harmless); SQLite
    serialises writers by itself. Take it before reading what the write depends on."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})


def append(
    conn: Connection,
    event: AuditEvent,
    *,
    now: datetime | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """Append ``event`` to the chain inside the caller's transaction; return the stored record.

    The record is a JSON-ready dict of every column (``ts`` as an RFC 3339 string), the same
    shape :func:`query` returns. ``details`` are redacted first. ``event_id`` keeps the id a
    forwarding service gave the event (unique: a second append of it fails).

    Raises:
        ValidationError: ``action`` is empty, or ``actor_type``/``result`` is not a known value.
    """
    if not event.action:
        raise ValidationError("an audit event needs an action such as 'auth:login'", field="action")
    if event.actor_type not in _ACTOR_TYPES:
        raise ValidationError(
            f"audit actor_type must be one of {sorted(_ACTOR_TYPES)}", field="actor_type"
        )
    if event.result not in _RESULTS:
        raise ValidationError(f"audit result must be one of {sorted(_RESULTS)}", field="result")
    lock_chain(conn)
    head = conn.execute(
        select(cc_audit.c.seq, cc_audit.c.hash).order_by(cc_audit.c.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (int(head.seq) + 1, str(head.hash)) if head else (1, GENESIS_HASH)
    ts = _utc(now or datetime.now(UTC))
    record: dict[str, Any] = {
        "seq": seq,
        "id": event_id or str(uuid.uuid4()),
        "ts": _rfc3339(ts),
        "actor": _text("actor", event.actor),
        "actor_type": event.actor_type,
        "action": _text("action", event.action),
        "object_type": _text("object_type", event.object_type),
        "object_id": _text("object_id", event.object_id),
        "result": event.result,
        "source": _text("source", event.source),
        "request_id": _text("request_id", event.request_id),
        "service": _text("service", event.service),
        "details": _jsonable(redact(dict(event.details))),
        "prev_hash": prev_hash,
    }
    record["hash"] = _chain_hash(prev_hash, record)
    conn.execute(insert(cc_audit).values({**record, "ts": ts}))
    return record


# ---------------------------------------------------------------------- verifying


def verify(
    conn: Connection, *, known_head: tuple[int, str] | None = None, page_size: int = _PAGE
) -> VerifyResult:
    """Walk the whole chain in ``seq`` order, ``page_size`` records at a time, and check it.

    ``known_head`` is a ``(seq, hash)`` seen earlier (a previous result's ``last_seq`` and
    ``last_hash``): the record must still be there with that hash, which detects the newest
    records being dropped. Stops at the first problem.
    """
    expected, prev_hash, checked = 1, GENESIS_HASH, 0
    last_seq: int | None = None

    def bad(seq: int, reason: str) -> VerifyResult:
        return VerifyResult(False, checked, seq, reason, last_seq, prev_hash if last_seq else None)

    after = 0
    while True:
        rows = conn.execute(
            select(cc_audit).where(cc_audit.c.seq > after).order_by(cc_audit.c.seq).limit(page_size)
        ).all()
        if not rows:
            break
        for row in rows:
            record = _record(row)
            seq = int(record["seq"])
            if seq > expected:
                missing = f"{expected}" if seq == expected + 1 else f"{expected} to {seq - 1}"
                return bad(expected, f"record(s) {missing} are missing: deleted from the log")
            if seq < expected:
                return bad(seq, f"record {seq} is out of sequence (expected {expected})")
            if record["prev_hash"] != prev_hash:
                return bad(
                    seq,
                    f"record {seq} does not follow record {seq - 1}: records were reordered, "
                    "replaced or re-hashed",
                )
            if _chain_hash(prev_hash, record) != record["hash"]:
                return bad(seq, f"record {seq} was altered: its hash does not match its content")
            if known_head is not None and seq == known_head[0] and record["hash"] != known_head[1]:
                return bad(seq, f"record {seq} is not the one seen before (known head)")
            prev_hash, last_seq = str(record["hash"]), seq
            expected, checked = seq + 1, checked + 1
        after = int(rows[-1].seq)
    if known_head is not None and (last_seq or 0) < known_head[0]:
        return bad(
            expected,
            f"records {expected} to {known_head[0]} are missing: the log was truncated",
        )
    return VerifyResult(True, checked, None, None, last_seq, prev_hash if last_seq else None)


# ---------------------------------------------------------------------- reading


def _filters(
    *,
    actor: str | None,
    action: str | None,
    object_type: str | None,
    object_id: str | None,
    result: str | None,
    since: datetime | None,
    until: datetime | None,
    service: str | None = None,
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if actor is not None:
        where.append(cc_audit.c.actor == actor)
    if action is not None:
        if action.endswith("*"):
            prefix = action[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append(cc_audit.c.action.like(prefix + "%", escape="\\"))
        else:
            where.append(cc_audit.c.action == action)
    if object_type is not None:
        where.append(cc_audit.c.object_type == object_type)
    if object_id is not None:
        where.append(cc_audit.c.object_id == object_id)
    if service is not None:
        where.append(cc_audit.c.service == service)
    if result is not None:
        if result not in _RESULTS:
            raise ValidationError(f"result must be one of {sorted(_RESULTS)}", field="result")
        where.append(cc_audit.c.result == result)
    # Bound as UTC: SQLite compares the stored UTC text, which drops any offset.
    if since is not None:
        where.append(cc_audit.c.ts >= _utc(since))
    if until is not None:
        where.append(cc_audit.c.ts < _utc(until))
    return where


def query(
    conn: Connection,
    *,
    actor: str | None = None,
    action: str | None = None,
    object_type: str | None = None,
    object_id: str | None = None,
    result: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    service: str | None = None,
    limit: int = 100,
    offset: int = 0,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    """Records matching every given filter, in ``seq`` order (newest first on request).

    ``action`` ending in ``*`` matches a prefix (``auth:*``); ``since`` is inclusive, ``until``
    exclusive (naive datetimes are UTC). Records are JSON-ready dicts as :func:`append` returns.

    Raises:
        ValidationError: ``limit`` outside 1..1000, a negative ``offset`` or an unknown ``result``.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationError(f"limit must be between 1 and {MAX_PAGE}", field="limit")
    if offset < 0:
        raise ValidationError("offset must be 0 or more", field="offset")
    where = _filters(
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=object_id,
        result=result,
        since=since,
        until=until,
        service=service,
    )
    order = cc_audit.c.seq.desc() if newest_first else cc_audit.c.seq
    stmt = select(cc_audit).where(*where).order_by(order).limit(limit).offset(offset)
    return [_record(row) for row in conn.execute(stmt)]


def export_lines(
    conn: Connection,
    *,
    actor: str | None = None,
    action: str | None = None,
    object_type: str | None = None,
    object_id: str | None = None,
    result: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    service: str | None = None,
    after_seq: int = 0,
    page_size: int = _PAGE,
) -> Iterator[str]:
    """Every matching record after ``after_seq`` as one JSON line (ending in ``\\n``), in
    ``seq`` order, read ``page_size`` at a time.

    A generator over ``conn``: consume it inside the transaction body. To stream a large export
    over several transactions, resume with ``after_seq`` = the last line's ``seq``.

    Raises:
        ValidationError: an unknown ``result``.
    """
    where = _filters(
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=object_id,
        result=result,
        since=since,
        until=until,
        service=service,
    )
    while True:
        stmt = (
            select(cc_audit)
            .where(cc_audit.c.seq > after_seq, *where)
            .order_by(cc_audit.c.seq)
            .limit(page_size)
        )
        rows = conn.execute(stmt).all()
        for row in rows:
            yield json.dumps(_record(row), ensure_ascii=False, separators=(",", ":")) + "\n"
        if len(rows) < page_size:
            return
        after_seq = int(rows[-1].seq)
