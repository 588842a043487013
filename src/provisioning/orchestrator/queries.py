"""Read side of the orchestrator's store: what the API shows, as transaction functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.engine import Connection

from provisioning.core.clock import as_utc
from provisioning.core.errors import NotFound
from provisioning.orchestrator.tables import attempts, tasks, workflows

__all__ = [
    "find_by_idempotency_key",
    "get_task",
    "get_workflow",
    "list_tasks",
    "list_workflows",
    "status_counts",
    "task_log_paths",
    "task_owner",
    "task_status",
    "workflow_owner",
    "workflow_status",
]


def find_by_idempotency_key(conn: Connection, key: str) -> str | None:
    row = conn.execute(select(workflows.c.id).where(workflows.c.idempotency_key == key)).first()
    return None if row is None else str(row.id)


def workflow_status(conn: Connection, wf_id: str) -> str:
    row = conn.execute(select(workflows.c.status).where(workflows.c.id == wf_id)).first()
    if row is None:
        raise NotFound(f"workflow {wf_id} not found", workflow_id=wf_id)
    return str(row.status)


def workflow_owner(conn: Connection, wf_id: str) -> str | None:
    row = conn.execute(select(workflows.c.owner).where(workflows.c.id == wf_id)).first()
    if row is None:
        raise NotFound(f"workflow {wf_id} not found", workflow_id=wf_id)
    return None if row.owner is None else str(row.owner)


def task_owner(conn: Connection, task_id: str) -> tuple[str, str | None]:
    row = conn.execute(
        select(tasks.c.workflow_id, workflows.c.owner)
        .join(workflows, workflows.c.id == tasks.c.workflow_id)
        .where(tasks.c.id == task_id)
    ).first()
    if row is None:
        raise NotFound(f"task {task_id} not found", task_id=task_id)
    return str(row.workflow_id), None if row.owner is None else str(row.owner)


#: The columns of a task in the brief view (``GET /workflows/{id}?tasks=brief``).
_BRIEF = (
    tasks.c.id,
    tasks.c.name,
    tasks.c.status,
    tasks.c.depends_on,
    tasks.c.attempt_seq,
    tasks.c.error,
    tasks.c.started_at,
    tasks.c.finished_at,
)


def get_workflow(
    conn: Connection, wf_id: str, with_tasks: bool, brief: bool = False
) -> dict[str, Any]:
    row = conn.execute(select(workflows).where(workflows.c.id == wf_id)).first()
    if row is None:
        raise NotFound(f"workflow {wf_id} not found", workflow_id=wf_id)
    doc = workflow_doc(row, task_counts(conn, [wf_id]).get(wf_id, {}))
    if with_tasks and brief:
        doc["tasks"] = [
            {
                "id": r.id,
                "name": r.name,
                "status": r.status,
                "depends_on": r.depends_on,
                "attempt_count": int(r.attempt_seq),
                "error": r.error,
                "started_at": as_utc(r.started_at),
                "finished_at": as_utc(r.finished_at),
            }
            for r in conn.execute(
                select(*_BRIEF).where(tasks.c.workflow_id == wf_id).order_by(tasks.c.ord)
            )
        ]
    elif with_tasks:
        rows = conn.execute(
            select(tasks).where(tasks.c.workflow_id == wf_id).order_by(tasks.c.ord)
        ).all()
        att = attempts_of(conn, [r.id for r in rows])
        doc["tasks"] = [task_doc(r, att.get(r.id, [])) for r in rows]
    return doc


def list_workflows(
    conn: Connection,
    status: str | None,
    kind: str | None,
    owner: str | None,
    since: datetime | None,
    limit: int,
    offset: int,
) -> list[dict[str, Any]]:
    q = select(workflows).order_by(workflows.c.created_at.desc(), workflows.c.id)
    if status:
        q = q.where(workflows.c.status == status)
    q = _filtered(q, kind, owner, since)
    rows = conn.execute(q.limit(limit).offset(offset)).all()
    counts = task_counts(conn, [r.id for r in rows])
    return [workflow_doc(r, counts.get(r.id, {})) for r in rows]


def count_workflows(
    conn: Connection,
    kind: str | None,
    owner: str | None,
    since: datetime | None,
) -> dict[str, int]:
    """How many workflows are in each status (one ``GROUP BY``, no rows read out)."""
    q = select(workflows.c.status, func.count()).group_by(workflows.c.status)
    return {status: int(n) for status, n in conn.execute(_filtered(q, kind, owner, since))}


def _filtered(q: Select[Any], kind: str | None, owner: str | None, since: datetime | None) -> Any:
    """``q`` limited to the listing's filters (the same for rows and for counts)."""
    if kind:
        q = q.where(workflows.c.kind == kind)
    if owner:
        q = q.where(workflows.c.owner == owner)
    if since:
        q = q.where(workflows.c.created_at >= since)
    return q


