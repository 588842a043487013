"""Durable state of the ops-keeper: operations and change freezes on a
:class:`~provisioning.core.store.Database` (SQLite or PostgreSQL).

State changes of an operation are compare-and-set updates (``… WHERE id = :id AND state =
:from``), so two approvers, two keeper processes or an approver and the expiry sweep never both
win. An ``approved`` row holds its signed token: the row is the publishing outbox, and
:meth:`KeeperStore.claim_due` hands each due row to one publisher at a time by moving its
``next_attempt_at`` forward in the same statement that checks it.

**Every decision is audited in its own transaction.** Each method that records a decision
(:meth:`~KeeperStore.insert_op`, :meth:`~KeeperStore.update_if`, :meth:`~KeeperStore.expire`,
:meth:`~KeeperStore.insert_freeze`, :meth:`~KeeperStore.end_freeze`) writes the decision's
:class:`OutboxEvent` into ``keeper_ops_audit_outbox`` in the same transaction as the state
change, and only when the state really changed (a compare-and-set that lost writes no event).
So a decision recorded is never missing from ``ops.audit.>`` and none is audited twice; the
service's publisher relays the outbox (:meth:`~KeeperStore.audit_pending`, in ``seq`` order, and
:meth:`~KeeperStore.audit_done` once NATS acknowledged).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, insert, not_, or_, select, update
from sqlalchemy.engine import Connection, Row

from provisioning.core.clock import as_utc, utcnow
from provisioning.core.errors import NotFound
from provisioning.core.store import Database, upgrade
from provisioning.ops_keeper.api import OpState
from provisioning.ops_keeper.policy import Freeze
from provisioning.ops_keeper.tables import freezes, ops, ops_audit_outbox

__all__ = ["ExpiredEvent", "FreezeEvent", "KeeperStore", "OutboxEvent", "freeze_doc", "op_doc"]

_DATES = (
    "token_expires_at",
    "approval_expires_at",
    "created_at",
    "updated_at",
    "decided_at",
    "published_at",
)
_HIDDEN = {"token", "next_attempt_at"}


@dataclass(frozen=True)
class OutboxEvent:
    """One audit event (the JSON object published) and its subject, ``ops.audit.<outcome>``."""

    subject: str
    event: dict[str, Any]


#: The audit event of an operation the expiry sweep ended: ``(operation, former state)``.
ExpiredEvent = Callable[[dict[str, Any], str], OutboxEvent]
#: The audit event of a freeze just lifted: ``(freeze)``.
FreezeEvent = Callable[[dict[str, Any]], OutboxEvent]


def op_doc(row: Row[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """An operation as the API shows it: every column but the token, dates in UTC."""
    data = dict(row._mapping) if isinstance(row, Row) else dict(row)
    doc = {k: v for k, v in data.items() if k not in _HIDDEN}
    for key in _DATES:
        doc[key] = as_utc(doc.get(key))
    return doc


def freeze_doc(row: Row[Any], now: datetime) -> dict[str, Any]:
    doc = dict(row._mapping)
    for key in ("until", "created_at", "ended_at"):
        doc[key] = as_utc(doc[key])
    doc["active"] = doc["ended_at"] is None and (doc["until"] is None or now < doc["until"])
    return doc


class KeeperStore:
    """The keeper's tables on a :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def migrate(self) -> None:
        """Create or upgrade the keeper's tables."""
        await upgrade(self.db, Path(__file__).parent / "migrations", "alembic_version_ops_keeper")

    # ------------------------------------------------------------------ operations

    async def insert_op(self, row: dict[str, Any], audit: OutboxEvent) -> None:
        """Record a new operation and the audit event of its decision."""

        def write(conn: Connection) -> None:
            conn.execute(insert(ops).values(**row))
            _add_event(conn, audit)

        await self.db.run_write(write)

    async def get_op(self, op_id: str) -> dict[str, Any]:
        """Raises: NotFound."""
        return op_doc(await self.db.run_read(partial(_op_row, op_id=op_id)))

    async def token_of(self, op_id: str) -> str | None:
        """The signed token of an operation that is still waiting to be published."""
        row = await self.db.run_read(partial(_op_row, op_id=op_id))
        return None if row.token is None else str(row.token)

    async def list_ops(
        self, *, state: str | None, requester: str | None, limit: int, offset: int
    ) -> list[dict[str, Any]]:
        def read(conn: Connection) -> list[dict[str, Any]]:
            q = select(ops).order_by(ops.c.created_at.desc(), ops.c.id)
            if state:
                q = q.where(ops.c.state == state)
            if requester is not None:
                q = q.where(ops.c.requester == requester)
            return [op_doc(r) for r in conn.execute(q.limit(limit).offset(offset))]

        return await self.db.run_read(read)

    async def update_if(
        self,
        op_id: str,
        from_state: OpState,
        values: dict[str, Any],
        audit: OutboxEvent | None = None,
    ) -> bool:
        """Update the operation only if it is still in ``from_state``, and then write ``audit``
        in the same transaction; True if it was."""
        stmt = (
            update(ops).where(ops.c.id == op_id, ops.c.state == from_state.value).values(**values)
        )

        def write(conn: Connection) -> bool:
            if conn.execute(stmt).rowcount != 1:
                return False
            if audit is not None:
                _add_event(conn, audit)
            return True

        return await self.db.run_write(write)

    async def publish_failed(self, op_id: str, error: str, retry_at: datetime) -> None:
        """Count a failed publication; the row stays ``approved`` for the next try."""
        stmt = (
            update(ops)
            .where(ops.c.id == op_id, ops.c.state == OpState.APPROVED.value)
            .values(
                publish_attempts=ops.c.publish_attempts + 1,
                last_publish_error=error[:2000],
                next_attempt_at=retry_at,
            )
        )
        await self.db.run_write(lambda c: c.execute(stmt))

    async def claim_due(self, now: datetime, lease_s: float, limit: int) -> list[dict[str, Any]]:
        """``approved`` operations whose next publication try is due, with their tokens; each
        is claimed for ``lease_s`` (another publisher skips it meanwhile)."""

        def claim(conn: Connection) -> list[dict[str, Any]]:
            due = (ops.c.state == OpState.APPROVED.value, ops.c.next_attempt_at <= now)
            ids = conn.execute(
                select(ops.c.id).where(*due).order_by(ops.c.next_attempt_at).limit(limit)
            ).scalars()
            out = []
            for op_id in list(ids):
                later = now + timedelta(seconds=lease_s)
                stmt = update(ops).where(ops.c.id == op_id, *due).values(next_attempt_at=later)
                if conn.execute(stmt).rowcount == 1:
                    row = conn.execute(select(ops).where(ops.c.id == op_id)).one()
                    out.append({**op_doc(row), "token": row.token})
            return out

        return await self.db.run_write(claim)

    async def expire(self, now: datetime, audit_of: ExpiredEvent) -> list[tuple[str, str]]:
        """End operations that waited too long: pending ones past their approval window and
        approved ones whose token expired unpublished, each with its audit event
        (``audit_of(operation, former state)``). Answers ``(id, former state)``."""

        def sweep(conn: Connection) -> list[tuple[str, str]]:
            out: list[tuple[str, str]] = []
            pending = select(ops.c.id, ops.c.approval_expires_at).where(
                ops.c.state == OpState.PENDING_APPROVAL.value, ops.c.approval_expires_at <= now
            )
            for r in conn.execute(pending).all():
                at = as_utc(r.approval_expires_at)
                why = f"not approved before the approval window ended at {_iso(at)}"
                if _end(conn, r.id, OpState.PENDING_APPROVAL, why, now, audit_of):
                    out.append((r.id, OpState.PENDING_APPROVAL.value))
            approved = select(ops.c.id, ops.c.token_expires_at, ops.c.last_publish_error).where(
                ops.c.state == OpState.APPROVED.value, ops.c.token_expires_at <= now
            )
            for a in conn.execute(approved).all():
                why = (
                    f"its token expired at {_iso(as_utc(a.token_expires_at))} before it could "
                    f"be published (last error: {a.last_publish_error or 'none'}); request again"
                )
                if _end(conn, a.id, OpState.APPROVED, why, now, audit_of):
                    out.append((a.id, OpState.APPROVED.value))
            return out

        return await self.db.run_write(sweep)

    async def state_counts(self) -> dict[str, int]:
        def read(conn: Connection) -> dict[str, int]:
            q = select(ops.c.state, func.count()).group_by(ops.c.state)
            return {str(s): int(n) for s, n in conn.execute(q).all()}

        return await self.db.run_read(read)

    # ------------------------------------------------------------------ audit outbox

    async def audit_pending(self, limit: int) -> list[tuple[int, str, dict[str, Any]]]:
        """Up to ``limit`` audit events waiting to be published, oldest first, as
        ``(seq, subject, event)``."""
        o = ops_audit_outbox.c
        q = select(o.seq, o.subject, o.event).order_by(o.seq).limit(limit)
        rows = await self.db.run_read(lambda c: list(c.execute(q)))
        return [(int(r.seq), str(r.subject), dict(r.event)) for r in rows]

    async def audit_done(self, seqs: Sequence[int]) -> int:
        """Remove published audit events; answers how many were removed."""
        if not seqs:
            return 0
        stmt = delete(ops_audit_outbox).where(ops_audit_outbox.c.seq.in_(list(seqs)))
        return await self.db.run_write(lambda c: int(c.execute(stmt).rowcount))

    async def audit_backlog(self) -> int:
        """Audit events waiting to be published."""
        q = select(func.count()).select_from(ops_audit_outbox)
        return int(await self.db.run_read(lambda c: c.execute(q).scalar_one()))

    # ------------------------------------------------------------------ freezes

    async def active_freezes(self, now: datetime) -> list[Freeze]:
        def read(conn: Connection) -> list[Freeze]:
            q = select(freezes).where(
                freezes.c.ended_at.is_(None),
                or_(freezes.c.until.is_(None), freezes.c.until > now),
            )
            return [
                Freeze(r.id, r.reason, r.scope, as_utc(r.until), r.created_by)
                for r in conn.execute(q.order_by(freezes.c.created_at, freezes.c.id))
            ]

        return await self.db.run_read(read)

    async def insert_freeze(
        self, row: dict[str, Any], now: datetime, audit: OutboxEvent
    ) -> dict[str, Any]:
        """Start a freeze and write its audit event."""

        def write(conn: Connection) -> dict[str, Any]:
            conn.execute(insert(freezes).values(**row))
            _add_event(conn, audit)
            return freeze_doc(_freeze_row(conn, row["id"]), now)

        return await self.db.run_write(write)

    async def end_freeze(
        self, freeze_id: str, who: str, now: datetime, audit_of: FreezeEvent
    ) -> dict[str, Any]:
        """Lift a freeze with the audit event ``audit_of(freeze)`` (one already lifted stays as
        it was, and is not audited again).

        Raises:
            NotFound: no freeze has this id.
        """

        def write(conn: Connection) -> dict[str, Any]:
            _freeze_row(conn, freeze_id)
            lifted = conn.execute(
                update(freezes)
                .where(freezes.c.id == freeze_id, freezes.c.ended_at.is_(None))
                .values(ended_at=now, ended_by=who)
            ).rowcount
            doc = freeze_doc(_freeze_row(conn, freeze_id), now)
            if lifted == 1:
                _add_event(conn, audit_of(doc))
            return doc

        return await self.db.run_write(write)

    async def list_freezes(self, state: str, now: datetime) -> list[dict[str, Any]]:
        """``state``: active | ended | all; newest first."""

        active = and_(
            freezes.c.ended_at.is_(None), or_(freezes.c.until.is_(None), freezes.c.until > now)
        )

        def read(conn: Connection) -> list[dict[str, Any]]:
            q = select(freezes).order_by(freezes.c.created_at.desc(), freezes.c.id)
            if state == "active":
                q = q.where(active)
            elif state == "ended":
                q = q.where(not_(active))
            return [freeze_doc(r, now) for r in conn.execute(q.limit(1000))]

        return await self.db.run_read(read)


