"""Every state transition of workflows and tasks, as synchronous transaction functions.

Each function here is the body of one transaction (run by ``Database.run_write``): it reads what
it needs, decides, and writes the whole consequence at once, so a crash at any moment leaves the
store either before or after a transition, never half-way. Statements are batched
(``executemany``) so a scheduler turn costs a constant number of statements however many tasks
it starts or finishes.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Integer,
    Text,
    bindparam,
    case,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection

from provisioning.core.clock import as_utc
from provisioning.core.errors import InvalidState, NotFound
from provisioning.orchestrator.api import (
    DependencyKind,
    OnFailure,
    RetryPolicy,
    TaskStatus,
    WorkflowStatus,
)
from provisioning.orchestrator.tables import attempts, task_deps, tasks, workflows

__all__ = [
    "Claim",
    "Limits",
    "Result",
    "backoff_delay",
]

TS = TaskStatus
WS = WorkflowStatus
ACTIVE = (TS.RUNNING.value, TS.ROLLING_BACK.value)
WAITING = (TS.PENDING.value, TS.READY.value)
TERMINAL_WF = (WS.COMPLETED.value, WS.FAILED.value, WS.CANCELLED.value, WS.ROLLED_BACK.value)
_CLAIM_LOCK_KEY = 0x70726E67  # serialises counting claims across PostgreSQL workers (_Counts)
_CHUNK = 500
_LOOK_AGAIN_S = 0.02  # after other workers took this claim's picks (see claim)

# Which end states of a dependency let a dependant run, per dependency kind.
ALLOWED = {
    DependencyKind.HARD.value: {TS.COMPLETED.value},
    DependencyKind.SOFT.value: {TS.COMPLETED.value, TS.FAILED.value},
    DependencyKind.OPTIONAL.value: {
        TS.COMPLETED.value,
        TS.FAILED.value,
        TS.SKIPPED.value,
        TS.CANCELLED.value,
    },
}


def backoff_delay(policy: RetryPolicy, failed_attempts: int, rng: random.Random) -> float:
    """Seconds to wait before the next attempt after ``failed_attempts`` failures (>= 1).

    Exponential: ``initial * 2^(n-1)``; fixed: ``initial``; both capped at ``max_delay_s`` and
    scaled by a random factor in ``[1 - jitter, 1]`` so retries of many tasks spread out.
    """
    n = max(1, failed_attempts)
    if policy.backoff == "fixed":
        base = policy.initial_delay_s
    else:
        base = policy.initial_delay_s * 2 ** min(n - 1, 60)
    base = min(base, policy.max_delay_s)
    return base * (1 - policy.jitter * rng.random())


@dataclass(frozen=True)
class Limits:
    """Concurrency limits applied when claiming."""

    free_slots: int
    key_limits: Mapping[str, int]
    default_key_limit: int


@dataclass
class Claim:
    """A task attempt this worker now owns and must run."""

    task_id: str
    workflow_id: str
    name: str
    phase: str  # run | rollback
    attempt: int
    attempt_id: str
    spec: dict[str, Any]
    log_path: Path
    inputs: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str = ""


@dataclass(frozen=True)
class Result:
    """How one attempt ended."""

    task_id: str
    attempt: int
    phase: str
    ok: bool
    exit_code: int | None = None
    error: str | None = None
    outputs: Mapping[str, Any] | None = None
    cancelled: bool = False


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---------------------------------------------------------------------- claiming
#
# The hot path's statements are built once, here: building a SQLAlchemy statement costs more
# Python than running it, and the writer thread's Python competes with the event loop's.

_CLAIM_COLS = (
    tasks.c.id,
    tasks.c.workflow_id,
    tasks.c.name,
    tasks.c.spec,
    tasks.c.depends_on,
    tasks.c.concurrency_key,
    tasks.c.attempts,
    tasks.c.attempt_seq,
    tasks.c.started_at,
    workflows.c.parallel_limit,
    workflows.c.status.label("wf_status"),
    workflows.c.idempotency_key.label("wf_key"),
)

_ACTIVE_COUNTS = (
    select(tasks.c.workflow_id, tasks.c.concurrency_key, func.count())
    .where(tasks.c.status.in_(ACTIVE))
    .group_by(tasks.c.workflow_id, tasks.c.concurrency_key)
)

_later = tasks.alias("t_later")
_rolling = workflows.alias("w_rolling")
# When to look again (the earliest future ready_at), and whether a rollback may be due.
_NEXT_AT = (
    select(func.min(_later.c.ready_at))
    .where(_later.c.status == TS.READY.value, _later.c.ready_at > bindparam("b_now"))
    .scalar_subquery()
)
_ROLLING = exists().where(_rolling.c.status == WS.ROLLING_BACK.value, _rolling.c.draining.is_(None))
_META = select(_NEXT_AT.label("next_at"), _ROLLING.label("rolling"))
# Tells the other workers on PostgreSQL that work is ready (store.WORK_CHANNEL); sent in a
# transaction, it is delivered when that commits, and not at all when it rolls back.
NOTIFY_WORK = text("SELECT pg_notify(:channel, :sender)")

# A task due to start now (its workflow running and not draining), and the claim order:
# priority, then FIFO by when it became ready, then submission order.
_DUE = (
    tasks.c.status == TS.READY.value,
    tasks.c.ready_at <= bindparam("b_now"),
    or_(workflows.c.status == WS.PENDING.value, workflows.c.status == WS.RUNNING.value),
    workflows.c.draining.is_(None),
)
_CLAIM_ORDER = (tasks.c.priority.desc(), tasks.c.ready_at, tasks.c.ord)

# Candidates: only what picking within the limits needs, unlocked. Reading (and, on
# PostgreSQL, locking) the 64+ candidate rows whole, with their JSON, cost more than the rest
# of a claim; now only the chosen few are read whole and locked, by _CHOSEN.
_READY = (
    select(
        tasks.c.id,
        tasks.c.workflow_id,
        tasks.c.concurrency_key,
        workflows.c.parallel_limit,
        _NEXT_AT.label("next_at"),
        _ROLLING.label("rolling"),
    )
    .join(workflows, workflows.c.id == tasks.c.workflow_id)
    .where(*_DUE)
    .order_by(*_CLAIM_ORDER)
    .limit(bindparam("b_limit", type_=Integer))
)
# Of the picked candidates, the first ``b_limit`` still ready, whole. The conditions are
# checked again on the current rows; on PostgreSQL the rows are locked, and one another
# transaction is changing (another worker claiming the same candidates, a finish cancelling
# them) is skipped rather than waited for: no deadlock with a finish that cancels ready tasks
# and then waits for the claim lock, and two workers reading the same candidates at once
# each start different ones.
_CHOSEN = (
    select(*_CLAIM_COLS)
    .join(workflows, workflows.c.id == tasks.c.workflow_id)
    # Due again, checked on the current row: a pick that failed meanwhile and waits out its
    # retry delay, or whose workflow was paused or cancelled, is not.
    .where(tasks.c.id.in_(bindparam("b_ids", expanding=True)), *_DUE)
    .order_by(*_CLAIM_ORDER)
    .limit(bindparam("b_limit", type_=Integer))
)
_CHOSEN_PG = _CHOSEN.with_for_update(of=tasks, skip_locked=True)

_START_TASKS = (
    update(tasks)
    .where(tasks.c.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"),
        attempts=bindparam("b_attempts"),
        attempt_seq=bindparam("b_seq"),
        lease_owner=bindparam("b_owner"),
        lease_expires_at=bindparam("b_lease"),
        started_at=bindparam("b_started"),
    )
)
_INSERT_ATTEMPTS = insert(attempts)

_OUTPUTS_OF = select(tasks.c.name, tasks.c.outputs).where(
    tasks.c.workflow_id == bindparam("b_wf"),
    tasks.c.name.in_(bindparam("b_names", expanding=True)),
)


class _Counts:
    """Tasks running now per workflow and per concurrency key, read from the store only when
    a limit needs them (most claims are of tasks with neither a workflow limit nor a key).

    On PostgreSQL, loading first takes the claim lock (transaction-scoped, so held until
    commit): every claim that counts is serialised with every other one that counts, and each
    reads the counts after the previous one committed its claims, so limits hold across
    workers. A claim of tasks no limit applies to never counts, so it takes no lock and runs
    beside the others; the rows it starts are locked one by one (``_CHOSEN_PG``).
    """

    def __init__(self, conn: Connection, dialect: str) -> None:
        self._conn = conn
        self._dialect = dialect
        self.loaded = False
        self.per_wf: dict[str, int] = {}
        self.per_key: dict[str, int] = {}

    def load(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        if self._dialect == "postgresql":
            self._conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CLAIM_LOCK_KEY})
        added_wf, added_key = self.per_wf, self.per_key  # claimed earlier in this transaction
        self.per_wf, self.per_key = {}, {}
        for wf_id, key, n in self._conn.execute(_ACTIVE_COUNTS):
            self.per_wf[wf_id] = self.per_wf.get(wf_id, 0) + n
            if key:
                self.per_key[key] = self.per_key.get(key, 0) + n
        for wf_id, n in added_wf.items():
            self.per_wf[wf_id] = self.per_wf.get(wf_id, 0) + n
        for key, n in added_key.items():
            self.per_key[key] = self.per_key.get(key, 0) + n


def claim(
    conn: Connection,
    dialect: str,
    worker: str,
    limits: Limits,
    lease_s: float,
    log_dir: Path,
    now: datetime,
) -> tuple[list[Claim], datetime | None, bool]:
    """Claim ready tasks (and due rollbacks) within the limits; return them, when slots
    remain free the earliest future ``ready_at`` (when to look again), and whether ready
    tasks were left over for want of free slots."""
    free = limits.free_slots
    if free <= 0:
        return [], None, False
    counts = _Counts(conn, dialect)
    chosen, meta, taken, picked = _pick_ready(conn, dialect, now, free, counts, limits)
    if meta is None:  # nothing ready: the same facts from a query of their own
        meta = conn.execute(_META, {"b_now": now}).one()
    claims = _start(conn, chosen, "run", worker, now, lease_s, log_dir)
    chosen_run = chosen
    free -= len(chosen)
    if free > 0 and meta.rolling:
        chosen = _pick_rollbacks(conn, counts, free)
        claims += _start(conn, chosen, "rollback", worker, now, lease_s, log_dir)
        free -= len(chosen)
    if free <= 0:
        # Full, and tasks the limits allow left over: worth telling other workers (store.turn).
        return claims, None, picked > len(chosen_run)
    next_at = as_utc(meta.next_at)
    if taken:  # other workers took picks of this turn: more may be ready, look again soon
        soon = now + timedelta(seconds=_LOOK_AGAIN_S)
        next_at = soon if next_at is None else min(next_at, soon)
    return claims, next_at, False


def _pick_ready(
    conn: Connection,
    dialect: str,
    now: datetime,
    free: int,
    counts: _Counts,
    limits: Limits,
) -> tuple[list[Any], Any, bool, int]:
    """The ready tasks to start now, in priority order, whole and (PostgreSQL) locked; the
    first candidate row, which carries ``next_at`` and ``rolling`` (None: no candidate);
    whether picks were missed because another transaction holds or took them; and how many
    candidates were picked (those the limits allow: another worker could start them too).

    Up to twice ``free`` candidates the limits allow are offered to ``_CHOSEN``, which starts
    the first ``free`` of them nobody else holds: another worker reading the same candidates
    at the same moment takes the next ones instead of finding its picks all taken.
    """
    picked: list[str] = []
    meta = None
    for row in conn.execute(_READY, {"b_now": now, "b_limit": max(64, free * 8)}):
        if meta is None:
            meta = row
            if row.rolling:
                # A rollback may be picked after these rows are locked, and picking one takes
                # the claim lock: take it first, as every other claim that takes it does, or a
                # counting claim holding it and waiting for one of our rows deadlocks with us.
                counts.load()
        if len(picked) >= 2 * free:
            break
        wf_limit = row.parallel_limit
        key = row.concurrency_key
        if (wf_limit is not None or key) and not counts.loaded:
            counts.load()
        per_wf, per_key = counts.per_wf, counts.per_key
        if wf_limit is not None and per_wf.get(row.workflow_id, 0) >= wf_limit:
            continue
        if key:
            if per_key.get(key, 0) >= limits.key_limits.get(key, limits.default_key_limit):
                continue
            per_key[key] = per_key.get(key, 0) + 1
        per_wf[row.workflow_id] = per_wf.get(row.workflow_id, 0) + 1
        picked.append(row.id)
    if not picked:
        return [], meta, False, 0
    q = _CHOSEN_PG if dialect == "postgresql" else _CHOSEN
    rows = list(conn.execute(q, {"b_ids": picked, "b_limit": free, "b_now": now}))
    return rows, meta, len(rows) < min(free, len(picked)), len(picked)


def _pick_rollbacks(conn: Connection, counts: _Counts, free: int) -> list[Any]:
    # Rollback is sequential per workflow, in reverse topological order, once nothing of the
    # workflow runs any more.
    counts.load()
    per_wf = counts.per_wf
    chosen: list[Any] = []
    for (wf_id,) in conn.execute(
        select(workflows.c.id).where(
            workflows.c.status == WS.ROLLING_BACK.value, workflows.c.draining.is_(None)
        )
    ).all():
        if len(chosen) >= free or per_wf.get(wf_id, 0) > 0:
            continue
        for row in conn.execute(
            select(*_CLAIM_COLS)
            .join(workflows, workflows.c.id == tasks.c.workflow_id)
            .where(tasks.c.workflow_id == wf_id, tasks.c.status == TS.COMPLETED.value)
            .order_by(tasks.c.topo.desc())
        ):
            if row.spec.get("rollback"):
                chosen.append(row)
                break
    return chosen


def _start(
    conn: Connection,
    rows: Sequence[Any],
    phase: str,
    worker: str,
    now: datetime,
    lease_s: float,
    log_dir: Path,
) -> list[Claim]:
    if not rows:
        return []
    lease_until = now + timedelta(seconds=lease_s)
    status = TS.RUNNING.value if phase == "run" else TS.ROLLING_BACK.value
    claims: list[Claim] = []
    task_updates: list[dict[str, Any]] = []
    attempt_rows: list[dict[str, Any]] = []
    pending_wfs: set[str] = set()
    for r in rows:
        number = int(r.attempt_seq) + 1
        attempt_id = str(uuid.uuid4())
        # One folder per workflow: a folder per task costs a mkdir per task on the hot path.
        log_path = log_dir / r.workflow_id / f"{r.id}.{number}.log"
        task_updates.append(
            {
                "b_id": r.id,
                "b_status": status,
                "b_attempts": int(r.attempts) + (1 if phase == "run" else 0),
                "b_seq": number,
                "b_owner": worker,
                "b_lease": lease_until,
                "b_started": as_utc(r.started_at) or now,
            }
        )
        attempt_rows.append(
            {
                "id": attempt_id,
                "task_id": r.id,
                "number": number,
                "phase": phase,
                "worker": worker,
                "pid": None,
                "started_at": now,
                "ended_at": None,
                "exit_code": None,
                "error": None,
                "log_path": str(log_path),
            }
        )
        if r.wf_status == WS.PENDING.value:
            pending_wfs.add(r.workflow_id)
        claims.append(
            Claim(
                task_id=r.id,
                workflow_id=r.workflow_id,
                name=r.name,
                phase=phase,
                attempt=number,
                attempt_id=attempt_id,
                spec=dict(r.spec),
                log_path=log_path,
                idempotency_key=f"{r.wf_key or r.workflow_id}:{r.name}",
            )
        )
    conn.execute(_START_TASKS, task_updates)
    conn.execute(_INSERT_ATTEMPTS, attempt_rows)
    if pending_wfs:
        conn.execute(
            update(workflows)
            .where(workflows.c.id.in_(sorted(pending_wfs)), workflows.c.status == WS.PENDING.value)
            .values(status=WS.RUNNING.value, started_at=now, updated_at=now)
        )
    if phase == "run":
        _load_inputs(conn, claims, {r.id: r.depends_on for r in rows})
    return claims


def _load_inputs(
    conn: Connection, claims: list[Claim], depends: Mapping[str, list[dict[str, str]]]
) -> None:
    wanted: dict[str, set[str]] = {}
    for c in claims:
        for dep in depends[c.task_id]:
            wanted.setdefault(c.workflow_id, set()).add(dep["task"])
    outputs: dict[tuple[str, str], Any] = {}
    for wf_id, names in wanted.items():
        for chunk in _chunks(sorted(names)):
            for r in conn.execute(_OUTPUTS_OF, {"b_wf": wf_id, "b_names": list(chunk)}):
                outputs[(wf_id, r.name)] = r.outputs
    for c in claims:
        for dep in depends[c.task_id]:
            c.inputs[dep["task"]] = outputs.get((c.workflow_id, dep["task"]), {})


# ---------------------------------------------------------------------- results

# What finishing needs of each task (no JSON columns: the spec is read only on failure).
_FINISH_ROWS = (
    select(
        tasks.c.id,
        tasks.c.workflow_id,
        tasks.c.name,
        tasks.c.status,
        tasks.c.attempts,
        tasks.c.attempt_seq,
        tasks.c.lease_owner,
        tasks.c.on_failure,
        tasks.c.error,
        tasks.c.finished_at,
        tasks.c.ready_at,
        workflows.c.status.label("wf_status"),
        workflows.c.draining.label("wf_draining"),
        attempts.c.id.label("attempt_id"),
        task_deps.c.task_id.label("dependant"),
        task_deps.c.kind.label("dep_kind"),
    )
    .join(workflows, workflows.c.id == tasks.c.workflow_id)
    .outerjoin(
        attempts,
        (attempts.c.task_id == tasks.c.id) & (attempts.c.number == tasks.c.attempt_seq),
    )
    .outerjoin(task_deps, task_deps.c.dep_id == tasks.c.id)  # a row per dependant
    .where(tasks.c.id.in_(bindparam("b_ids", expanding=True)))
)
_SPECS = select(tasks.c.id, tasks.c.spec).where(tasks.c.id.in_(bindparam("b_ids", expanding=True)))
_ATTEMPT_PID = (
    update(attempts).where(attempts.c.id == bindparam("b_id")).values(pid=bindparam("b_pid"))
)
# An attempt that started and ended since the last turn gets its pid and its end at once.
_ATTEMPT_END = (
    update(attempts)
    .where(attempts.c.task_id == bindparam("b_task"), attempts.c.number == bindparam("b_num"))
    .values(
        ended_at=bindparam("b_now"),
        exit_code=bindparam("b_code", type_=Integer),
        error=bindparam("b_err", type_=Text),
        pid=func.coalesce(bindparam("b_pid", type_=Integer), attempts.c.pid),
    )
)
_TASK_COMPLETED = (
    update(tasks)
    .where(tasks.c.id == bindparam("b_id"))
    .values(
        status=TS.COMPLETED.value,
        outputs=bindparam("b_outputs"),
        error=None,
        finished_at=bindparam("b_now"),
        lease_owner=None,
        lease_expires_at=None,
    )
)
_TASK_ENDED = (
    update(tasks)
    .where(tasks.c.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"),
        error=bindparam("b_error"),
        finished_at=bindparam("b_finished"),
        ready_at=bindparam("b_ready"),
        lease_owner=None,
        lease_expires_at=None,
    )
)


def finish(
    conn: Connection,
    results: Sequence[Result],
    owner: str | None,
    pids: Sequence[tuple[str, int]],
    now: datetime,
    rng: random.Random,
) -> set[str]:
    """Record how attempts ended and everything that follows, in this one transaction.

    Results of attempts ``owner`` no longer holds (its lease expired and another worker took
    the task) are ignored; ``owner=None`` (recovery) skips that check. Returns the touched
    workflow ids.
    """
    pid_of = dict(pids)
    if not results:
        _record_pids(conn, pid_of)
        return set()
    rows: dict[str, Any] = {}
    edges: dict[str, list[tuple[str, str]]] = {}
    for chunk in _chunks([r.task_id for r in results]):
        for found in conn.execute(_FINISH_ROWS, {"b_ids": list(chunk)}):
            rows.setdefault(found.id, found)
            mine = edges.setdefault(found.id, [])
            if found.dependant is not None:
                mine.append((found.dependant, found.dep_kind))
    accepted: list[tuple[Result, Any]] = []
    for res in results:
        row = rows.get(res.task_id)
        if row is None or int(row.attempt_seq) != res.attempt or row.status not in ACTIVE:
            continue
        if owner is not None and row.lease_owner != owner:
            continue
        accepted.append((res, row))
    specs: dict[str, Any] = {}
    failed_runs = [r.id for res, r in accepted if res.phase == "run" and not res.ok]
    for chunk in _chunks(failed_runs):
        for spec_row in conn.execute(_SPECS, {"b_ids": list(chunk)}):
            specs[spec_row.id] = spec_row.spec
    draining: dict[str, str | None] = {}
    wf_values: dict[str, dict[str, Any]] = {}
    wf_errors: dict[str, list[str]] = {}
    attempt_updates: list[dict[str, Any]] = []
    completed: list[dict[str, Any]] = []
    task_updates: list[dict[str, Any]] = []
    ended: list[tuple[str, str]] = []
    touched: set[str] = set()
    for res, row in accepted:
        wf_id = row.workflow_id
        touched.add(wf_id)
        drain = draining.setdefault(wf_id, row.wf_draining)
        attempt_updates.append(
            {
                "b_task": res.task_id,
                "b_num": res.attempt,
                "b_now": now,
                "b_code": res.exit_code,
                "b_err": res.error,
                "b_pid": pid_of.pop(row.attempt_id, None) if row.attempt_id else None,
            }
        )
        if res.phase == "run" and res.ok:
            completed.append({"b_id": row.id, "b_outputs": dict(res.outputs or {}), "b_now": now})
            ended.append((row.id, TS.COMPLETED.value))
            continue
        upd = {
            "b_id": row.id,
            "b_status": row.status,
            "b_error": row.error,
            "b_finished": row.finished_at,
            "b_ready": row.ready_at,
        }
        task_updates.append(upd)
        if res.phase == "rollback":
            if res.ok:
                upd.update(b_status=TS.ROLLED_BACK.value, b_finished=now)
            else:
                err = f"rollback failed: {res.error or f'exit code {res.exit_code}'}"
                upd.update(b_status=TS.FAILED.value, b_error=err)
                wf_errors.setdefault(wf_id, []).append(f"{row.name}: {err}")
            continue
        error = res.error or f"exit code {res.exit_code}"
        if drain == "cancel" or res.cancelled:
            upd.update(b_status=TS.CANCELLED.value, b_error=error, b_finished=now)
            ended.append((row.id, TS.CANCELLED.value))
            continue
        policy = RetryPolicy.model_validate((specs.get(row.id) or {}).get("retry") or {})
        if int(row.attempts) < policy.max_attempts and drain is None:
            delay = backoff_delay(policy, int(row.attempts), rng)
            upd.update(
                b_status=TS.READY.value, b_ready=now + timedelta(seconds=delay), b_error=error
            )
            continue
        upd.update(b_status=TS.FAILED.value, b_error=error, b_finished=now)
        ended.append((row.id, TS.FAILED.value))
        if row.on_failure != OnFailure.CONTINUE.value and drain is None:
            draining[wf_id] = row.on_failure
            values: dict[str, Any] = {
                "draining": row.on_failure,
                "error": f"task {row.name!r} failed: {error}",
                "updated_at": now,
            }
            if row.on_failure == OnFailure.ROLLBACK.value:
                values["status"] = WS.ROLLING_BACK.value
            wf_values[wf_id] = values
    _record_pids(conn, pid_of)
    if attempt_updates:
        conn.execute(_ATTEMPT_END, attempt_updates)
    if completed:
        conn.execute(_TASK_COMPLETED, completed)
    if task_updates:
        conn.execute(_TASK_ENDED, task_updates)
    for wf_id, values in wf_values.items():
        conn.execute(update(workflows).where(workflows.c.id == wf_id).values(**values))
    for wf_id, errors in wf_errors.items():
        _append_wf_error(conn, wf_id, "; ".join(errors), now)
    released = propagate(conn, ended, now, edges)
    wf_status = {row.workflow_id: row.wf_status for _res, row in accepted}
    for wf_id in sorted(touched):
        # A running workflow that is not draining and has a task just made Ready cannot
        # end or change phase now: settle would find exactly that, one query later.
        if (
            wf_id in released
            and draining.get(wf_id) is None
            and wf_status[wf_id] in (WS.RUNNING.value, WS.PENDING.value)
        ):
            continue
        settle(conn, wf_id, now)
    return touched


def _record_pids(conn: Connection, pid_of: Mapping[str, int]) -> None:
    if pid_of:
        conn.execute(_ATTEMPT_PID, [{"b_id": a, "b_pid": p} for a, p in pid_of.items()])


def _append_wf_error(conn: Connection, wf_id: str, message: str, now: datetime) -> None:
    cur = conn.execute(select(workflows.c.error).where(workflows.c.id == wf_id)).scalar()
    conn.execute(
        update(workflows)
        .where(workflows.c.id == wf_id)
        .values(error=f"{cur}; {message}" if cur else message, updated_at=now)
    )


_EDGES = select(task_deps.c.task_id, task_deps.c.dep_id, task_deps.c.kind).where(
    task_deps.c.dep_id.in_(bindparam("b_ids", expanding=True))
)
_COUNT_DOWN = (
    update(tasks)
    .where(tasks.c.id == bindparam("b_id"))
    .values(
        deps_remaining=tasks.c.deps_remaining - bindparam("b_n", type_=Integer),
        blocked=case((bindparam("b_block", type_=Integer) == 1, 1), else_=tasks.c.blocked),
    )
)
# A waiting task whose last dependency ended: Ready, or Skipped when one of them blocks it.
_UNBLOCKED = case((tasks.c.blocked == 1, TS.SKIPPED.value), else_=TS.READY.value)
_now_param = bindparam("b_now", type_=tasks.c.ready_at.type)
_RELEASE = (
    update(tasks)
    .where(
        tasks.c.id.in_(bindparam("b_ids", expanding=True)),
        tasks.c.deps_remaining <= 0,
        # Not an index term: SQLite would otherwise walk every Pending task of the store by
        # the status index instead of looking the few ids up by key.
        tasks.c.status.concat("") == TS.PENDING.value,
    )
    .values(
        status=_UNBLOCKED,
        ready_at=case((tasks.c.blocked == 1, tasks.c.ready_at), else_=_now_param),
        error=case((tasks.c.blocked == 1, "a dependency did not complete"), else_=tasks.c.error),
        finished_at=case((tasks.c.blocked == 1, _now_param), else_=tasks.c.finished_at),
    )
    .returning(tasks.c.id, tasks.c.status, tasks.c.workflow_id)
)


def propagate(
    conn: Connection,
    ended: Sequence[tuple[str, str]],
    now: datetime,
    known_edges: Mapping[str, list[tuple[str, str]]] | None = None,
) -> set[str]:
    """Tell the dependants of tasks that ended; start or skip those now unblocked. Returns
    the workflows in which a task became Ready.

    ``known_edges``: ``(dependant, kind)`` of each ended task, when the caller read them
    already.
    """
    released: set[str] = set()
    frontier = list(ended)
    while frontier:
        outcome = dict(frontier)
        edges: list[tuple[str, str, str]] = []  # (dependant, dependency, kind)
        unknown = [tid for tid in outcome if known_edges is None or tid not in known_edges]
        for chunk in _chunks(unknown):
            edges += ((e.task_id, e.dep_id, e.kind) for e in conn.execute(_EDGES, {"b_ids": chunk}))
        if known_edges is not None:
            for tid in outcome:
                edges += ((dependant, tid, kind) for dependant, kind in known_edges.get(tid, ()))
        known_edges = None  # the cascade's skipped tasks: read their edges
        # Per dependant: how many of its dependencies ended, and whether one of them blocks it.
        down: dict[str, list[int]] = {}
        for dependant, dep, kind in edges:
            entry = down.setdefault(dependant, [0, 0])
            entry[0] += 1
            if outcome[dep] not in ALLOWED[kind]:
                entry[1] = 1
        if not down:
            return released
        # In id order: two workers finishing neighbours update the same dependants, and rows
        # locked in one order by both cannot deadlock (a deadlock costs PostgreSQL's
        # deadlock_timeout, 1 s by default, and one of the two turns).
        conn.execute(
            _COUNT_DOWN,
            [{"b_id": tid, "b_n": down[tid][0], "b_block": down[tid][1]} for tid in sorted(down)],
        )
        skipped: list[str] = []
        for chunk in _chunks(sorted(down)):
            for r in conn.execute(_RELEASE, {"b_ids": list(chunk), "b_now": now}):
                if r.status == TS.SKIPPED.value:
                    skipped.append(r.id)
                else:
                    released.add(r.workflow_id)
        frontier = [(tid, TS.SKIPPED.value) for tid in sorted(skipped)]
    return released


_SETTLE = select(
    workflows.c.status,
    workflows.c.draining,
    exists()
    .where(
        tasks.c.workflow_id == workflows.c.id,
        or_(*(tasks.c.status == s for s in ACTIVE)),
    )
    .label("active"),
).where(workflows.c.id == bindparam("b_wf"))


def _any(conn: Connection, wf_id: str, statuses: Sequence[str]) -> bool:
    return bool(
        conn.execute(
            select(exists().where(tasks.c.workflow_id == wf_id, tasks.c.status.in_(statuses)))
        ).scalar()
    )


def settle(conn: Connection, wf_id: str, now: datetime) -> None:
    """End a workflow whose work is done, or move it to its next phase."""
    if conn.dialect.name == "postgresql":
        # Two workers ending the last two tasks at once would each see the other's task still
        # running (READ COMMITTED) and neither would end the workflow. Locking the workflow row
        # serialises them: the second reads after the first committed (SQLite has one writer).
        conn.execute(select(workflows.c.id).where(workflows.c.id == wf_id).with_for_update())
    wf = conn.execute(_SETTLE, {"b_wf": wf_id}).first()
    if wf is None or wf.status in TERMINAL_WF or wf.active:
        return
    waiting = _any(conn, wf_id, WAITING)
    if wf.draining == "cancel":
        _end_waiting(conn, wf_id, TS.CANCELLED.value, "workflow cancelled", now)
        _end(conn, wf_id, WS.CANCELLED.value, now)
    elif wf.draining == "fail":
        _end_waiting(conn, wf_id, TS.SKIPPED.value, "workflow failed", now)
        _end(conn, wf_id, WS.FAILED.value, now)
    elif wf.draining == "rollback" or wf.status == WS.ROLLING_BACK.value:
        if waiting:
            _end_waiting(conn, wf_id, TS.SKIPPED.value, "workflow rolled back", now)
        if wf.draining is not None:
            conn.execute(
                update(workflows)
                .where(workflows.c.id == wf_id)
                .values(draining=None, updated_at=now)
            )
        specs = conn.execute(
            select(tasks.c.spec).where(
                tasks.c.workflow_id == wf_id, tasks.c.status == TS.COMPLETED.value
            )
        ).all()
        if not any(r.spec.get("rollback") for r in specs):
            failed = conn.execute(
                select(func.count()).where(
                    tasks.c.workflow_id == wf_id,
                    tasks.c.status == TS.FAILED.value,
                    tasks.c.error.like("rollback failed:%"),
                )
            ).scalar()
            _end(conn, wf_id, WS.FAILED.value if failed else WS.ROLLED_BACK.value, now)
    elif not waiting and wf.status in (WS.RUNNING.value, WS.PENDING.value):
        failed = conn.execute(
            select(func.count()).where(
                tasks.c.workflow_id == wf_id, tasks.c.status == TS.FAILED.value
            )
        ).scalar()
        if failed:
            _append_wf_error(conn, wf_id, f"{failed} task(s) failed (on_failure=continue)", now)
        _end(conn, wf_id, WS.FAILED.value if failed else WS.COMPLETED.value, now)


def _end_waiting(conn: Connection, wf_id: str, status: str, reason: str, now: datetime) -> None:
    conn.execute(
        update(tasks)
        .where(tasks.c.workflow_id == wf_id, tasks.c.status.in_(WAITING))
        .values(status=status, error=reason, finished_at=now)
    )


def _end(conn: Connection, wf_id: str, status: str, now: datetime) -> None:
    conn.execute(
        update(workflows)
        .where(workflows.c.id == wf_id)
        .values(status=status, draining=None, finished_at=now, updated_at=now)
    )


# ---------------------------------------------------------------------- recovery


def orphaned(
    conn: Connection, worker: str, own: bool, exclude: Iterable[str], now: datetime
) -> list[Any]:
    """Tasks left Running/RollingBack by a dead worker: lease expired, or — when ``own`` — ours
    from a previous life (a restarted worker with the same id knows its old self is dead)."""
    cond = tasks.c.lease_expires_at < now
    if own:
        cond = or_(cond, tasks.c.lease_owner == worker)
    q = (
        select(
            tasks.c.id,
            tasks.c.status,
            tasks.c.attempt_seq,
            tasks.c.lease_owner,
            attempts.c.id.label("attempt_id"),
            attempts.c.pid,
        )
        .outerjoin(
            attempts,
            (attempts.c.task_id == tasks.c.id) & (attempts.c.number == tasks.c.attempt_seq),
        )
        .where(tasks.c.status.in_(ACTIVE), cond)
    )
    excluded = set(exclude)
    return [r for r in conn.execute(q).all() if r.id not in excluded]


def recover(conn: Connection, rows: Sequence[Any], now: datetime, rng: random.Random) -> set[str]:
    """Fail the lost attempts of orphaned tasks; their retry policy decides what follows.

    A lost compensation (RollingBack) goes back to Completed and runs again: rollback commands
    must be idempotent.
    """
    touched: set[str] = set()
    lost_runs: list[Result] = []
    for r in rows:
        msg = f"worker {r.lease_owner} lost the attempt (crash or lease expiry)"
        if r.status == TS.RUNNING.value:
            lost_runs.append(Result(r.id, int(r.attempt_seq), "run", ok=False, error=msg))
            continue
        n = conn.execute(
            update(tasks)
            .where(tasks.c.id == r.id, tasks.c.status == TS.ROLLING_BACK.value)
            .values(status=TS.COMPLETED.value, lease_owner=None, lease_expires_at=None)
            .returning(tasks.c.workflow_id)
        ).first()
        if n is not None:
            conn.execute(
                update(attempts)
                .where(attempts.c.task_id == r.id, attempts.c.number == r.attempt_seq)
                .values(ended_at=now, error=msg)
            )
            touched.add(n.workflow_id)
    touched |= finish(conn, lost_runs, None, (), now, rng)
    for wf_id in touched:
        settle(conn, wf_id, now)
    return touched


def unsettled(conn: Connection) -> list[str]:
    return [
        r.id
        for r in conn.execute(select(workflows.c.id).where(workflows.c.status.not_in(TERMINAL_WF)))
    ]


def settle_all(conn: Connection, wf_ids: Iterable[str], now: datetime) -> None:
    for wf_id in wf_ids:
        settle(conn, wf_id, now)


# ---------------------------------------------------------------------- control


def _locked_workflow(conn: Connection, dialect: str, wf_id: str) -> Any:
    q = select(workflows).where(workflows.c.id == wf_id)
    if dialect == "postgresql":
        q = q.with_for_update()
    row = conn.execute(q).first()
    if row is None:
        raise NotFound(f"workflow {wf_id} not found", workflow_id=wf_id)
    return row


def cancel(conn: Connection, dialect: str, wf_id: str, now: datetime) -> None:
    """Waiting tasks are cancelled now; running ones are signalled by their workers."""
    wf = _locked_workflow(conn, dialect, wf_id)
    if wf.status in TERMINAL_WF:
        raise InvalidState(
            f"workflow {wf_id} is {wf.status}; only a workflow that has not ended can be cancelled"
        )
    conn.execute(
        update(workflows)
        .where(workflows.c.id == wf_id)
        .values(draining="cancel", updated_at=now, error=wf.error or "cancelled by request")
    )
    _end_waiting(conn, wf_id, TS.CANCELLED.value, "workflow cancelled", now)
    settle(conn, wf_id, now)


def flip(
    conn: Connection,
    dialect: str,
    wf_id: str,
    allowed: tuple[str, ...],
    to: str,
    verb: str,
    now: datetime,
) -> None:
    """Pause or resume."""
    wf = _locked_workflow(conn, dialect, wf_id)
    if wf.status not in allowed or wf.draining is not None:
        ending = " and ending" if wf.draining else ""
        raise InvalidState(f"workflow {wf_id} is {wf.status}{ending}; it cannot be {verb}")
    conn.execute(update(workflows).where(workflows.c.id == wf_id).values(status=to, updated_at=now))
    # Every task may have ended while the workflow was paused: resuming must end it then.
    settle(conn, wf_id, now)


def retry(conn: Connection, dialect: str, wf_id: str, now: datetime) -> int:
    """Completed tasks keep their results; every other task waits again with a fresh budget."""
    wf = _locked_workflow(conn, dialect, wf_id)
    if wf.status not in (WS.FAILED.value, WS.CANCELLED.value):
        raise InvalidState(
            f"workflow {wf_id} is {wf.status}; only a Failed or Cancelled one can be retried"
        )
    rows = conn.execute(
        select(tasks.c.id, tasks.c.name, tasks.c.status, tasks.c.depends_on).where(
            tasks.c.workflow_id == wf_id
        )
    ).all()
    status = {r.name: r.status for r in rows}
    if TS.ROLLED_BACK.value in status.values():
        raise InvalidState(f"workflow {wf_id} was rolled back; submit it again instead")
    updates = []
    for r in rows:
        if r.status == TS.COMPLETED.value:
            continue
        remaining = sum(1 for d in r.depends_on if status[d["task"]] != TS.COMPLETED.value)
        updates.append(
            {
                "b_id": r.id,
                "b_status": TS.PENDING.value if remaining else TS.READY.value,
                "b_remaining": remaining,
                "b_ready": None if remaining else now,
            }
        )
    if updates:
        conn.execute(
            update(tasks)
            .where(tasks.c.id == bindparam("b_id"))
            .values(
                status=bindparam("b_status"),
                deps_remaining=bindparam("b_remaining"),
                ready_at=bindparam("b_ready"),
                blocked=0,
                attempts=0,
                error=None,
                finished_at=None,
            ),
            updates,
        )
    conn.execute(
        update(workflows)
        .where(workflows.c.id == wf_id)
        .values(
            status=WS.RUNNING.value, draining=None, error=None, finished_at=None, updated_at=now
        )
    )
    settle(conn, wf_id, now)
    return len(updates)


def rollback(conn: Connection, dialect: str, wf_id: str, now: datetime) -> None:
    """Stop scheduling, wait for running tasks, then compensate completed ones in reverse order."""
    wf = _locked_workflow(conn, dialect, wf_id)
    if wf.status in (WS.ROLLING_BACK.value, WS.ROLLED_BACK.value):
        raise InvalidState(f"workflow {wf_id} is already {wf.status}")
    conn.execute(
        update(workflows)
        .where(workflows.c.id == wf_id)
        .values(status=WS.ROLLING_BACK.value, draining="rollback", finished_at=None, updated_at=now)
    )
    settle(conn, wf_id, now)
