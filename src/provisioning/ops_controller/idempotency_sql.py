"""The idempotency store on the platform's state store (SQLite or PostgreSQL).

Tables ``ctl_idempotency`` (one row per ``jti``) and ``ctl_outbox`` (audit events waiting for
delivery), migrated by Alembic from ``ops_controller/migrations`` with the version table
``alembic_version_ops_controller``. Every operation is one transaction function run by the
:class:`~provisioning.core.store.Database`:

* ``claim`` is ``INSERT … ON CONFLICT (jti) DO NOTHING RETURNING jti`` (the dialect's own
  insert construct) followed, when nothing was inserted, by a read of the existing row in the
  same transaction. On PostgreSQL a concurrent insert of the same key waits for the first to
  commit and then does nothing; on SQLite writes are serialised anyway.
* ``mark_dispatched`` and ``finish`` are *conditional* updates (``WHERE state IN (…)``), so a
  racing finish re-checks the state under the row lock and updates nothing: it writes no
  outbox row and answers ``False``. Only when nothing was updated is the row read to tell
  "unknown", "already terminal" and "not allowed" apart.
* ``ctl_outbox.id`` is a time-ordered UUID (:func:`~.idempotency.new_outbox_id`); pending
  events are read in id order. The columns (``id``, ``created_at``, ``event``) are the ones
  :class:`~provisioning.core.audit_relay.AuditRelay` expects, so it can deliver this outbox.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Row

from provisioning.core.clock import as_utc
from provisioning.core.errors import StoreError
from provisioning.core.store import Database, open_database, upgrade
from provisioning.ops_controller.idempotency import (
    DISPATCH_FROM,
    FINISH_FROM,
    TERMINAL_STATES,
    IdempotencyRecord,
    OutboxEntry,
    TokenState,
    check_jti,
    check_limit,
    check_op_type,
    check_workflow_id,
    dispatch_refused,
    finish_refused,
    json_object,
    new_outbox_id,
    not_found,
    terminal_state,
    token_state,
    utc,
)

__all__ = ["SqlIdempotencyStore", "idempotency", "outbox"]

VERSION_TABLE = "alembic_version_ops_controller"

metadata = MetaData()

idempotency = Table(
    "ctl_idempotency",
    metadata,
    Column("jti", String(255), primary_key=True),
    Column("op_type", String(100), nullable=False),
    Column("state", String(20), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("workflow_id", String(200), nullable=True),
    Column("outcome", JSON, nullable=True),
    Column("reason", Text, nullable=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("dispatched_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)
Index("ix_ctl_idempotency_state", idempotency.c.state, idempotency.c.updated_at)

outbox = Table(
    "ctl_outbox",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("jti", String(255), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("event", JSON, nullable=False),
)

_T = idempotency.c


class SqlIdempotencyStore:
    """:class:`~.idempotency.IdempotencyStore` on a :class:`Database` (SQLite or PostgreSQL).

    The store does not close a database it was handed (services share one state store);
    :meth:`from_url` opens one of its own, which :meth:`close` closes.
    """

    def __init__(self, db: Database, *, owns_db: bool = False) -> None:
        self.db = db
        self._owns_db = owns_db

    @classmethod
    def from_url(cls, url: str, *, sqlite_synchronous: str = "FULL") -> SqlIdempotencyStore:
        """A store on its own database (``sqlite:///<path>`` or ``postgresql://…``).

        Raises:
            ConfigError: the URL names no supported backend.
        """
        return cls(open_database(url, sqlite_synchronous=sqlite_synchronous), owns_db=True)

    async def migrate(self) -> None:
        """Create or upgrade the ops-controller's tables."""
        await upgrade(self.db, Path(__file__).parent / "migrations", VERSION_TABLE)

    async def open(self) -> None:
        await self.migrate()

    async def close(self) -> None:
        if self._owns_db:
            await self.db.close()

    # ------------------------------------------------------------------ token records

    async def claim(
        self, jti: str, op_type: str, *, now: datetime
    ) -> tuple[IdempotencyRecord, bool]:
        at = utc(now)
        row = {
            "jti": check_jti(jti),
            "op_type": check_op_type(op_type),
            "state": TokenState.RECEIVED.value,
            "attempts": 0,
            "received_at": at,
            "updated_at": at,
        }
        return await self.db.run_write(partial(_claim, self.db.dialect, row))

    async def mark_dispatched(
        self, jti: str, *, workflow_id: str | None = None, now: datetime | None = None
    ) -> IdempotencyRecord:
        check_jti(jti)
        at = utc(now)
        values: dict[str, Any] = {
            "state": TokenState.DISPATCHED.value,
            "attempts": _T.attempts + 1,
            "dispatched_at": at,
            "updated_at": at,
        }
        if workflow_id is not None:
            values["workflow_id"] = check_workflow_id(workflow_id)
        return await self.db.run_write(partial(_mark_dispatched, jti, values))

    async def finish(
        self,
        jti: str,
        state: TokenState | str,
        *,
        audit_event: dict[str, Any],
        outcome: dict[str, Any] | None = None,
        reason: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        check_jti(jti)
        to = terminal_state(state)
        at = utc(now)
        values = {
            "state": to.value,
            "outcome": None if outcome is None else json_object(outcome, "outcome"),
            "reason": reason,
            "finished_at": at,
            "updated_at": at,
        }
        event_row = {
            "id": new_outbox_id(),
            "jti": jti,
            "created_at": at,
            "event": json_object(audit_event, "audit_event"),
        }
        return await self.db.run_write(partial(_finish, jti, to, values, event_row))

    async def get(self, jti: str) -> IdempotencyRecord | None:
        check_jti(jti)
        row = await self.db.run_read(partial(_select_row, jti))
        return None if row is None else _record(row)

    async def in_state(self, state: TokenState | str, limit: int = 100) -> list[IdempotencyRecord]:
        q = (
            select(idempotency)
            .where(_T.state == token_state(state).value)
            .order_by(_T.updated_at, _T.jti)
            .limit(check_limit(limit))
        )
        rows = await self.db.run_read(lambda c: list(c.execute(q)))
        return [_record(r) for r in rows]

    # ------------------------------------------------------------------ outbox

    async def outbox_pending(self, limit: int = 100) -> list[OutboxEntry]:
        q = select(outbox.c.id, outbox.c.event).order_by(outbox.c.id).limit(check_limit(limit))
        rows = await self.db.run_read(lambda c: list(c.execute(q)))
        return [(str(r.id), dict(r.event)) for r in rows]

    async def outbox_done(self, ids: Sequence[str]) -> int:
        wanted = [str(i) for i in ids]
        if not wanted:
            return 0
        stmt = delete(outbox).where(outbox.c.id.in_(wanted))
        return await self.db.run_write(lambda c: int(c.execute(stmt).rowcount))


# ---------------------------------------------------------------------- transaction functions


def _claim(dialect: str, row: dict[str, Any], conn: Connection) -> tuple[IdempotencyRecord, bool]:
    make_insert: Callable[..., Any] = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = (
        make_insert(idempotency)
        .values(row)
        .on_conflict_do_nothing(index_elements=[_T.jti])
        .returning(_T.jti)
    )
    inserted = conn.execute(stmt).first() is not None
    existing = _select_row(row["jti"], conn)
    if existing is None:  # inserted now or by the transaction we conflicted with: unreachable
        raise StoreError(f"token {row['jti']!r} neither inserted nor found")
    return _record(existing), inserted


def _mark_dispatched(jti: str, values: dict[str, Any], conn: Connection) -> IdempotencyRecord:
    allowed = [s.value for s in DISPATCH_FROM]
    stmt = update(idempotency).where(_T.jti == jti, _T.state.in_(allowed)).values(values)
    updated = conn.execute(stmt).rowcount
    row = _select_row(jti, conn)
    if row is None:
        raise not_found(jti)
    if not updated:
        raise dispatch_refused(jti, TokenState(row.state))
    return _record(row)


def _finish(
    jti: str,
    to: TokenState,
    values: dict[str, Any],
    event_row: dict[str, Any],
    conn: Connection,
) -> bool:
    allowed = [s.value for s in FINISH_FROM[to]]
    stmt = update(idempotency).where(_T.jti == jti, _T.state.in_(allowed)).values(values)
    if conn.execute(stmt).rowcount:
        conn.execute(outbox.insert().values(event_row))
        return True
    row = _select_row(jti, conn)
    if row is None:
        raise not_found(jti)
    current = TokenState(row.state)
    if current in TERMINAL_STATES:  # already terminal: the first outcome stands
        return False
    raise finish_refused(jti, current, to)


def _select_row(jti: str, conn: Connection) -> Row[Any] | None:
    return conn.execute(select(idempotency).where(_T.jti == jti)).first()


def _record(row: Row[Any]) -> IdempotencyRecord:
    received_at = as_utc(row.received_at)
    updated_at = as_utc(row.updated_at)
    assert received_at is not None and updated_at is not None  # NOT NULL columns
    return IdempotencyRecord(
        jti=row.jti,
        op_type=row.op_type,
        state=TokenState(row.state),
        attempts=int(row.attempts),
        workflow_id=row.workflow_id,
        outcome=None if row.outcome is None else dict(row.outcome),
        reason=row.reason,
        received_at=received_at,
        updated_at=updated_at,
        dispatched_at=as_utc(row.dispatched_at),
        finished_at=as_utc(row.finished_at),
    )
