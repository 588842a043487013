"""The ops-controller's idempotency store: each operation token's ``jti`` is dispatched once.

A token's record moves ``received → dispatched → completed | failed``; the terminal outcome and
its audit event are written in one transaction (a *transactional outbox*), so an outcome that is
recorded is never missing from the audit stream. :class:`IdempotencyStore` is the contract;
``tests/contract/test_idempotency_contract.py`` checks it on every implementation:

* :class:`~provisioning.ops_controller.idempotency_sql.SqlIdempotencyStore` (SQLite and
  PostgreSQL, on the platform's state store), and
* :class:`~provisioning.ops_controller.idempotency_surreal.SurrealIdempotencyStore` (SurrealDB's
  embedded engine on a file store).

The helpers below the protocol (argument checks, the outbox id generator, the transition table)
are shared by the implementations so that every backend accepts and refuses the same things.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from provisioning.core.errors import InvalidState, NotFound, ValidationError

__all__ = [
    "DISPATCH_FROM",
    "FINISH_FROM",
    "MAX_JTI",
    "MAX_OP_TYPE",
    "MAX_WORKFLOW_ID",
    "TERMINAL_STATES",
    "IdempotencyRecord",
    "IdempotencyStore",
    "OutboxEntry",
    "TokenState",
    "new_outbox_id",
]

MAX_JTI = 255
MAX_OP_TYPE = 100
MAX_WORKFLOW_ID = 200


class TokenState(StrEnum):
    """Where a token is on its way: ``received → dispatched → completed | failed``."""

    RECEIVED = "received"
    DISPATCHED = "dispatched"
    COMPLETED = "completed"
    FAILED = "failed"


TERMINAL_STATES = frozenset({TokenState.COMPLETED, TokenState.FAILED})

#: The states ``mark_dispatched`` accepts (``dispatched`` again: re-dispatch after a crash).
DISPATCH_FROM = frozenset({TokenState.RECEIVED, TokenState.DISPATCHED})

#: The states each terminal state may be reached from. A token fails from ``received`` when it
#: is refused before dispatch (bad payload, policy denial); it completes only once dispatched.
FINISH_FROM: dict[TokenState, frozenset[TokenState]] = {
    TokenState.COMPLETED: frozenset({TokenState.DISPATCHED}),
    TokenState.FAILED: frozenset({TokenState.RECEIVED, TokenState.DISPATCHED}),
}

#: One outbox row: ``(outbox_id, audit_event)``.
OutboxEntry = tuple[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """One token's record. Timestamps are timezone-aware UTC.

    ``attempts`` counts the dispatches (``mark_dispatched`` calls); ``outcome`` (a JSON object)
    and ``reason`` (text) are what ``finish`` recorded.
    """

    jti: str
    op_type: str
    state: TokenState
    attempts: int
    workflow_id: str | None
    outcome: dict[str, Any] | None
    reason: str | None
    received_at: datetime
    updated_at: datetime
    dispatched_at: datetime | None
    finished_at: datetime | None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@runtime_checkable
class IdempotencyStore(Protocol):
    """Exactly-once bookkeeping of operation tokens, keyed by ``jti``.

    Contract (every implementation, checked by the contract suite):

    * ``open()`` connects and creates or upgrades the store's schema; it is idempotent and must
      run before any other call. ``close()`` releases everything; reopening the same location
      sees every write that returned before.
    * ``claim(jti, op_type, now=…)`` creates the record in ``received`` (``attempts`` 0,
      ``received_at = updated_at = now``) and answers ``(record, True)``; if the ``jti`` is
      already known it answers ``(existing record, False)`` and changes nothing (not even when
      ``op_type`` differs). Atomic: of any number of concurrent claims of one ``jti`` exactly
      one answers ``True``.
    * ``mark_dispatched(jti, workflow_id=…)`` moves ``received`` or ``dispatched`` (a
      re-dispatch after a crash) to ``dispatched``, adds 1 to ``attempts``, sets
      ``dispatched_at`` and, when given, ``workflow_id`` (``None`` keeps the one recorded).
      Answers the updated record.
    * ``finish(jti, state, outcome=…, reason=…, audit_event=…)`` with ``state`` ``completed``
      (from ``dispatched``) or ``failed`` (from ``received`` or ``dispatched``) writes the
      terminal state, ``finished_at``, ``outcome``, ``reason`` **and** one outbox row holding
      ``audit_event``, all in one transaction, and answers ``True``. On a record that is
      already terminal it is a no-op answering ``False`` — the first outcome stands and no
      second outbox row is written, also when two finishes race.
    * ``get(jti)`` answers the record or ``None``; ``in_state(state, limit)`` answers up to
      ``limit`` records in ``state``, least recently updated first (to reconcile ``dispatched``
      tokens on start).
    * ``outbox_pending(limit)`` answers up to ``limit`` ``(outbox_id, event)`` pairs, oldest
      first; ``outbox_done(ids)`` removes those rows (unknown ids are ignored) and answers how
      many it removed. Outbox ids are unique time-ordered UUID strings, fit for the control
      center's audit event id.
    * ``now`` arguments must be timezone-aware (stored as UTC); ``mark_dispatched`` and
      ``finish`` default to the current time. ``outcome`` and ``audit_event`` must be
      JSON-serialisable objects; they read back as their JSON round trip.

    Raises (every operation, as they apply):
        ValidationError: an argument is malformed (empty or too long ``jti``, naive ``now``,
            ``state`` not terminal, an event that is not JSON).
        NotFound: ``mark_dispatched``/``finish`` of an unknown ``jti``.
        InvalidState: the transition is not allowed (dispatching a terminal token, completing
            one never dispatched); the message names the ``jti`` and both states.
        StoreError: the backend kept refusing the write (SurrealDB conflict retries exhausted).
    """

    async def open(self) -> None:
        """Connect and create or upgrade the schema."""
        ...

    async def claim(
        self, jti: str, op_type: str, *, now: datetime
    ) -> tuple[IdempotencyRecord, bool]:
        """Record a token as ``received``; answer ``(record, is_new)``."""
        ...

    async def mark_dispatched(
        self, jti: str, *, workflow_id: str | None = None, now: datetime | None = None
    ) -> IdempotencyRecord:
        """Move the token to ``dispatched``; answer the updated record."""
        ...

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
        """Record the terminal state with its outbox row; ``False`` if already terminal."""
        ...

    async def get(self, jti: str) -> IdempotencyRecord | None:
        """The token's record, or ``None``."""
        ...

    async def in_state(self, state: TokenState | str, limit: int = 100) -> list[IdempotencyRecord]:
        """Up to ``limit`` records in ``state``, least recently updated first."""
        ...

    async def outbox_pending(self, limit: int = 100) -> list[OutboxEntry]:
        """Up to ``limit`` undelivered audit events, oldest first."""
        ...

    async def outbox_done(self, ids: Sequence[str]) -> int:
        """Remove delivered outbox rows; answer how many were removed."""
        ...

    async def close(self) -> None:
        """Release the connection(s)."""
        ...


