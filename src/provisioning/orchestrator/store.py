"""Durable state of workflows and tasks: every state transition is one committed write.

The store is the source of truth; the engine's in-memory state is only what it runs now and is
rebuilt from here on start. :class:`WorkflowStore` is the async face; the transaction bodies
live in :mod:`.transitions` (writes) and :mod:`.queries` (reads) and run on any
:class:`~provisioning.core.store.Database` (SQLite or PostgreSQL). On PostgreSQL, claims lock
the rows they start with ``FOR UPDATE SKIP LOCKED``, and a claim that counts a limit does so
under a transaction-scoped advisory lock, so several workers share one workflow without
breaking limits.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from provisioning.core.clock import utcnow
from provisioning.core.store import Database, upgrade
from provisioning.core.store.postgres import PostgresDatabase
from provisioning.orchestrator import queries, transitions
from provisioning.orchestrator.api import TaskStatus, WorkflowSpec, WorkflowStatus
from provisioning.orchestrator.tables import task_deps, tasks, workflows
from provisioning.orchestrator.transitions import Claim, Limits, Result, backoff_delay

__all__ = ["WORK_CHANNEL", "Claim", "Limits", "Result", "WorkflowStore", "backoff_delay"]

# PostgreSQL NOTIFY channel on which workers tell each other that tasks are ready: a workflow
# submitted, resumed, retried or rolled back, or a turn that left ready tasks for want of free
# slots. The payload is the sender's ``WorkflowStore.instance`` (a worker ignores its own).
WORK_CHANNEL = "prvng_orchestrator_work"
_LEFT_OVER_NOTICE_S = 0.1
T = TypeVar("T")

TS = TaskStatus
WS = WorkflowStatus
_SPEC_FIELDS = {"command", "action", "args", "env", "cwd", "retry", "timeout_s", "rollback"}


class WorkflowStore:
    """The orchestrator's tables on a :class:`Database`."""

    def __init__(self, db: Database, *, rng: random.Random | None = None) -> None:
        self.db = db
        self.rng = rng or random.Random()
        self.instance = uuid.uuid4().hex  # names this store's notifications (WORK_CHANNEL)
        self._left_over_noticed = float("-inf")

    @property
    def notifies(self) -> bool:
        """Whether workers tell each other about ready work (PostgreSQL) or only poll."""
        return isinstance(self.db, PostgresDatabase)

    def _noticed(self, fn: Callable[[Connection], T]) -> Callable[[Connection], T]:
        """``fn``, and on PostgreSQL a notification to the other workers committed with it."""
        if not self.notifies:
            return fn

        def body(conn: Connection) -> T:
            out = fn(conn)
            _notify_work(conn, self.instance)
            return out

        return body

    async def listen_for_work(self, on_work: Callable[[], None]) -> None:
        """Call ``on_work`` whenever another worker says tasks are ready, until cancelled
        (PostgreSQL only: see :attr:`notifies`)."""
        assert isinstance(self.db, PostgresDatabase)
        me = self.instance

        def heard(sender: str) -> None:
            if sender != me:
                on_work()

        await self.db.listen(WORK_CHANNEL, heard)

    async def migrate(self) -> None:
        """Create or upgrade the orchestrator's tables."""
        await upgrade(self.db, Path(__file__).parent / "migrations", "alembic_version_orchestrator")

    # ------------------------------------------------------------------ submission

    async def submit(
        self, spec: WorkflowSpec, topo: Sequence[int], owner: str | None = None
    ) -> tuple[str, bool]:
        """Store a validated workflow in one transaction; return ``(workflow_id, created)``.

        With an idempotency key already used, returns the existing workflow's id and False.
        """
        if spec.idempotency_key:
            existing = await self.find_by_idempotency_key(spec.idempotency_key)
            if existing:
                return existing, False
        try:
            insert_it = self._noticed(partial(_insert_workflow, spec, topo, owner))
            return await self.db.run_write(insert_it), True
        except IntegrityError:
            # Another submission with the same idempotency key won the race.
            if spec.idempotency_key:
                existing = await self.find_by_idempotency_key(spec.idempotency_key)
                if existing:
                    return existing, False
            raise

    async def find_by_idempotency_key(self, key: str) -> str | None:
        return await self.db.run_read(partial(queries.find_by_idempotency_key, key=key))

    # ------------------------------------------------------------------ reads

    async def get_workflow(
        self, workflow_id: str, *, with_tasks: bool = True, brief: bool = False
    ) -> dict[str, Any]:
        """The workflow as the API shows it; ``brief``: each task without its attempts,
        outputs and command, with ``attempt_count`` instead (what a graph of it needs).

        Raises:
            NotFound: no workflow has this id.
        """
        return await self.db.run_read(
            partial(queries.get_workflow, wf_id=workflow_id, with_tasks=with_tasks, brief=brief)
        )

    async def workflow_owner(self, workflow_id: str) -> str | None:
        """Raises: NotFound."""
        return await self.db.run_read(partial(queries.workflow_owner, wf_id=workflow_id))

    async def task_owner(self, task_id: str) -> tuple[str, str | None]:
        """``(workflow id, owner)`` of a task. Raises: NotFound."""
        return await self.db.run_read(partial(queries.task_owner, task_id=task_id))

    async def workflow_status(self, workflow_id: str) -> str:
        """Just the status (cheap: for pollers).

        Raises:
            NotFound: no workflow has this id.
        """
        return await self.db.run_read(partial(queries.workflow_status, wf_id=workflow_id))

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
        return await self.db.run_read(
            partial(
                queries.list_workflows,
                status=status,
                kind=kind,
                owner=owner,
                since=since,
                limit=limit,
                offset=offset,
            )
        )

    async def count_workflows(
        self,
        *,
        kind: str | None = None,
        owner: str | None = None,
        since: datetime | None = None,
    ) -> dict[str, int]:
        """Workflows per status (statuses with none are absent)."""
        return await self.db.run_read(
            partial(queries.count_workflows, kind=kind, owner=owner, since=since)
        )

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """One task with its attempts.

        Raises:
            NotFound: no task has this id.
        """
        return await self.db.run_read(partial(queries.get_task, task_id=task_id))

    async def list_tasks(
        self,
        *,
        status: str | None = None,
        workflow_id: str | None = None,
        owner: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        return await self.db.run_read(
            partial(
                queries.list_tasks,
                status=status,
                workflow_id=workflow_id,
                owner=owner,
                limit=limit,
                offset=offset,
            )
        )

    async def task_log_paths(self, task_id: str) -> list[tuple[int, str]]:
        """``(attempt number, log path)`` of every attempt of a task, oldest first.

        Raises:
            NotFound: no task has this id.
        """
        return await self.db.run_read(partial(queries.task_log_paths, task_id=task_id))

    async def task_status(self, task_id: str) -> str:
        return await self.db.run_read(partial(queries.task_status, task_id=task_id))

    async def status_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Tasks by status and workflows by status, for metrics."""
        return await self.db.run_read(queries.status_counts)

    # ------------------------------------------------------------------ scheduling

    async def turn(
        self,
        results: Sequence[Result],
        pids: Sequence[tuple[str, int]],
        worker: str,
        limits: Limits,
        lease_s: float,
        log_dir: Path,
    ) -> tuple[list[Claim], datetime | None]:
        """One scheduler turn in one transaction: record ended attempts (and the pids of
        started ones) with all their consequences, then claim within the limits."""
        now = utcnow()
        dialect = self.db.dialect

        def body(conn: Connection) -> tuple[list[Claim], datetime | None]:
            transitions.finish(conn, results, worker, pids, now, self.rng)
            claims, next_at, left_over = transitions.claim(
                conn, dialect, worker, limits, lease_s, log_dir, now
            )
            if left_over and self.notifies:
                # At most every _LEFT_OVER_NOTICE_S: each notice costs every listening worker
                # a turn, and a busy worker leaves tasks over on most of its turns.
                at = time.monotonic()
                if at - self._left_over_noticed >= _LEFT_OVER_NOTICE_S:
                    self._left_over_noticed = at
                    _notify_work(conn, self.instance)
            return claims, next_at

        return await self.db.run_write(body)

    async def finish(
        self,
        results: Sequence[Result],
        worker: str,
        pids: Sequence[tuple[str, int]] = (),
    ) -> set[str]:
        """Record ended attempts (and the pids of started ones) with all their consequences."""
        if not results and not pids:
            return set()
        return await self.db.run_write(
            partial(
                transitions.finish,
                results=results,
                owner=worker,
                pids=pids,
                now=utcnow(),
                rng=self.rng,
            )
        )

    async def renew_leases(self, worker: str, task_ids: Iterable[str], lease_s: float) -> None:
        ids = list(task_ids)
        if ids:
            await self.db.run_write(partial(_renew, worker=worker, ids=ids, lease_s=lease_s))

    async def cancelling(self, task_ids: Iterable[str]) -> list[str]:
        """Which of these tasks belong to a workflow being cancelled."""
        ids = list(task_ids)
        return await self.db.run_read(partial(_cancelling, ids=ids)) if ids else []

    async def orphaned(self, worker: str, *, own: bool, exclude: Iterable[str] = ()) -> list[Any]:
        """Tasks left Running/RollingBack by a dead worker (see ``transitions.orphaned``)."""
        return await self.db.run_read(
            partial(
                transitions.orphaned, worker=worker, own=own, exclude=list(exclude), now=utcnow()
            )
        )

    async def recover(self, rows: Sequence[Any]) -> set[str]:
        """Fail the lost attempts of orphaned tasks; their retry policy decides what follows."""
        return await self.db.run_write(
            partial(transitions.recover, rows=rows, now=utcnow(), rng=self.rng)
        )

    async def unsettled(self) -> list[str]:
        return await self.db.run_read(transitions.unsettled)

    async def settle(self, workflow_ids: Iterable[str]) -> None:
        ids = list(workflow_ids)
        if ids:
            await self.db.run_write(partial(transitions.settle_all, wf_ids=ids, now=utcnow()))

    # ------------------------------------------------------------------ control

    async def cancel(self, wf_id: str) -> None:
        """Cancel: waiting tasks now, running ones when their workers see it.

        Raises:
            NotFound: no such workflow.
            InvalidState: the workflow already ended.
        """
        await self.db.run_write(
            partial(transitions.cancel, dialect=self.db.dialect, wf_id=wf_id, now=utcnow())
        )

    async def pause(self, wf_id: str) -> None:
        """Start no new tasks; running ones finish.

        Raises:
            InvalidState: the workflow is not Pending or Running.
        """
        await self._flip(wf_id, (WS.PENDING.value, WS.RUNNING.value), WS.PAUSED.value, "paused")

    async def resume(self, wf_id: str) -> None:
        """Schedule a paused workflow again.

        Raises:
            InvalidState: the workflow is not Paused.
        """
        await self._flip(wf_id, (WS.PAUSED.value,), WS.RUNNING.value, "resumed")

    async def _flip(self, wf_id: str, allowed: tuple[str, ...], to: str, verb: str) -> None:
        flip = partial(
            transitions.flip,
            dialect=self.db.dialect,
            wf_id=wf_id,
            allowed=allowed,
            to=to,
            verb=verb,
            now=utcnow(),
        )
        await self.db.run_write(self._noticed(flip) if to == WS.RUNNING.value else flip)

    async def retry(self, wf_id: str) -> int:
        """Re-run a Failed or Cancelled workflow from the point of failure; return how many
        tasks run again.

        Raises:
            InvalidState: the workflow is not Failed or Cancelled, or was rolled back.
        """
        return await self.db.run_write(
            self._noticed(
                partial(transitions.retry, dialect=self.db.dialect, wf_id=wf_id, now=utcnow())
            )
        )

    async def rollback(self, wf_id: str) -> None:
        """Compensate completed tasks in reverse topological order.

        Raises:
            InvalidState: the workflow is already rolling back or rolled back.
        """
        await self.db.run_write(
            self._noticed(
                partial(transitions.rollback, dialect=self.db.dialect, wf_id=wf_id, now=utcnow())
            )
        )


def _notify_work(conn: Connection, sender: str) -> None:
    conn.execute(transitions.NOTIFY_WORK, {"channel": WORK_CHANNEL, "sender": sender})


def _insert_workflow(
    spec: WorkflowSpec, topo: Sequence[int], owner: str | None, conn: Connection
) -> str:
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
                "spec": t.model_dump(mode="json", include=_SPEC_FIELDS),
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
    conn.execute(
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
    for i in range(0, len(task_rows), 500):
        conn.execute(insert(tasks), task_rows[i : i + 500])
    for i in range(0, len(dep_rows), 1000):
        conn.execute(insert(task_deps), dep_rows[i : i + 1000])
    return wf_id


def _renew(conn: Connection, worker: str, ids: list[str], lease_s: float) -> None:
    from datetime import timedelta

    until = utcnow() + timedelta(seconds=lease_s)
    conn.execute(
        tasks.update()
        .where(
            tasks.c.id.in_(ids),
            tasks.c.lease_owner == worker,
            tasks.c.status.in_(transitions.ACTIVE),
        )
        .values(lease_expires_at=until)
    )


def _cancelling(conn: Connection, ids: list[str]) -> list[str]:
    from sqlalchemy import select

    rows = conn.execute(
        select(tasks.c.id)
        .join(workflows, workflows.c.id == tasks.c.workflow_id)
        .where(tasks.c.id.in_(ids), workflows.c.draining == "cancel")
    ).all()
    return [str(r.id) for r in rows]
