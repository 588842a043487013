"""Durable state of workflows and tasks: every state transition is one committed write.

The store is the source of truth; the engine's in-memory state is only what it is running now
and is rebuilt from here on start. Works on any :class:`~provisioning.core.store.Database`
(SQLite or PostgreSQL); on PostgreSQL, claims lock rows with ``FOR UPDATE SKIP LOCKED`` under
a transaction-scoped advisory lock so several workers share one workflow without breaking
limits.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from provisioning.core.errors import InvalidState, NotFound
from provisioning.core.store import Database, upgrade
from provisioning.orchestrator.api import (
    DependencyKind,
    OnFailure,
    RetryPolicy,
    TaskStatus,
    WorkflowSpec,
    WorkflowStatus,
)
from provisioning.orchestrator.clock import as_utc, utcnow
from provisioning.orchestrator.tables import attempts, task_deps, tasks, workflows

__all__ = ["Claim", "Limits", "Result", "WorkflowStore", "backoff_delay"]

TS = TaskStatus
WS = WorkflowStatus
ACTIVE = (TS.RUNNING.value, TS.ROLLING_BACK.value)
WAITING = (TS.PENDING.value, TS.READY.value)
TERMINAL_WF = (WS.COMPLETED.value, WS.FAILED.value, WS.CANCELLED.value, WS.ROLLED_BACK.value)
_CLAIM_LOCK_KEY = 0x70726E67  # "prng": serialises claims across PostgreSQL workers

# Which dependency outcomes let a dependant run, per dependency kind.
_ALLOWED = {
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
    base = (
        policy.initial_delay_s
        if policy.backoff == "fixed"
        else policy.initial_delay_s * 2 ** (n - 1)
    )
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


class WorkflowStore:
    """The orchestrator's tables on a :class:`Database`."""

    def __init__(self, db: Database, *, rng: random.Random | None = None) -> None:
        self.db = db
        self.rng = rng or random.Random()

    async def migrate(self) -> None:
        """Create or upgrade the orchestrator's tables."""
        await upgrade(self.db, Path(__file__).parent / "migrations", "alembic_version_orchestrator")

    # ------------------------------------------------------------------ submission

    async def submit(
        self, spec: WorkflowSpec, topo: Sequence[int], owner: str | None = None
    ) -> tuple[str, bool]:
        """Store a validated workflow; return ``(workflow_id, created)``.

        With an idempotency key already used, returns the existing workflow's id and False.
        """
        if spec.idempotency_key:
            existing = await self.find_by_idempotency_key(spec.idempotency_key)
            if existing:
                return existing, False
        now = utcnow()
        wf_id = str(uuid.uuid4())
        ids = [str(uuid.uuid4()) for _ in spec.tasks]
        by_name = {t.name: ids[i] for i, t in enumerate(spec.tasks)}
        topo_of = {idx: pos for pos, idx in enumerate(topo)}
        task_rows: list[dict[str, Any]] = []
        dep_rows: list[dict[str, Any]] = []
        for i, t in enumerate(spec.tasks):
            deps = t.dependencies()
            task_rows.append(
                {
                    "id": ids[i],
                    "workflow_id": wf_id,
                    "name": t.name,
                    "ord": i,
                    "topo": topo_of[i],
                    "status": TS.PENDING.value if deps else TS.READY.value,
                    "priority": spec.priority if t.priority is None else t.priority,
                    "ready_at": None if deps else now,
                    "spec": t.model_dump(
                        mode="json",
                        include={
                            "command",
                            "action",
                            "args",
                            "env",
                            "cwd",
                            "retry",
                            "timeout_s",
                            "rollback",
                        },
                    ),
                    "depends_on": [d.model_dump(mode="json") for d in deps],
                    "deps_remaining": len(deps),
                    "blocked": 0,
                    "concurrency_key": t.concurrency_key,
                    "on_failure": t.on_failure.value,
                    "attempts": 0,
                    "attempt_seq": 0,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "outputs": {},
                    "error": None,
                    "created_at": now,
                    "started_at": None,
                    "finished_at": None,
                }
            )
            dep_rows.extend(
                {"task_id": ids[i], "dep_id": by_name[d.task], "kind": d.kind.value} for d in deps
            )
        try:
            async with self.db.write() as conn:
                await conn.execute(
                    insert(workflows).values(
                        id=wf_id,
                        name=spec.name,
                        kind=spec.kind.value,
                        status=WS.PENDING.value,
                        draining=None,
                        priority=spec.priority,
                        parallel_limit=spec.parallel_limit,
                        idempotency_key=spec.idempotency_key,
                        owner=owner,
                        labels=spec.labels,
                        error=None,
                        created_at=now,
                        updated_at=now,
                    )
                )
                for chunk in _chunks(task_rows, 500):
                    await conn.execute(insert(tasks), chunk)
                for chunk in _chunks(dep_rows, 1000):
                    await conn.execute(insert(task_deps), chunk)
        except IntegrityError:
            # Another submission with the same idempotency key won the race.
            if spec.idempotency_key:
                existing = await self.find_by_idempotency_key(spec.idempotency_key)
                if existing:
                    return existing, False
            raise
        return wf_id, True

    async def find_by_idempotency_key(self, key: str) -> str | None:
        async with self.db.read() as conn:
            row = (
                await conn.execute(select(workflows.c.id).where(workflows.c.idempotency_key == key))
            ).first()
        return None if row is None else str(row.id)

    # ------------------------------------------------------------------ reads

    async def get_workflow(self, workflow_id: str, *, with_tasks: bool = True) -> dict[str, Any]:
        """The workflow as the API shows it.

        Raises:
            NotFound: no workflow has this id.
        """
        async with self.db.read() as conn:
            row = (
                await conn.execute(select(workflows).where(workflows.c.id == workflow_id))
            ).first()
            if row is None:
                raise NotFound(f"workflow {workflow_id} not found", workflow_id=workflow_id)
            counts = await _task_counts(conn, [workflow_id])
            doc = _workflow_doc(row, counts.get(workflow_id, {}))
            if with_tasks:
                task_rows = (
                    await conn.execute(
                        select(tasks)
                        .where(tasks.c.workflow_id == workflow_id)
                        .order_by(tasks.c.ord)
                    )
                ).all()
                att = await _attempts_of(conn, [r.id for r in task_rows])
                doc["tasks"] = [_task_doc(r, att.get(r.id, [])) for r in task_rows]
        return doc

    async def list_workflows(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        owner: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        q = select(workflows).order_by(workflows.c.created_at.desc(), workflows.c.id)
        if status:
            q = q.where(workflows.c.status == status)
        if kind:
            q = q.where(workflows.c.kind == kind)
        if owner:
            q = q.where(workflows.c.owner == owner)
        if since:
            q = q.where(workflows.c.created_at >= since)
        async with self.db.read() as conn:
            rows = (await conn.execute(q.limit(limit).offset(offset))).all()
            counts = await _task_counts(conn, [r.id for r in rows])
        return [_workflow_doc(r, counts.get(r.id, {})) for r in rows]

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """One task with its attempts.

        Raises:
            NotFound: no task has this id.
        """
        async with self.db.read() as conn:
            row = (await conn.execute(select(tasks).where(tasks.c.id == task_id))).first()
            if row is None:
                raise NotFound(f"task {task_id} not found", task_id=task_id)
            att = await _attempts_of(conn, [task_id])
        return _task_doc(row, att.get(task_id, []))

    async def list_tasks(
        self,
        *,
        status: str | None = None,
        workflow_id: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        q = select(tasks).order_by(tasks.c.created_at.desc(), tasks.c.workflow_id, tasks.c.ord)
        if status:
            q = q.where(tasks.c.status == status)
        if workflow_id:
            q = q.where(tasks.c.workflow_id == workflow_id)
        async with self.db.read() as conn:
            rows = (await conn.execute(q.limit(limit).offset(offset))).all()
            att = await _attempts_of(conn, [r.id for r in rows])
        return [_task_doc(r, att.get(r.id, [])) for r in rows]

    async def task_log_paths(self, task_id: str) -> list[tuple[int, str]]:
        """``(attempt number, log path)`` of every attempt of a task, oldest first.

        Raises:
            NotFound: no task has this id.
        """
        async with self.db.read() as conn:
            exists = (await conn.execute(select(tasks.c.id).where(tasks.c.id == task_id))).first()
            if exists is None:
                raise NotFound(f"task {task_id} not found", task_id=task_id)
            rows = (
                await conn.execute(
                    select(attempts.c.number, attempts.c.log_path)
                    .where(attempts.c.task_id == task_id)
                    .order_by(attempts.c.number)
                )
            ).all()
        return [(int(r.number), str(r.log_path)) for r in rows if r.log_path]

    async def task_status(self, task_id: str) -> str:
        async with self.db.read() as conn:
            row = (await conn.execute(select(tasks.c.status).where(tasks.c.id == task_id))).first()
        if row is None:
            raise NotFound(f"task {task_id} not found", task_id=task_id)
        return str(row.status)

    async def status_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Tasks by status and workflows by status, for metrics."""
        async with self.db.read() as conn:
            t = (
                await conn.execute(select(tasks.c.status, func.count()).group_by(tasks.c.status))
            ).all()
            w = (
                await conn.execute(
                    select(workflows.c.status, func.count()).group_by(workflows.c.status)
                )
            ).all()
        return {str(r[0]): int(r[1]) for r in t}, {str(r[0]): int(r[1]) for r in w}

    # ------------------------------------------------------------------ claiming

    async def claim(
        self, worker: str, limits: Limits, lease_s: float, log_dir: Path
    ) -> tuple[list[Claim], datetime | None]:
        """Claim ready tasks for ``worker`` within the limits; also start due rollbacks.

        Returns the claims and the earliest future ``ready_at`` (when to look again).
        """
        now = utcnow()
        claims: list[Claim] = []
        next_at: datetime | None = None
        async with self.db.write() as conn:
            if self.db.dialect == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CLAIM_LOCK_KEY})
            running = (
                await conn.execute(
                    select(tasks.c.workflow_id, tasks.c.concurrency_key, func.count())
                    .where(tasks.c.status.in_(ACTIVE))
                    .group_by(tasks.c.workflow_id, tasks.c.concurrency_key)
                )
            ).all()
            per_wf: dict[str, int] = {}
            per_key: dict[str, int] = {}
            for wf_id, key, n in running:
                per_wf[wf_id] = per_wf.get(wf_id, 0) + n
                if key:
                    per_key[key] = per_key.get(key, 0) + n
            free = limits.free_slots
            if free > 0:
                chosen = await self._pick_ready(conn, now, free, per_wf, per_key, limits)
                claims.extend(await self._start(conn, chosen, "run", worker, now, lease_s, log_dir))
                free -= len(chosen)
            if free > 0:
                rb = await self._pick_rollbacks(conn, per_wf, free)
                claims.extend(
                    await self._start(conn, rb, "rollback", worker, now, lease_s, log_dir)
                )
            nxt = (
                await conn.execute(
                    select(func.min(tasks.c.ready_at)).where(
                        tasks.c.status == TS.READY.value, tasks.c.ready_at > now
                    )
                )
            ).scalar()
            next_at = as_utc(nxt)
        return claims, next_at

    async def _pick_ready(
        self,
        conn: AsyncConnection,
        now: datetime,
        free: int,
        per_wf: dict[str, int],
        per_key: dict[str, int],
        limits: Limits,
    ) -> list[Any]:
        q = (
            select(
                tasks.c.id,
                tasks.c.workflow_id,
                tasks.c.concurrency_key,
                workflows.c.parallel_limit,
            )
            .join(workflows, workflows.c.id == tasks.c.workflow_id)
            .where(
                tasks.c.status == TS.READY.value,
                tasks.c.ready_at <= now,
                workflows.c.status.in_((WS.PENDING.value, WS.RUNNING.value)),
                workflows.c.draining.is_(None),
            )
            .order_by(tasks.c.priority.desc(), tasks.c.ready_at, tasks.c.ord)
            .limit(max(64, free * 8))
        )
        if self.db.dialect == "postgresql":
            q = q.with_for_update(of=tasks, skip_locked=True)
        chosen: list[Any] = []
        for row in (await conn.execute(q)).all():
            if len(chosen) >= free:
                break
            wf_limit = row.parallel_limit
            if wf_limit is not None and per_wf.get(row.workflow_id, 0) >= wf_limit:
                continue
            key = row.concurrency_key
            if key:
                key_limit = limits.key_limits.get(key, limits.default_key_limit)
                if per_key.get(key, 0) >= key_limit:
                    continue
                per_key[key] = per_key.get(key, 0) + 1
            per_wf[row.workflow_id] = per_wf.get(row.workflow_id, 0) + 1
            chosen.append(row)
        return chosen

    async def _pick_rollbacks(
        self, conn: AsyncConnection, per_wf: dict[str, int], free: int
    ) -> list[Any]:
        # Rollback is sequential per workflow, in reverse topological order, once nothing of
        # the workflow runs any more.
        wf_rows = (
            await conn.execute(
                select(workflows.c.id).where(
                    workflows.c.status == WS.ROLLING_BACK.value, workflows.c.draining.is_(None)
                )
            )
        ).all()
        chosen: list[Any] = []
        for wf in wf_rows:
            if len(chosen) >= free or per_wf.get(wf.id, 0) > 0:
                continue
            rows = (
                await conn.execute(
                    select(tasks.c.id, tasks.c.workflow_id, tasks.c.spec, tasks.c.concurrency_key)
                    .where(tasks.c.workflow_id == wf.id, tasks.c.status == TS.COMPLETED.value)
                    .order_by(tasks.c.topo.desc())
                )
            ).all()
            for row in rows:
                if row.spec.get("rollback"):
                    chosen.append(row)
                    break
        return chosen

    async def _start(
        self,
        conn: AsyncConnection,
        rows: Sequence[Any],
        phase: str,
        worker: str,
        now: datetime,
        lease_s: float,
        log_dir: Path,
    ) -> list[Claim]:
        if not rows:
            return []
        ids = [r.id for r in rows]
        full = {
            r.id: r
            for r in (
                await conn.execute(
                    select(tasks, workflows.c.idempotency_key.label("wf_key"))
                    .join(workflows, workflows.c.id == tasks.c.workflow_id)
                    .where(tasks.c.id.in_(ids))
                )
            ).all()
        }
        lease_until = now + timedelta(seconds=lease_s)
        status = TS.RUNNING.value if phase == "run" else TS.ROLLING_BACK.value
        claims: list[Claim] = []
        task_updates: list[dict[str, Any]] = []
        attempt_rows: list[dict[str, Any]] = []
        wf_ids: set[str] = set()
        for tid in ids:
            r = full[tid]
            number = int(r.attempt_seq) + 1
            attempt_id = str(uuid.uuid4())
            log_path = log_dir / r.workflow_id / tid / f"{number}.log"
            task_updates.append(
                {
                    "b_id": tid,
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
                    "task_id": tid,
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
            wf_ids.add(r.workflow_id)
            claims.append(
                Claim(
                    task_id=tid,
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
        await conn.execute(
            update(tasks)
            .where(tasks.c.id == bindparam("b_id"))
            .values(
                status=bindparam("b_status"),
                attempts=bindparam("b_attempts"),
                attempt_seq=bindparam("b_seq"),
                lease_owner=bindparam("b_owner"),
                lease_expires_at=bindparam("b_lease"),
                started_at=bindparam("b_started"),
            ),
            task_updates,
        )
        await conn.execute(insert(attempts), attempt_rows)
        if phase == "run":
            await conn.execute(
                update(workflows)
                .where(workflows.c.id.in_(wf_ids), workflows.c.status == WS.PENDING.value)
                .values(status=WS.RUNNING.value, started_at=now, updated_at=now)
            )
            await self._load_inputs(conn, claims, full)
        return claims

    async def _load_inputs(
        self, conn: AsyncConnection, claims: list[Claim], full: Mapping[str, Any]
    ) -> None:
        wanted: dict[str, set[str]] = {}
        for c in claims:
            for dep in full[c.task_id].depends_on:
                wanted.setdefault(c.workflow_id, set()).add(dep["task"])
        outputs: dict[tuple[str, str], Any] = {}
        for wf_id, names in wanted.items():
            rows = (
                await conn.execute(
                    select(tasks.c.name, tasks.c.outputs).where(
                        tasks.c.workflow_id == wf_id, tasks.c.name.in_(sorted(names))
                    )
                )
            ).all()
            outputs.update({(wf_id, r.name): r.outputs for r in rows})
        for c in claims:
            for dep in full[c.task_id].depends_on:
                c.inputs[dep["task"]] = outputs.get((c.workflow_id, dep["task"]), {})

    async def set_attempt_pids(self, pids: Sequence[tuple[str, int]]) -> None:
        """Remember the processes of attempts so a restarted worker can kill orphans."""
        async with self.db.write() as conn:
            await conn.execute(
                update(attempts)
                .where(attempts.c.id == bindparam("b_id"))
                .values(pid=bindparam("b_pid")),
                [{"b_id": a, "b_pid": p} for a, p in pids],
            )

    async def renew_leases(self, worker: str, task_ids: Iterable[str], lease_s: float) -> None:
        ids = list(task_ids)
        if not ids:
            return
        until = utcnow() + timedelta(seconds=lease_s)
        async with self.db.write() as conn:
            await conn.execute(
                update(tasks)
                .where(
                    tasks.c.id.in_(ids), tasks.c.lease_owner == worker, tasks.c.status.in_(ACTIVE)
                )
                .values(lease_expires_at=until)
            )

    async def cancelling(self, task_ids: Iterable[str]) -> list[str]:
        """Which of these tasks belong to a workflow being cancelled."""
        ids = list(task_ids)
        if not ids:
            return []
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(tasks.c.id)
                    .join(workflows, workflows.c.id == tasks.c.workflow_id)
                    .where(tasks.c.id.in_(ids), workflows.c.draining == "cancel")
                )
            ).all()
        return [str(r.id) for r in rows]

    # ------------------------------------------------------------------ results

    async def finish(self, results: Sequence[Result], worker: str) -> list[str]:
        """Record how attempts ended and everything that follows from it, in one transaction.

        Results of attempts this worker no longer owns (its lease expired and another worker
        took the task) are ignored. Returns the ids of workflows that changed state.
        """
        if not results:
            return []
        now = utcnow()
        touched: set[str] = set()
        async with self.db.write() as conn:
            for res in results:
                wf = await self._apply(conn, res, now, owner=worker)
                if wf:
                    touched.add(wf)
            for wf_id in touched:
                await self._settle(conn, wf_id, now)
        return sorted(touched)

    async def _apply(
        self, conn: AsyncConnection, res: Result, now: datetime, owner: str | None
    ) -> str | None:
        row = (await conn.execute(select(tasks).where(tasks.c.id == res.task_id))).first()
        if row is None or int(row.attempt_seq) != res.attempt or row.status not in ACTIVE:
            return None
        if owner is not None and row.lease_owner != owner:
            return None
        wf = (
            await conn.execute(
                select(workflows.c.status, workflows.c.draining).where(
                    workflows.c.id == row.workflow_id
                )
            )
        ).one()
        await conn.execute(
            update(attempts)
            .where(attempts.c.task_id == res.task_id, attempts.c.number == res.attempt)
            .values(ended_at=now, exit_code=res.exit_code, error=res.error)
        )
        base = {"lease_owner": None, "lease_expires_at": None}
        if res.phase == "rollback":
            if res.ok:
                await self._set(conn, row.id, status=TS.ROLLED_BACK.value, finished_at=now, **base)
            else:
                err = f"rollback failed: {res.error or 'exit code ' + str(res.exit_code)}"
                await self._set(conn, row.id, status=TS.FAILED.value, error=err, **base)
                await self._wf_error(conn, row.workflow_id, f"{row.name}: {err}", now)
            return str(row.workflow_id)
        if res.ok:
            await self._set(
                conn,
                row.id,
                status=TS.COMPLETED.value,
                outputs=dict(res.outputs or {}),
                error=None,
                finished_at=now,
                **base,
            )
            await self._propagate(conn, row.id, TS.COMPLETED.value, now)
            return str(row.workflow_id)
        error = res.error or f"exit code {res.exit_code}"
        if wf.draining == "cancel" or res.cancelled:
            await self._set(
                conn, row.id, status=TS.CANCELLED.value, error=error, finished_at=now, **base
            )
            await self._propagate(conn, row.id, TS.CANCELLED.value, now)
            return str(row.workflow_id)
        policy = RetryPolicy.model_validate(row.spec.get("retry") or {})
        if int(row.attempts) < policy.max_attempts and wf.draining is None:
            delay = backoff_delay(policy, int(row.attempts), self.rng)
            await self._set(
                conn,
                row.id,
                status=TS.READY.value,
                ready_at=now + timedelta(seconds=delay),
                error=error,
                **base,
            )
            return str(row.workflow_id)
        await self._set(conn, row.id, status=TS.FAILED.value, error=error, finished_at=now, **base)
        await self._propagate(conn, row.id, TS.FAILED.value, now)
        on_failure = row.on_failure
        if on_failure != OnFailure.CONTINUE.value and wf.draining is None:
            values: dict[str, Any] = {
                "draining": on_failure,
                "error": f"task {row.name!r} failed: {error}",
                "updated_at": now,
            }
            if on_failure == OnFailure.ROLLBACK.value:
                values["status"] = WS.ROLLING_BACK.value
            await conn.execute(
                update(workflows).where(workflows.c.id == row.workflow_id).values(**values)
            )
        return str(row.workflow_id)

    async def _set(self, conn: AsyncConnection, task_id: str, **values: Any) -> None:
        await conn.execute(update(tasks).where(tasks.c.id == task_id).values(**values))

    async def _wf_error(
        self, conn: AsyncConnection, wf_id: str, message: str, now: datetime
    ) -> None:
        cur = (
            await conn.execute(select(workflows.c.error).where(workflows.c.id == wf_id))
        ).scalar()
        text_ = f"{cur}; {message}" if cur else message
        await conn.execute(
            update(workflows).where(workflows.c.id == wf_id).values(error=text_, updated_at=now)
        )

    async def _propagate(
        self, conn: AsyncConnection, task_id: str, outcome: str, now: datetime
    ) -> None:
        """Tell the dependants of a task that ended; start or skip those now unblocked."""
        stack = [(task_id, outcome)]
        while stack:
            tid, out = stack.pop()
            deps = (
                await conn.execute(
                    select(task_deps.c.task_id, task_deps.c.kind).where(task_deps.c.dep_id == tid)
                )
            ).all()
            for dep in deps:
                values: dict[str, Any] = {"deps_remaining": tasks.c.deps_remaining - 1}
                if out not in _ALLOWED[dep.kind]:
                    values["blocked"] = 1
                r = (
                    await conn.execute(
                        update(tasks)
                        .where(tasks.c.id == dep.task_id)
                        .values(**values)
                        .returning(tasks.c.deps_remaining, tasks.c.blocked, tasks.c.status)
                    )
                ).one()
                if r.deps_remaining > 0 or r.status != TS.PENDING.value:
                    continue
                if r.blocked:
                    await self._set(
                        conn,
                        dep.task_id,
                        status=TS.SKIPPED.value,
                        error="a dependency did not complete",
                        finished_at=now,
                    )
                    stack.append((dep.task_id, TS.SKIPPED.value))
                else:
                    await self._set(conn, dep.task_id, status=TS.READY.value, ready_at=now)

    async def _settle(self, conn: AsyncConnection, wf_id: str, now: datetime) -> None:
        """End a workflow whose work is done, or move it to its next phase."""
        wf = (await conn.execute(select(workflows).where(workflows.c.id == wf_id))).first()
        if wf is None or wf.status in TERMINAL_WF:
            return
        counts = (await _task_counts(conn, [wf_id])).get(wf_id, {})
        active = sum(counts.get(s, 0) for s in ACTIVE)
        waiting = sum(counts.get(s, 0) for s in WAITING)
        if active:
            return
        done = {"updated_at": now}
        if wf.draining == "cancel":
            await self._end_waiting(conn, wf_id, TS.CANCELLED.value, "workflow cancelled", now)
            await self._end(conn, wf_id, WS.CANCELLED.value, now)
        elif wf.draining == "fail":
            await self._end_waiting(conn, wf_id, TS.SKIPPED.value, "workflow failed", now)
            await self._end(conn, wf_id, WS.FAILED.value, now)
        elif wf.draining == "rollback" or wf.status == WS.ROLLING_BACK.value:
            if waiting:
                await self._end_waiting(conn, wf_id, TS.SKIPPED.value, "workflow rolled back", now)
            if wf.draining is not None:
                await conn.execute(
                    update(workflows).where(workflows.c.id == wf_id).values(draining=None, **done)
                )
            rows = (
                await conn.execute(
                    select(tasks.c.spec).where(
                        tasks.c.workflow_id == wf_id, tasks.c.status == TS.COMPLETED.value
                    )
                )
            ).all()
            if not any(r.spec.get("rollback") for r in rows):
                failed_rb = (
                    await conn.execute(
                        select(func.count()).where(
                            tasks.c.workflow_id == wf_id,
                            tasks.c.status == TS.FAILED.value,
                            tasks.c.error.like("rollback failed:%"),
                        )
                    )
                ).scalar()
                await self._end(
                    conn, wf_id, WS.FAILED.value if failed_rb else WS.ROLLED_BACK.value, now
                )
        elif not waiting and wf.status in (WS.RUNNING.value, WS.PENDING.value):
            failed = counts.get(TS.FAILED.value, 0)
            if failed:
                await self._wf_error(
                    conn, wf_id, f"{failed} task(s) failed (on_failure=continue)", now
                )
            await self._end(conn, wf_id, WS.FAILED.value if failed else WS.COMPLETED.value, now)

    async def _end_waiting(
        self, conn: AsyncConnection, wf_id: str, status: str, reason: str, now: datetime
    ) -> None:
        await conn.execute(
            update(tasks)
            .where(tasks.c.workflow_id == wf_id, tasks.c.status.in_(WAITING))
            .values(status=status, error=reason, finished_at=now)
        )

    async def _end(self, conn: AsyncConnection, wf_id: str, status: str, now: datetime) -> None:
        await conn.execute(
            update(workflows)
            .where(workflows.c.id == wf_id)
            .values(status=status, draining=None, finished_at=now, updated_at=now)
        )

    # ------------------------------------------------------------------ recovery

    async def orphaned(self, worker: str, *, own: bool, exclude: Iterable[str] = ()) -> list[Any]:
        """Tasks left Running/RollingBack by a dead worker: lease expired, or ours from a
        previous life when ``own`` (a restarted embedded worker knows it died)."""
        now = utcnow()
        cond = tasks.c.lease_expires_at < now
        if own:
            cond = or_(cond, tasks.c.lease_owner == worker)
        q = (
            select(
                tasks.c.id,
                tasks.c.attempt_seq,
                tasks.c.lease_owner,
                attempts.c.id.label("attempt_id"),
                attempts.c.pid,
                attempts.c.worker,
            )
            .outerjoin(
                attempts,
                and_(attempts.c.task_id == tasks.c.id, attempts.c.number == tasks.c.attempt_seq),
            )
            .where(tasks.c.status.in_(ACTIVE), cond)
        )
        excluded = set(exclude)
        async with self.db.read() as conn:
            rows = (await conn.execute(q)).all()
        return [r for r in rows if r.id not in excluded]

    async def recover(self, rows: Sequence[Any]) -> list[str]:
        """Fail the lost attempts of orphaned tasks; their retry policy decides what follows."""
        now = utcnow()
        touched: set[str] = set()
        async with self.db.write() as conn:
            for r in rows:
                cur = (
                    await conn.execute(select(tasks.c.status).where(tasks.c.id == r.id))
                ).scalar()
                if cur not in ACTIVE:
                    continue
                phase = "run" if cur == TS.RUNNING.value else "rollback"
                msg = f"worker {r.lease_owner} lost the attempt (crash or lease expiry)"
                if phase == "rollback":
                    await conn.execute(
                        update(attempts)
                        .where(attempts.c.task_id == r.id, attempts.c.number == r.attempt_seq)
                        .values(ended_at=now, error=msg)
                    )
                    # The compensation runs again from the start: it must be idempotent.
                    await self._set(
                        conn,
                        r.id,
                        status=TS.COMPLETED.value,
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                    wf = (
                        await conn.execute(select(tasks.c.workflow_id).where(tasks.c.id == r.id))
                    ).scalar()
                    touched.add(str(wf))
                    continue
                wf_id = await self._apply(
                    conn,
                    Result(
                        task_id=r.id, attempt=int(r.attempt_seq), phase=phase, ok=False, error=msg
                    ),
                    now,
                    owner=None,
                )
                if wf_id:
                    touched.add(wf_id)
            for wf_id in touched:
                await self._settle(conn, wf_id, now)
        return sorted(touched)

    async def unsettled(self) -> list[str]:
        """Workflows not ended, for a settle pass at start (a crash may have hit between)."""
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(workflows.c.id).where(workflows.c.status.not_in(TERMINAL_WF))
                )
            ).all()
        return [str(r.id) for r in rows]

    async def settle(self, workflow_ids: Iterable[str]) -> None:
        now = utcnow()
        async with self.db.write() as conn:
            for wf_id in workflow_ids:
                await self._settle(conn, wf_id, now)

    # ------------------------------------------------------------------ control

    async def _workflow_for_update(self, conn: AsyncConnection, wf_id: str) -> Any:
        q = select(workflows).where(workflows.c.id == wf_id)
        if self.db.dialect == "postgresql":
            q = q.with_for_update()
        row = (await conn.execute(q)).first()
        if row is None:
            raise NotFound(f"workflow {wf_id} not found", workflow_id=wf_id)
        return row

    async def cancel(self, wf_id: str) -> None:
        """Stop a workflow: waiting tasks are cancelled now, running ones are signalled.

        Raises:
            NotFound: no such workflow.
            InvalidState: the workflow already ended.
        """
        now = utcnow()
        async with self.db.write() as conn:
            wf = await self._workflow_for_update(conn, wf_id)
            if wf.status in TERMINAL_WF:
                raise InvalidState(
                    f"workflow {wf_id} is {wf.status}; only a running one can be cancelled"
                )
            await conn.execute(
                update(workflows)
                .where(workflows.c.id == wf_id)
                .values(draining="cancel", updated_at=now, error=wf.error or "cancelled by request")
            )
            await self._end_waiting(conn, wf_id, TS.CANCELLED.value, "workflow cancelled", now)
            await self._settle(conn, wf_id, now)

    async def pause(self, wf_id: str) -> None:
        """Stop starting new tasks; running ones finish.

        Raises:
            InvalidState: the workflow is not Pending or Running.
        """
        await self._flip(wf_id, (WS.PENDING.value, WS.RUNNING.value), WS.PAUSED.value, "paused")

    async def resume(self, wf_id: str) -> None:
        """Start scheduling a paused workflow again.

        Raises:
            InvalidState: the workflow is not Paused.
        """
        await self._flip(wf_id, (WS.PAUSED.value,), WS.RUNNING.value, "resumed")

    async def _flip(self, wf_id: str, allowed: tuple[str, ...], to: str, verb: str) -> None:
        now = utcnow()
        async with self.db.write() as conn:
            wf = await self._workflow_for_update(conn, wf_id)
            if wf.status not in allowed or wf.draining is not None:
                raise InvalidState(
                    f"workflow {wf_id} is {wf.status}{' and ending' if wf.draining else ''}; "
                    f"it cannot be {verb}"
                )
            await conn.execute(
                update(workflows).where(workflows.c.id == wf_id).values(status=to, updated_at=now)
            )

    async def retry(self, wf_id: str) -> int:
        """Re-run a Failed or Cancelled workflow from the point of failure.

        Completed tasks keep their results; every other task goes back to waiting with a fresh
        retry budget. Returns the number of tasks that will run again.

        Raises:
            InvalidState: the workflow is not Failed or Cancelled.
        """
        now = utcnow()
        async with self.db.write() as conn:
            wf = await self._workflow_for_update(conn, wf_id)
            if wf.status not in (WS.FAILED.value, WS.CANCELLED.value):
                raise InvalidState(
                    f"workflow {wf_id} is {wf.status}; "
                    "only a Failed or Cancelled one can be retried"
                )
            rows = (
                await conn.execute(
                    select(tasks.c.id, tasks.c.name, tasks.c.status, tasks.c.depends_on).where(
                        tasks.c.workflow_id == wf_id
                    )
                )
            ).all()
            status = {r.name: r.status for r in rows}
            if any(s == TS.ROLLED_BACK.value for s in status.values()):
                raise InvalidState(f"workflow {wf_id} was rolled back; submit it again instead")
            rerun = [r for r in rows if r.status != TS.COMPLETED.value]
            updates = []
            for r in rerun:
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
                await conn.execute(
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
            await conn.execute(
                update(workflows)
                .where(workflows.c.id == wf_id)
                .values(
                    status=WS.RUNNING.value,
                    draining=None,
                    error=None,
                    finished_at=None,
                    updated_at=now,
                )
            )
            await self._settle(conn, wf_id, now)
        return len(updates)

    async def rollback(self, wf_id: str) -> None:
        """Compensate the workflow's completed tasks in reverse topological order.

        A running workflow first stops scheduling and waits for its running tasks.

        Raises:
            InvalidState: the workflow is already rolling back or rolled back.
        """
        now = utcnow()
        async with self.db.write() as conn:
            wf = await self._workflow_for_update(conn, wf_id)
            if wf.status in (WS.ROLLING_BACK.value, WS.ROLLED_BACK.value):
                raise InvalidState(f"workflow {wf_id} is already {wf.status}")
            await conn.execute(
                update(workflows)
                .where(workflows.c.id == wf_id)
                .values(
                    status=WS.ROLLING_BACK.value,
                    draining="rollback",
                    finished_at=None,
                    updated_at=now,
                )
            )
            await self._settle(conn, wf_id, now)


def _chunks(rows: list[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


async def _task_counts(conn: AsyncConnection, wf_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    if not wf_ids:
        return {}
    rows = (
        await conn.execute(
            select(tasks.c.workflow_id, tasks.c.status, func.count())
            .where(tasks.c.workflow_id.in_(list(wf_ids)))
            .group_by(tasks.c.workflow_id, tasks.c.status)
        )
    ).all()
    out: dict[str, dict[str, int]] = {}
    for wf_id, status, n in rows:
        out.setdefault(wf_id, {})[status] = int(n)
    return out


async def _attempts_of(
    conn: AsyncConnection, task_ids: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for i in range(0, len(task_ids), 500):
        rows = (
            await conn.execute(
                select(attempts)
                .where(attempts.c.task_id.in_(list(task_ids[i : i + 500])))
                .order_by(attempts.c.task_id, attempts.c.number)
            )
        ).all()
        for r in rows:
            out.setdefault(r.task_id, []).append(
                {
                    "number": r.number,
                    "phase": r.phase,
                    "started_at": as_utc(r.started_at),
                    "ended_at": as_utc(r.ended_at),
                    "exit_code": r.exit_code,
                    "error": r.error,
                    "log_path": r.log_path,
                    "worker": r.worker,
                }
            )
    return out


def _workflow_doc(row: Any, counts: Mapping[str, int]) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "kind": row.kind,
        "status": row.status,
        "priority": row.priority,
        "parallel_limit": row.parallel_limit,
        "idempotency_key": row.idempotency_key,
        "owner": row.owner,
        "labels": row.labels or {},
        "error": row.error,
        "created_at": as_utc(row.created_at),
        "updated_at": as_utc(row.updated_at),
        "started_at": as_utc(row.started_at),
        "finished_at": as_utc(row.finished_at),
        "task_counts": dict(counts),
    }


def _task_doc(row: Any, att: list[dict[str, Any]]) -> dict[str, Any]:
    spec = row.spec or {}
    return {
        "id": row.id,
        "workflow_id": row.workflow_id,
        "name": row.name,
        "status": row.status,
        "priority": row.priority,
        "depends_on": row.depends_on,
        "command": spec.get("command"),
        "action": spec.get("action"),
        "rollback": spec.get("rollback"),
        "concurrency_key": row.concurrency_key,
        "on_failure": row.on_failure,
        "attempts": att,
        "outputs": row.outputs or {},
        "error": row.error,
        "created_at": as_utc(row.created_at),
        "started_at": as_utc(row.started_at),
        "finished_at": as_utc(row.finished_at),
    }
