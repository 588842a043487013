"""The idempotency store on SurrealDB's embedded engine (PyPI ``surrealdb`` 2.x).

The upstream system keeps its idempotency records in SurrealDB; this store does the same with no
server: ``surrealkv://<path>`` is a file store inside the process (``mem://`` for throwaway use).
Namespace ``provisioning``, database ``ops_controller``; tables:

* ``ctl_idempotency`` — one record per token, **the record id is the jti**
  (``ctl_idempotency:⟨jti⟩``). ``CREATE`` of an existing record id fails, which is the
  idempotency primitive of ``claim``: the create that succeeds wins, every later one reads the
  record it lost to. (Write transactions run one at a time — the engine does not isolate
  concurrent ones, see the quirks below.)
* ``ctl_outbox`` — audit events, record id = a time-ordered UUID (:func:`~.idempotency.
  new_outbox_id`), read back ``ORDER BY id``.
* ``ctl_meta:schema`` — the schema version; :meth:`SurrealIdempotencyStore.open` applies the
  SurrealQL steps of ``_MIGRATIONS`` it is missing, each in one transaction.

``finish`` is one SurrealQL transaction (``BEGIN TRANSACTION; … COMMIT TRANSACTION;``): it reads
the state, and only when the transition is allowed updates the record and creates the outbox
row, then ``RETURN``\\s the state it found, so the outcome and its audit event commit together or
not at all and a second finish writes nothing.

SDK and engine quirks (``surrealdb`` 2.0.0 wheel, which embeds ``surrealdb-core`` 2.3 and
``surrealkv`` 0.9):

* **No fsync by default.** The embedded engine commits without syncing unless the environment
  variable ``SURREAL_SYNC_DATA=true`` is set; it is read once per process when the first
  datastore opens. With ``sync=True`` (the default) :meth:`~SurrealIdempotencyStore.open` sets
  it before connecting — a process-wide setting that must be in place before *any* embedded
  SurrealDB is opened in the process (setting it later has no effect).
* **Concurrent write transactions are not isolated.** Concurrent writes to one record mostly
  fail at commit with "Failed to commit transaction due to a read or write conflict. This
  transaction can be retried" — but not always: measured here (``surrealkv://`` and
  ``mem://``), 50 concurrent ``CREATE``\\s of one record id let **two** of them succeed in ~10 %
  of rounds (the second silently overwrites the first), and 500 concurrent
  ``UPDATE … SET n += 1`` that all answered OK left ``n`` at 486 to 491. So "CREATE of an existing
  id fails" is only an idempotency primitive when writes do not overlap: this store runs its
  write transactions **one at a time** (an ``asyncio.Lock``; the lock file below makes it the
  only writer of the path), which is SQLite's single-writer model too. Reads run concurrently.
  The conflict error is still retried (jittered backoff, up to ``max_retries`` times) in case
  it shows up anyway. (Upstream reports the same class of bug for UNIQUE indexes on the
  ``memory``/``surrealkv`` backends: surrealdb/surrealdb#7303.)
* **Errors carry no structured kind.** The embedded engine answers a failed statement with only
  a message (``status: ERR``), so the SDK raises ``InternalError`` for everything and never
  ``AlreadyExistsError``; errors are classified by their message text here.
* **Python ``None`` is SurrealQL ``NONE``** (the field is removed), not ``NULL``: an object with
  ``None`` values would not read back equal. ``outcome`` and the audit event are therefore
  stored as JSON text, and optional fields are ``option<…>`` (absent when ``None``).
* **Client-side transactions are WebSocket-only** (``begin()``/``commit()`` raise
  ``UnsupportedFeatureError`` on the embedded connection), hence SurrealQL transactions in
  one query. ``RETURN`` inside such a transaction makes it answer that one value only.
* **No lock on the file store.** ``surrealkv`` 0.9 lets a second datastore (another process,
  or another connection in the same process) open a directory already open: each appends to
  the same files without seeing the other's writes (measured: a second in-process store did
  not see a claim the first committed). :meth:`~SurrealIdempotencyStore.open` therefore takes
  an exclusive ``flock`` on ``<path>.lock`` next to the directory and refuses to open a store
  that is open elsewhere; :meth:`~SurrealIdempotencyStore.close` releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from surrealdb import AsyncEmbeddedSurrealConnection, RecordID

from provisioning.core.errors import StoreError
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

__all__ = ["SurrealIdempotencyStore"]

T = TypeVar("T")

NAMESPACE = "provisioning"
DATABASE = "ops_controller"
RECORDS = "ctl_idempotency"
OUTBOX = "ctl_outbox"

_FILE_SCHEMES = {"surrealkv", "surrealkv+versioned", "file"}
_STATES = ", ".join(f"'{s.value}'" for s in TokenState)

# Schema steps, applied in order; step n brings the schema to version n (``ctl_meta:schema``).
_MIGRATIONS: list[str] = [
    f"""
    DEFINE TABLE IF NOT EXISTS {RECORDS} SCHEMAFULL;
    DEFINE FIELD IF NOT EXISTS jti ON {RECORDS} TYPE string;
    DEFINE FIELD IF NOT EXISTS op_type ON {RECORDS} TYPE string;
    DEFINE FIELD IF NOT EXISTS state ON {RECORDS} TYPE string ASSERT $value IN [{_STATES}];
    DEFINE FIELD IF NOT EXISTS attempts ON {RECORDS} TYPE int;
    DEFINE FIELD IF NOT EXISTS workflow_id ON {RECORDS} TYPE option<string>;
    DEFINE FIELD IF NOT EXISTS outcome ON {RECORDS} TYPE option<string>;
    DEFINE FIELD IF NOT EXISTS reason ON {RECORDS} TYPE option<string>;
    DEFINE FIELD IF NOT EXISTS received_at ON {RECORDS} TYPE datetime;
    DEFINE FIELD IF NOT EXISTS updated_at ON {RECORDS} TYPE datetime;
    DEFINE FIELD IF NOT EXISTS dispatched_at ON {RECORDS} TYPE option<datetime>;
    DEFINE FIELD IF NOT EXISTS finished_at ON {RECORDS} TYPE option<datetime>;
    DEFINE INDEX IF NOT EXISTS ix_{RECORDS}_state ON {RECORDS} FIELDS state, updated_at;
    DEFINE TABLE IF NOT EXISTS {OUTBOX} SCHEMAFULL;
    DEFINE FIELD IF NOT EXISTS jti ON {OUTBOX} TYPE string;
    DEFINE FIELD IF NOT EXISTS created_at ON {OUTBOX} TYPE datetime;
    DEFINE FIELD IF NOT EXISTS event ON {OUTBOX} TYPE string;
    """,
]

_FINISH = """
BEGIN TRANSACTION;
LET $before = (SELECT VALUE state FROM ONLY $rid);
IF $before IN $from {
    UPDATE $rid SET state = $to, outcome = $outcome, reason = $reason,
        finished_at = $now, updated_at = $now;
    CREATE $oid CONTENT { jti: $jti, created_at: $now, event: $event };
};
RETURN $before;
COMMIT TRANSACTION;
"""


class _Retry(Exception):
    """A transaction lost an optimistic-concurrency conflict; run it again."""


class _Exists(Exception):
    """``CREATE`` of a record id that exists."""


class SurrealIdempotencyStore:
    """:class:`~.idempotency.IdempotencyStore` on embedded SurrealDB.

    ``location`` is a directory (a ``surrealkv`` file store is kept there) or a SurrealDB URL
    of the embedded engine (``surrealkv://<path>``, ``mem://``). ``sync`` makes every commit
    reach the disk before it returns (see the module docstring: process-wide).
    """

    def __init__(self, location: str | Path, *, sync: bool = True, max_retries: int = 100) -> None:
        if isinstance(location, Path) or "://" not in location:
            location = f"surrealkv://{Path(location).resolve()}"
        self.url = location
        scheme, _, rest = location.partition("://")
        self.path: Path | None = Path(rest) if scheme in _FILE_SCHEMES else None
        self.sync = sync
        self.max_retries = max_retries
        self._conn: AsyncEmbeddedSurrealConnection | None = None
        self._lock_fd: int | None = None
        self._writer = asyncio.Lock()  # the engine does not isolate concurrent writes

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Connect, select the namespace and database, and apply missing schema steps.

        Raises:
            StoreError: the store cannot be opened or its schema is newer than this code.
        """
        if self._conn is not None:
            return
        if self.path is not None:
            self._lock()
            if self.sync:
                os.environ["SURREAL_SYNC_DATA"] = "true"
        conn = AsyncEmbeddedSurrealConnection(self.url)
        try:
            await conn.connect()
            await conn.use(NAMESPACE, DATABASE)
        except Exception as exc:
            self._unlock()
            raise StoreError(f"cannot open SurrealDB store {self.url}: {exc}") from exc
        self._conn = conn
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _migrate(self) -> None:
        version = await self._retrying(
            lambda: self._query("SELECT VALUE version FROM ONLY ctl_meta:schema;")
        )
        have = int(version[0] or 0)
        if have > len(_MIGRATIONS):
            raise StoreError(
                f"the SurrealDB store {self.url} has schema version {have}; this release knows "
                f"up to {len(_MIGRATIONS)}: upgrade the ops-controller"
            )
        for number, step in enumerate(_MIGRATIONS[have:], start=have + 1):
            sql = (
                f"BEGIN TRANSACTION; {step} "
                "UPSERT ctl_meta:schema SET version = $v; COMMIT TRANSACTION;"
            )
            await self._write(partial(self._query, sql, {"v": number}))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                await conn.close()
        finally:
            self._unlock()

    def _lock(self) -> None:
        """Take the store's lock file.

        Raises:
            StoreError: another store (this process or another) has the path open.
        """
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(
                f"the SurrealDB store {self.path} is open in another store or process "
                f"({lock_path} is locked): close it first"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # ------------------------------------------------------------------ token records

    async def claim(
        self, jti: str, op_type: str, *, now: datetime
    ) -> tuple[IdempotencyRecord, bool]:
        at = utc(now)
        doc = {
            "jti": check_jti(jti),
            "op_type": check_op_type(op_type),
            "state": TokenState.RECEIVED.value,
            "attempts": 0,
            "received_at": at,
            "updated_at": at,
        }
        rid = RecordID(RECORDS, jti)

        async def attempt() -> tuple[IdempotencyRecord, bool]:
            try:
                created = await self._query("CREATE $rid CONTENT $doc;", {"rid": rid, "doc": doc})
                return _record(_only(created[0])), True
            except _Exists:
                existing = await self._query("SELECT * FROM ONLY $rid;", {"rid": rid})
                if existing[0] is None:  # deleted meanwhile: cannot happen, but claim again
                    raise _Retry from None
                return _record(existing[0]), False

        return await self._write(attempt)

    async def mark_dispatched(
        self, jti: str, *, workflow_id: str | None = None, now: datetime | None = None
    ) -> IdempotencyRecord:
        rid = RecordID(RECORDS, check_jti(jti))
        params: dict[str, Any] = {
            "rid": rid,
            "now": utc(now),
            "from": sorted(s.value for s in DISPATCH_FROM),
        }
        set_wf = ""
        if workflow_id is not None:
            params["wf"] = check_workflow_id(workflow_id)
            set_wf = ", workflow_id = $wf"
        sql = (
            "UPDATE $rid SET state = 'dispatched', attempts += 1, dispatched_at = $now, "
            f"updated_at = $now{set_wf} WHERE state IN $from RETURN AFTER; "
            "SELECT * FROM ONLY $rid;"
        )

        async def attempt() -> IdempotencyRecord:
            updated, current = await self._query(sql, params)
            if updated:
                return _record(_only(updated))
            if current is None:
                raise not_found(jti)
            state = TokenState(current["state"])
            if state in DISPATCH_FROM:  # claimed between the two statements: try again
                raise _Retry
            raise dispatch_refused(jti, state)

        return await self._write(attempt)

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
        params: dict[str, Any] = {
            "rid": RecordID(RECORDS, jti),
            "jti": jti,
            "to": to.value,
            "from": sorted(s.value for s in FINISH_FROM[to]),
            "outcome": None if outcome is None else _dumps(json_object(outcome, "outcome")),
            "reason": reason,
            "now": utc(now),
            "event": _dumps(json_object(audit_event, "audit_event")),
        }

        async def attempt() -> bool:
            params["oid"] = RecordID(OUTBOX, new_outbox_id())
            (before,) = await self._query(_FINISH, params)
            if before is None:
                raise not_found(jti)
            found = TokenState(before)
            if found in FINISH_FROM[to]:
                return True
            if found in TERMINAL_STATES:  # the first outcome stands
                return False
            raise finish_refused(jti, found, to)

        return await self._write(attempt)

    async def get(self, jti: str) -> IdempotencyRecord | None:
        rid = RecordID(RECORDS, check_jti(jti))
        (row,) = await self._retrying(lambda: self._query("SELECT * FROM ONLY $rid;", {"rid": rid}))
        return None if row is None else _record(row)

    async def in_state(self, state: TokenState | str, limit: int = 100) -> list[IdempotencyRecord]:
        params = {"state": token_state(state).value, "limit": check_limit(limit)}
        sql = (
            f"SELECT * FROM {RECORDS} WHERE state = $state "
            "ORDER BY updated_at ASC, jti ASC LIMIT $limit;"
        )
        (rows,) = await self._retrying(lambda: self._query(sql, params))
        return [_record(r) for r in rows]

    # ------------------------------------------------------------------ outbox

    async def outbox_pending(self, limit: int = 100) -> list[OutboxEntry]:
        sql = f"SELECT id, event FROM {OUTBOX} ORDER BY id ASC LIMIT $limit;"
        (rows,) = await self._retrying(lambda: self._query(sql, {"limit": check_limit(limit)}))
        return [(str(r["id"].id), json.loads(r["event"])) for r in rows]

    async def outbox_done(self, ids: Sequence[str]) -> int:
        rids = [RecordID(OUTBOX, str(i)) for i in ids]
        if not rids:
            return 0
        (deleted,) = await self._write(
            lambda: self._query("DELETE $rids RETURN BEFORE;", {"rids": rids})
        )
        return len(deleted)

    # ------------------------------------------------------------------ plumbing

    async def _query(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Run ``sql``; answer each statement's result.

        Raises:
            _Retry: a transaction conflict (retryable).
            _Exists: a ``CREATE`` hit an existing record.
            StoreError: any other refusal.
        """
        if self._conn is None:
            raise StoreError(f"the SurrealDB store {self.url} is not open: call open() first")
        response = await self._conn.query_raw(sql, params or {})
        error = response.get("error")
        if error is not None:
            message = error.get("message", error) if isinstance(error, dict) else error
            raise StoreError(f"SurrealDB refused the query: {message}")
        results: list[dict[str, Any]] = response.get("result") or []
        failed = [str(r.get("result")) for r in results if r.get("status") == "ERR"]
        if any("can be retried" in m for m in failed):
            raise _Retry(failed[0])
        if any("already exists" in m for m in failed):
            raise _Exists(failed[0])
        if failed:
            # In a failed transaction every statement reports the failure; name the cause.
            cause = next((m for m in failed if "not executed" not in m), failed[0])
            raise StoreError(f"SurrealDB refused the query: {cause}")
        return [r.get("result") for r in results]

    async def _write(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run a write ``attempt`` alone: one write transaction at a time in this store (and the
        lock file makes this store the only writer of its path)."""
        async with self._writer:
            return await self._retrying(attempt)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` again while it loses optimistic-concurrency conflicts.

        Raises:
            StoreError: still conflicting after ``max_retries`` attempts.
        """
        for n in range(self.max_retries):
            try:
                return await attempt()
            except _Retry:
                await asyncio.sleep(random.uniform(0, min(0.05, 0.0005 * 2 ** min(n, 10))))
            except _Exists as exc:  # a CREATE other than claim's: a store bug or a clash
                raise StoreError(f"SurrealDB refused the write: {exc}") from None
        raise StoreError(
            f"SurrealDB store {self.url}: transaction still conflicting after "
            f"{self.max_retries} attempts"
        )


def _only(rows: Any) -> dict[str, Any]:
    """The one record of a ``CREATE``/``UPDATE`` result (a list of one, or the record)."""
    if isinstance(rows, list):
        if len(rows) != 1:
            raise StoreError(f"SurrealDB answered {len(rows)} records where one was expected")
        rows = rows[0]
    if not isinstance(rows, dict):
        raise StoreError(f"SurrealDB answered {type(rows).__name__} where a record was expected")
    return rows


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _dt(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise StoreError(f"SurrealDB answered {value!r} where a datetime was expected")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _record(doc: dict[str, Any]) -> IdempotencyRecord:
    received_at, updated_at = _dt(doc["received_at"]), _dt(doc["updated_at"])
    assert received_at is not None and updated_at is not None  # required fields
    outcome = doc.get("outcome")
    return IdempotencyRecord(
        jti=str(doc["jti"]),
        op_type=str(doc["op_type"]),
        state=TokenState(doc["state"]),
        attempts=int(doc["attempts"]),
        workflow_id=doc.get("workflow_id"),
        outcome=None if outcome is None else json.loads(outcome),
        reason=doc.get("reason"),
        received_at=received_at,
        updated_at=updated_at,
        dispatched_at=_dt(doc.get("dispatched_at")),
        finished_at=_dt(doc.get("finished_at")),
    )
