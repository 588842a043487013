"""The history of the managed files (table ``cc_config_versions``) as transaction functions:
the per-file lock, the versions, and the write with its optimistic-concurrency check and audit
record in one transaction. See docs/reference/config-management.md ("History")."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from sqlalchemy import Row, func, insert, select, text
from sqlalchemy.engine import Connection

from provisioning.control_center import audit_log
from provisioning.control_center.config_files import ConfigFile, decode_text, sha256_of
from provisioning.control_center.service import Actor
from provisioning.control_center.tables_config import config_versions as cv
from provisioning.core.clock import as_utc
from provisioning.core.errors import Conflict

__all__ = [
    "ON_DISK",
    "conflict",
    "insert_version",
    "latest_version",
    "latest_versions",
    "lock",
    "record_disk",
    "version_doc",
    "write_body",
]

ON_DISK = "on-disk"


def lock(conn: Connection, f: ConfigFile) -> None:
    """Serialise the writers of one file (SQLite's writer is single already)."""
    if conn.dialect.name == "postgresql":
        digest = hashlib.sha256(f"cc-config:{f.ws}:{f.rel}".encode()).digest()
        key = int.from_bytes(digest[:8], "big", signed=True)
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def latest_version(conn: Connection, ws: str, rel: str) -> Row[Any] | None:
    """The newest version of a file, or ``None`` when it has no history."""
    return conn.execute(
        select(cv)
        .where(cv.c.workspace == ws, cv.c.path == rel)
        .order_by(cv.c.version.desc())
        .limit(1)
    ).first()


def latest_versions(conn: Connection, ws: str) -> dict[str, tuple[int, str]]:
    """``{path: (newest version, its sha256)}`` of every file of workspace ``ws``."""
    last = (
        select(cv.c.path, func.max(cv.c.version).label("v"))
        .where(cv.c.workspace == ws)
        .group_by(cv.c.path)
        .subquery()
    )
    q = select(cv.c.path, cv.c.version, cv.c.sha256).join(
        last, (cv.c.path == last.c.path) & (cv.c.version == last.c.v)
    )
    return {r.path: (r.version, r.sha256) for r in conn.execute(q.where(cv.c.workspace == ws))}


def insert_version(
    conn: Connection,
    f: ConfigFile,
    data: bytes,
    version: int,
    author: str,
    author_type: str,
    message: str,
    now: datetime,
    restored_from: int | None = None,
) -> Row[Any]:
    """Record ``data`` as ``version`` of ``f``; answer the new row."""
    conn.execute(
        insert(cv).values(
            workspace=f.ws,
            path=f.rel,
            version=version,
            sha256=sha256_of(data),
            size=len(data),
            content=decode_text(data, f.rel),
            author=author[:200],
            author_type=author_type,
            message=message,
            restored_from=restored_from,
            created_at=now,
        )
    )
    row = latest_version(conn, f.ws, f.rel)
    assert row is not None
    return row


def record_disk(conn: Connection, f: ConfigFile, data: bytes, now: datetime) -> Row[Any]:
    """Record ``data`` (read from disk) unless it is the latest version already."""
    latest = latest_version(conn, f.ws, f.rel)
    if latest is not None and latest.sha256 == sha256_of(data):
        return latest
    if latest is None:
        return insert_version(conn, f, data, 0, ON_DISK, ON_DISK, "found on disk", now)
    msg = "changed on disk outside the control center"
    return insert_version(conn, f, data, latest.version + 1, ON_DISK, ON_DISK, msg, now)


def write_body(
    conn: Connection,
    f: ConfigFile,
    data: bytes,
    expected: str | None,
    message: str,
    actor: Actor,
    action: str,
    restored_from: int | None,
    now: datetime,
) -> dict[str, Any]:
    """The write transaction: lock the file, compare its hash with ``expected`` (a file found
    changed on disk is first recorded as an on-disk version), record the new version and the
    audit record (``action``, never the content), then replace the file. Content equal to the
    file records no version (``unchanged``).

    Raises:
        Conflict: the file on disk is not the one ``expected`` names.
    """
    lock(conn, f)
    current = f.read()
    current_sha = sha256_of(current) if current is not None else None
    if current_sha != expected:
        raise conflict(f, expected, current_sha)
    latest = record_disk(conn, f, current, now) if current is not None else None
    latest = latest or latest_version(conn, f.ws, f.rel)
    unchanged = current == data
    if unchanged:
        assert latest is not None
        row = latest
    else:
        ident = actor.identity
        row = insert_version(
            conn,
            f,
            data,
            0 if latest is None else latest.version + 1,
            ident.username if ident else "anonymous",
            ident.kind if ident else "anonymous",
            message,
            now,
            restored_from,
        )
    details = {
        "workspace": f.ws,
        "path": f.rel,
        "version": row.version,
        "sha256": row.sha256,
        "previous_sha256": current_sha,
        "message": message,
        **({"restored_from": restored_from} if restored_from is not None else {}),
        **({"unchanged": True} if unchanged else {}),
    }
    audit_log.append(
        conn, actor.event(action, object_type="Workspace", object_id=f.ws, details=details)
    )
    if not unchanged:
        f.write(data)  # last: if it fails, the transaction (version, audit) rolls back
    return {
        "workspace": f.ws,
        "path": f.rel,
        "version": row.version,
        "sha256": row.sha256,
        "previous_sha256": current_sha,
        "size": row.size,
        "created": current is None,
        "unchanged": unchanged,
    }


def version_doc(row: Row[Any]) -> dict[str, Any]:
    """A version row as the API shows it (times in UTC)."""
    doc = dict(row._mapping)
    doc.pop("workspace", None)
    doc["created_at"] = as_utc(doc["created_at"])
    return doc


def conflict(f: ConfigFile, expected: str | None, current: str | None) -> Conflict:
    """The 409 of a stale write, naming both hashes."""
    if current is None:
        why = f"{f.rel} does not exist (any more); send expected_sha256 null to create it"
    elif expected is None:
        why = f"{f.rel} exists already (sha256 {current}); send its sha256 to replace it"
    else:
        why = (
            f"{f.rel} changed since it was read: expected sha256 {expected}, it is now "
            f"{current}; read it again and reapply the change"
        )
    return Conflict(why, path=f.rel, expected_sha256=expected, current_sha256=current)
