"""The orchestrator's REST routes (DESIGN §5). Wiring lives in ``app.py``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from provisioning import __version__
from provisioning.core.auth import Guard, Identity
from provisioning.core.errors import Forbidden
from provisioning.core.rbac import Resource
from provisioning.core.web import envelope
from provisioning.orchestrator.api import TaskStatus, WorkflowKind, WorkflowSpec, WorkflowStatus
from provisioning.orchestrator.engine import Engine
from provisioning.orchestrator.logs import follow_log, parse_position, read_lines
from provisioning.orchestrator.metrics import Metrics

__all__ = ["SignedOpsGate", "build_router"]

Id = Annotated[str, Path(min_length=1, max_length=64, description="Object id (UUID).")]
Limit = Annotated[int, Query(ge=1, le=1000, description="Page size, 1-1000.")]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="Rows to skip.")]


class SignedOpsGate:
    """``orchestrator.require_signed_ops``: the one check every route that makes a workflow
    from a caller's own request passes (``POST /workflows``, the domain routes, batches), after
    authentication and before anything is stored. ``POST /ops/dispatch`` does not pass it: its
    workflows come from operations the ops-keeper signed. Retry and rollback re-run tasks of an
    existing workflow and make none, so they do not pass it either; a ``check: true`` plan
    makes nothing and is allowed."""

    MESSAGE = (
        "this orchestrator has orchestrator.require_signed_ops = true: workflows are made only "
        "from operations the ops-keeper approved and signed. Ask the keeper instead: add "
        "--via-ops to the prvng command (or POST /ops on the ops-keeper)"
    )

    def __init__(self, required: bool, guard: Guard) -> None:
        self.required = required
        self._guard = guard

    async def check(self, request: Request, who: Identity) -> None:
        """Raises: Forbidden (code ``forbidden``, ``setting`` in the details) when signed
        operations are required; the refusal is recorded as a denial in the audit log."""
        if not self.required:
            return
        action = getattr(request.state, "action", None) or "workflow:create"
        if self._guard.audit is not None:
            await self._guard.audit(
                request, who, action, "denied", {"setting": "orchestrator.require_signed_ops"}
            )
        raise Forbidden(self.MESSAGE, setting="orchestrator.require_signed_ops", action=action)


def build_router(
    engine: Engine, metrics: Metrics, guard: Guard, started: float, signed_ops: SignedOpsGate
) -> APIRouter:
    """All routes, bound to one engine; ``signed_ops`` guards the route that submits."""
    r = APIRouter()
    store = engine.store

    @r.get("/health", tags=["system"], summary="Liveness and identity of this worker")
    async def health() -> Response:
        return envelope(
            {
                "status": "ok",
                "service": "orchestrator",
                "version": __version__,
                "worker": engine.worker_id,
                "uptime_s": round(time.monotonic() - started, 3),
                "running_tasks": engine.running_count,
                "auth": "required" if guard.authenticator is not None else "disabled",
                "require_signed_ops": signed_ops.required,
            }
        )

    @r.get("/metrics", tags=["system"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        await metrics.refresh()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def need(action: str) -> Any:
        return Depends(guard.require(action))

    def may_see_all(who: Identity, action: str) -> bool:
        # Developers see only their own objects.
        return guard.sees_all(who, action)

    async def workflow_object(request: Request, who: Identity, wf_id: str, action: str) -> None:
        owner = await store.workflow_owner(wf_id)
        await guard.check_object(request, who, action, Resource("Workflow", wf_id, owner=owner))

    async def task_object(request: Request, who: Identity, task_id: str, action: str) -> None:
        wf_id, owner = await store.task_owner(task_id)
        await guard.check_object(request, who, action, Resource("Workflow", wf_id, owner=owner))

    @r.post("/workflows", status_code=201, tags=["workflows"], summary="Submit a workflow (a DAG)")
    async def submit(
        request: Request,
        spec: Annotated[WorkflowSpec, Body()],
        who: Identity = need("workflow:create"),
    ) -> Response:
        await signed_ops.check(request, who)
        wf_id, created = await engine.submit(spec, owner=who.subject)
        request.state.audit_object = ("Workflow", wf_id)  # for the mutation audit record
        doc = await store.get_workflow(wf_id, with_tasks=True)
        return envelope(doc, status=201 if created else 200)

    @r.get("/workflows", tags=["workflows"], summary="List workflows, newest first")
    async def list_workflows(
        status: WorkflowStatus | None = None,
        kind: WorkflowKind | None = None,
        owner: Annotated[str | None, Query(max_length=200)] = None,
        since: datetime | None = None,
        idempotency_key: Annotated[
            str | None, Query(min_length=1, max_length=200, description="The one with this key.")
        ] = None,
        limit: Limit = 50,
        offset: Offset = 0,
        who: Identity = need("workflow:read"),
    ) -> Response:
        if not may_see_all(who, "workflow:read"):
            owner = who.subject
        if idempotency_key is not None:
            found = await store.find_by_idempotency_key(idempotency_key)
            if found is None:
                return envelope([])
            doc = await store.get_workflow(found, with_tasks=False)
            return envelope([doc] if owner is None or doc.get("owner") == owner else [])
        rows = await store.list_workflows(
            status=status.value if status else None,
            kind=kind.value if kind else None,
            owner=owner,
            since=since,
            limit=limit,
            offset=offset,
        )
        return envelope(rows)

    @r.get(
        "/workflows/counts",
        tags=["workflows"],
        summary="How many workflows are in each status (all of them, not a page)",
    )
    async def count_workflows(
        kind: WorkflowKind | None = None,
        owner: Annotated[str | None, Query(max_length=200)] = None,
        since: datetime | None = None,
        who: Identity = need("workflow:read"),
    ) -> Response:
        if not may_see_all(who, "workflow:read"):
            owner = who.subject
        by_status = await store.count_workflows(
            kind=kind.value if kind else None, owner=owner, since=since
        )
        return envelope({"total": sum(by_status.values()), "by_status": by_status})

    @r.get("/workflows/{workflow_id}", tags=["workflows"], summary="A workflow and its tasks")
    async def get_workflow(
        workflow_id: Id,
        request: Request,
        tasks: Annotated[
            Literal["full", "brief", "none"],
            Query(
                description="full: each task with its attempts, outputs and command; brief: "
                "id, name, status, depends_on, attempt_count, error and times only; none: "
                "no tasks (task_counts only)."
            ),
        ] = "full",
        who: Identity = need("workflow:read"),
    ) -> Response:
        await workflow_object(request, who, workflow_id, "workflow:read")
        doc = await store.get_workflow(
            workflow_id, with_tasks=tasks != "none", brief=tasks == "brief"
        )
        return envelope(doc)

    async def _act(request: Request, who: Identity, workflow_id: str, action: str) -> Response:
        await workflow_object(request, who, workflow_id, _ACTION_OF[action])
        result: Any = None
        if action == "cancel":
            await engine.cancel(workflow_id)
        elif action == "pause":
            await engine.pause(workflow_id)
        elif action == "resume":
            await engine.resume(workflow_id)
        elif action == "retry":
            result = await engine.retry(workflow_id)
        elif action == "rollback":
            await engine.rollback(workflow_id)
        doc = await store.get_workflow(workflow_id, with_tasks=False)
        if result is not None:
            doc["rerun_tasks"] = result
        return envelope(doc)

    for action, summary in (
        ("cancel", "Cancel: SIGTERM running tasks (SIGKILL after the grace), cancel the rest"),
        ("pause", "Pause: start no new tasks; running ones finish"),
        ("resume", "Resume a paused workflow"),
        ("retry", "Retry a Failed/Cancelled workflow from the point of failure"),
        ("rollback", "Roll back completed tasks in reverse topological order"),
    ):
        r.add_api_route(
            f"/workflows/{{workflow_id}}/{action}",
            _make_action(_act, action, guard),
            methods=["POST"],
            tags=["workflows"],
            summary=summary,
            name=f"workflow_{action}",
        )

    @r.get("/tasks", tags=["tasks"], summary="List tasks")
    async def list_tasks(
        status: TaskStatus | None = None,
        workflow_id: Annotated[str | None, Query(max_length=64)] = None,
        limit: Limit = 50,
        offset: Offset = 0,
        who: Identity = need("task:read"),
    ) -> Response:
        rows = await store.list_tasks(
            status=status.value if status else None,
            workflow_id=workflow_id,
            owner=None if may_see_all(who, "task:read") else who.subject,
            limit=limit,
            offset=offset,
        )
        return envelope(rows)

    @r.get("/tasks/{task_id}", tags=["tasks"], summary="A task with its attempts")
    async def get_task(
        task_id: Id, request: Request, who: Identity = need("task:read")
    ) -> Response:
        await task_object(request, who, task_id, "task:read")
        return envelope(await store.get_task(task_id))

    @r.get(
        "/tasks/{task_id}/logs",
        tags=["tasks"],
        summary="A task's log lines; ?follow=1 streams Server-Sent Events",
        responses={200: {"content": {"text/event-stream": {}, "text/plain": {}}}},
    )
    async def task_logs(
        request: Request,
        task_id: Id,
        who: Identity = need("task:logs"),
        follow: Annotated[bool, Query(description="Stream SSE until the task ends.")] = False,
        attempt: Annotated[int | None, Query(ge=1, le=1000000)] = None,
        q: Annotated[
            str | None, Query(max_length=500, description="Only lines containing this.")
        ] = None,
        format: Annotated[str, Query(pattern="^(json|text)$")] = "json",
        after: Annotated[
            str | None,
            Query(max_length=64, description="Only lines after this position '<attempt>:<line>'."),
        ] = None,
        last_event_id: Annotated[
            str | None, Header(max_length=64, description="SSE resume position (wins over after).")
        ] = None,
    ) -> Response:
        await task_object(request, who, task_id, "task:logs")
        position = parse_position(last_event_id or after)
        files = await store.task_log_paths(task_id)
        if not follow:
            lines = read_lines(files, attempt=attempt, query=q, after=position)
            if format == "text":
                body = "".join(
                    f"[{ln['attempt']}:{ln['n']}] {ln['stream']}: {ln['line']}\n" for ln in lines
                )
                return PlainTextResponse(
                    body,
                    headers={"Content-Disposition": f'attachment; filename="{task_id}.log"'},
                )
            return envelope({"task_id": task_id, "lines": lines})
        listener = engine.log_listener(task_id)

        async def wait_change(timeout: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.wait(), timeout)
            listener.clear()

        async def stream() -> Any:
            try:
                async for chunk in follow_log(
                    lambda: store.task_log_paths(task_id),
                    lambda: store.task_status(task_id),
                    wait_change,
                    after=position,
                ):
                    if await request.is_disconnected():
                        return
                    yield chunk
            finally:
                engine.drop_listener(task_id, listener)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return r


_ACTION_OF = {
    "cancel": "workflow:cancel",
    "pause": "workflow:control",
    "resume": "workflow:control",
    "retry": "workflow:control",
    "rollback": "workflow:control",
}


def _make_action(act: Any, action: str, guard: Guard) -> Any:
    async def handler(
        workflow_id: Id,
        request: Request,
        who: Identity = Depends(guard.require(_ACTION_OF[action])),
    ) -> Response:
        return await act(request, who, workflow_id, action)  # type: ignore[no-any-return]

    handler.__name__ = f"workflow_{action}"
    return handler