def get_task(conn: Connection, task_id: str) -> dict[str, Any]:
    row = conn.execute(select(tasks).where(tasks.c.id == task_id)).first()
    if row is None:
        raise NotFound(f"task {task_id} not found", task_id=task_id)
    return task_doc(row, attempts_of(conn, [task_id]).get(task_id, []))


def list_tasks(
    conn: Connection,
    status: str | None,
    workflow_id: str | None,
    limit: int,
    offset: int,
    owner: str | None = None,
) -> list[dict[str, Any]]:
    q = select(tasks).order_by(tasks.c.created_at.desc(), tasks.c.workflow_id, tasks.c.ord)
    if owner is not None:
        q = q.where(
            tasks.c.workflow_id.in_(select(workflows.c.id).where(workflows.c.owner == owner))
        )
    if status:
        q = q.where(tasks.c.status == status)
    if workflow_id:
        q = q.where(tasks.c.workflow_id == workflow_id)
    rows = conn.execute(q.limit(limit).offset(offset)).all()
    att = attempts_of(conn, [r.id for r in rows])
    return [task_doc(r, att.get(r.id, [])) for r in rows]


def task_log_paths(conn: Connection, task_id: str) -> list[tuple[int, str]]:
    if conn.execute(select(tasks.c.id).where(tasks.c.id == task_id)).first() is None:
        raise NotFound(f"task {task_id} not found", task_id=task_id)
    rows = conn.execute(
        select(attempts.c.number, attempts.c.log_path)
        .where(attempts.c.task_id == task_id)
        .order_by(attempts.c.number)
    ).all()
    return [(int(r.number), str(r.log_path)) for r in rows if r.log_path]


def task_status(conn: Connection, task_id: str) -> str:
    row = conn.execute(select(tasks.c.status).where(tasks.c.id == task_id)).first()
    if row is None:
        raise NotFound(f"task {task_id} not found", task_id=task_id)
    return str(row.status)


def status_counts(conn: Connection) -> tuple[dict[str, int], dict[str, int]]:
    t = conn.execute(select(tasks.c.status, func.count()).group_by(tasks.c.status)).all()
    w = conn.execute(select(workflows.c.status, func.count()).group_by(workflows.c.status)).all()
    return {str(r[0]): int(r[1]) for r in t}, {str(r[0]): int(r[1]) for r in w}


def task_counts(conn: Connection, wf_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    if not wf_ids:
        return {}
    out: dict[str, dict[str, int]] = {}
    for wf_id, status, n in conn.execute(
        select(tasks.c.workflow_id, tasks.c.status, func.count())
        .where(tasks.c.workflow_id.in_(list(wf_ids)))
        .group_by(tasks.c.workflow_id, tasks.c.status)
    ):
        out.setdefault(wf_id, {})[status] = int(n)
    return out


def attempts_of(conn: Connection, task_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for i in range(0, len(task_ids), 500):
        for r in conn.execute(
            select(attempts)
            .where(attempts.c.task_id.in_(list(task_ids[i : i + 500])))
            .order_by(attempts.c.task_id, attempts.c.number)
        ):
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


def workflow_doc(row: Any, counts: Mapping[str, int]) -> dict[str, Any]:
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


def task_doc(row: Any, att: list[dict[str, Any]]) -> dict[str, Any]:
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