# ---------------------------------------------------------------------- shared by implementations


def check_jti(jti: str) -> str:
    """Raises: ValidationError: ``jti`` is empty or longer than :data:`MAX_JTI`."""
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI:
        raise ValidationError(
            f"jti must be a non-empty string of at most {MAX_JTI} characters", field="jti"
        )
    return jti


def check_op_type(op_type: str) -> str:
    """Raises: ValidationError: ``op_type`` is empty or longer than :data:`MAX_OP_TYPE`."""
    if not isinstance(op_type, str) or not op_type or len(op_type) > MAX_OP_TYPE:
        raise ValidationError(
            f"op_type must be a non-empty string of at most {MAX_OP_TYPE} characters",
            field="op_type",
        )
    return op_type


def check_workflow_id(workflow_id: str) -> str:
    """Raises: ValidationError: ``workflow_id`` is empty or longer than :data:`MAX_WORKFLOW_ID`."""
    if not isinstance(workflow_id, str) or not workflow_id or len(workflow_id) > MAX_WORKFLOW_ID:
        raise ValidationError(
            f"workflow_id must be a non-empty string of at most {MAX_WORKFLOW_ID} characters",
            field="workflow_id",
        )
    return workflow_id


def check_limit(limit: int) -> int:
    """Raises: ValidationError: ``limit`` is not a positive integer."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValidationError("limit must be a positive integer", field="limit")
    return limit


def utc(now: datetime | None) -> datetime:
    """``now`` (default: the current time) as UTC.

    Raises:
        ValidationError: ``now`` is naive.
    """
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValidationError("now must be a timezone-aware datetime", field="now")
    return now.astimezone(UTC)


def token_state(state: TokenState | str) -> TokenState:
    """Raises: ValidationError: ``state`` names no state."""
    try:
        return TokenState(state)
    except ValueError:
        names = ", ".join(s.value for s in TokenState)
        raise ValidationError(f"state {state!r} is not one of {names}", field="state") from None


def terminal_state(state: TokenState | str) -> TokenState:
    """Raises: ValidationError: ``state`` is not ``completed`` or ``failed``."""
    s = token_state(state)
    if s not in TERMINAL_STATES:
        raise ValidationError(
            f"finish needs state 'completed' or 'failed', not {s.value!r}", field="state"
        )
    return s


def json_object(value: Any, field: str) -> dict[str, Any]:
    """``value`` as its JSON round trip (what every backend reads back).

    Raises:
        ValidationError: ``value`` is not a JSON-serialisable object.
    """
    if not isinstance(value, dict):
        raise ValidationError(f"{field} must be a JSON object", field=field)
    try:
        out: dict[str, Any] = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{field} is not JSON-serialisable: {exc}", field=field) from None
    return out


def not_found(jti: str) -> NotFound:
    return NotFound(f"no token with jti {jti!r} was claimed", jti=jti)


def dispatch_refused(jti: str, state: TokenState) -> InvalidState:
    return InvalidState(
        f"token {jti!r} is {state.value}: only a received or dispatched token can be dispatched",
        jti=jti,
        state=state.value,
        to=TokenState.DISPATCHED.value,
    )


def finish_refused(jti: str, state: TokenState, to: TokenState) -> InvalidState:
    allowed = " or ".join(sorted(s.value for s in FINISH_FROM[to]))
    return InvalidState(
        f"token {jti!r} is {state.value}: it can become {to.value} only from {allowed}",
        jti=jti,
        state=state.value,
        to=to.value,
    )


_id_lock = threading.Lock()
_id_last = (0, 0)  # (unix ms, 12-bit counter) of the last id this process made


def new_outbox_id() -> str:
    """A UUIDv7 (RFC 9562) string, strictly increasing within the process (a 12-bit counter in
    ``rand_a`` orders ids of one millisecond) and time-ordered across processes, so sorting the
    ids sorts the events oldest first."""
    global _id_last
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, counter = _id_last
        if ms > last_ms:
            counter = int.from_bytes(os.urandom(2), "big") & 0x3FF  # leave room to count up
        else:
            ms, counter = last_ms, counter + 1
            if counter > 0xFFF:  # 4096 ids in one millisecond: borrow the next one
                ms, counter = ms + 1, 0
        _id_last = (ms, counter)
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
    return str(uuid.UUID(int=value))