def _op_row(conn: Connection, op_id: str) -> Row[Any]:
    row = conn.execute(select(ops).where(ops.c.id == op_id)).first()
    if row is None:
        raise NotFound(f"operation {op_id} not found", op_id=op_id)
    return row


def _freeze_row(conn: Connection, freeze_id: str) -> Row[Any]:
    row = conn.execute(select(freezes).where(freezes.c.id == freeze_id)).first()
    if row is None:
        raise NotFound(f"change freeze {freeze_id} not found", freeze_id=freeze_id)
    return row


def _add_event(conn: Connection, audit: OutboxEvent) -> None:
    row = {
        "id": audit.event["id"],
        "subject": audit.subject,
        "event": audit.event,
        "created_at": utcnow(),
    }
    conn.execute(insert(ops_audit_outbox).values(**row))


def _end(
    conn: Connection,
    op_id: str,
    from_state: OpState,
    why: str,
    now: datetime,
    audit_of: ExpiredEvent,
) -> bool:
    values: dict[str, Any] = {
        "state": OpState.EXPIRED.value,
        "token": None,
        "next_attempt_at": None,
        "expired_reason": why,
        "updated_at": now,
    }
    if from_state is OpState.PENDING_APPROVAL:
        values["decided_at"] = now
    stmt = update(ops).where(ops.c.id == op_id, ops.c.state == from_state.value).values(**values)
    if conn.execute(stmt).rowcount != 1:
        return False
    _add_event(conn, audit_of(op_doc(_op_row(conn, op_id)), from_state.value))
    return True


def _iso(at: datetime | None) -> str:
    return at.isoformat() if at is not None else "?"
