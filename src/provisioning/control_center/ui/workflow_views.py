"""Workflow pages: the list (filters by state, kind, owner and time; live) and one workflow with
its DAG drawn as a graph (``dag_layout``), its tasks and the control buttons its viewer may use.
The detail refreshes itself every two seconds while the workflow is not finished (task changes do
not move the workflow list's ``workflows`` event), and on that event."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from provisioning.control_center.ui.dag_layout import layout
from provisioning.control_center.ui.dag_svg import render_svg
from provisioning.control_center.ui.sessions import UiSession
from provisioning.control_center.ui.templating import PREFIX
from provisioning.core.errors import NotFound, ProvisioningError
from provisioning.core.rbac import Resource
from provisioning.orchestrator.api import WorkflowKind, WorkflowStatus

if TYPE_CHECKING:
    from provisioning.control_center.ui.app import WebUI

__all__ = ["ACTIONS", "Filters", "build_workflow_router"]

PAGE = 50
#: Rows of the tasks table shown before "Show all": the graph already shows every task, and a
#: 500-row table redrawn every two seconds was half of a big workflow's page time.
TASK_ROWS = 100
SINCE = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7),
         "30d": timedelta(days=30)}  # fmt: skip
STATES = [s.value for s in WorkflowStatus]
KINDS = [k.value for k in WorkflowKind]
FINISHED = ("Completed", "Failed", "Cancelled", "RolledBack")
_URGENT = frozenset({"Failed", "Running", "Cancelled", "RolledBack"})  # listed first
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

#: Button → (Cedar action, the states in which the orchestrator accepts it).
ACTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pause": ("workflow:control", ("Pending", "Running")),
    "resume": ("workflow:control", ("Paused",)),
    "cancel": ("workflow:cancel", ("Pending", "Running", "Paused")),
    "retry": ("workflow:control", ("Failed", "Cancelled")),
    "rollback": ("workflow:control", ("Failed", "Cancelled", "Completed", "Paused")),
}


@dataclass(frozen=True)
class Filters:
    """The list's filters, from the query string; a value that is not valid is ignored."""

    state: str = ""
    kind: str = ""
    owner: str = ""
    since: str = ""
    offset: int = 0

    @classmethod
    def of(cls, request: Request) -> Filters:
        q = request.query_params
        state, kind, since = q.get("state", ""), q.get("kind", ""), q.get("since", "")
        try:
            offset = max(0, min(int(q.get("offset", "0")), 10_000_000))
        except ValueError:
            offset = 0
        return cls(
            state=state if state in STATES else "",
            kind=kind if kind in KINDS else "",
            owner=q.get("owner", "").strip()[:64],
            since=since if since in SINCE else "",
            offset=offset,
        )

    def query(self, **changes: Any) -> str:
        values = {**self.__dict__, **changes}
        return urlencode({k: v for k, v in values.items() if v not in ("", 0, None)})


def build_workflow_router(ui: WebUI) -> APIRouter:
    r = APIRouter()
    usernames = ui.usernames

    async def listing(session: UiSession, f: Filters) -> dict[str, Any]:
        sees_all = ui.guard.sees_all(session.identity, "workflow:read")
        params: dict[str, Any] = {"limit": PAGE + 1, "offset": f.offset}
        if f.state:
            params["status"] = f.state
        if f.kind:
            params["kind"] = f.kind
        if f.since:
            params["since"] = (datetime.now(UTC) - SINCE[f.since]).isoformat()
        note = ""
        rows: list[dict[str, Any]] = []
        if f.owner and sees_all:
            try:
                params["owner"] = await ui.identity.find_user_id(f.owner)
            except NotFound:
                note = f"There is no user {f.owner}."
        if not note:
            async with ui.backends.orchestrator(session.token) as orch:
                rows = await orch.list_workflows(**params)
        return {
            "rows": rows[:PAGE],
            "more": len(rows) > PAGE,
            "note": note,
            "names": await usernames(w.get("owner") for w in rows),
            "sees_all": sees_all,
            "filters": f,
            "states": STATES,
            "kinds": KINDS,
            "since_choices": list(SINCE),
            "page": PAGE,
        }

    @r.get("/workflows")
    async def workflows(request: Request) -> Response:
        session = await ui.require(request, "workflow:read")
        data = await listing(session, Filters.of(request))
        return ui.page(
            request, "workflows.html", session, title="Workflows", active="workflows", **data
        )

    @r.get("/workflows/rows")
    async def workflow_rows(request: Request) -> Response:
        session = await ui.require(request, "workflow:read")
        data = await listing(session, Filters.of(request))
        return ui.page(request, "_workflow_rows.html", session, **data)

    async def detail(session: UiSession, workflow_id: str, request: Request) -> dict[str, Any]:
        if not _ID.fullmatch(workflow_id):
            raise NotFound(f"workflow {workflow_id} not found")
        async with ui.backends.orchestrator(session.token) as orch:
            wf = await orch.get_workflow(workflow_id, tasks="brief")
        resource = Resource("Workflow", wf["id"], owner=wf.get("owner"))
        buttons = [
            name
            for name, (action, states) in ACTIONS.items()
            if wf["status"] in states and ui.may(session.identity, action, resource)
        ]
        tasks = wf.get("tasks", [])
        graph = layout(tasks)
        all_rows = request.query_params.get("tasks") == "all"
        return {
            "wf": wf,
            "buttons": buttons,
            "names": await usernames([wf.get("owner")]),
            "graph": graph,
            "svg": render_svg(graph, prefix=PREFIX, title=str(wf.get("name", ""))),
            "task_rows": tasks if all_rows else _first_rows(tasks),
            "all_rows": all_rows,
            "finished": wf["status"] in FINISHED,
            "may_logs": ui.may(session.identity, "task:logs", resource),
        }

    @r.get("/workflows/{workflow_id}")
    async def workflow(request: Request, workflow_id: str) -> Response:
        session = await ui.require(request, "workflow:read")
        data = await detail(session, workflow_id, request)
        done = request.query_params.get("done", "")
        return ui.page(
            request,
            "workflow.html",
            session,
            title=data["wf"]["name"],
            active="workflows",
            done=done if done in ACTIONS else "",
            error="",
            **data,
        )

    @r.get("/workflows/{workflow_id}/live")
    async def workflow_live(request: Request, workflow_id: str) -> Response:
        session = await ui.require(request, "workflow:read")
        data = await detail(session, workflow_id, request)
        return ui.page(request, "_workflow_live.html", session, **data)

    @r.post("/workflows/{workflow_id}/{button}")
    async def control(request: Request, workflow_id: str, button: str) -> Response:
        if button not in ACTIONS or not _ID.fullmatch(workflow_id):
            raise NotFound(f"there is no action {button!r}")
        session = await ui.require(request, ACTIONS[button][0])
        try:
            async with ui.backends.orchestrator(session.token) as orch:
                await orch.action(workflow_id, button)
        except ProvisioningError as exc:
            if isinstance(exc, NotFound):
                raise
            data = await detail(session, workflow_id, request)
            return ui.page(
                request,
                "workflow.html",
                session,
                status=exc.http_status,
                title=data["wf"]["name"],
                active="workflows",
                done="",
                error=exc.message,
                **data,
            )
        return RedirectResponse(f"/ui/workflows/{workflow_id}?done={button}", status_code=303)

    return r


def _first_rows(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows the tasks table shows by default: every task that failed or is running (what
    someone opening a big workflow looks for), then the others in order, ``TASK_ROWS`` in all."""
    if len(tasks) <= TASK_ROWS:
        return tasks
    urgent = min(TASK_ROWS, sum(1 for t in tasks if t.get("status") in _URGENT))
    others = TASK_ROWS - urgent
    rows: list[dict[str, Any]] = []  # in the workflow's order
    for t in tasks:
        if t.get("status") in _URGENT:
            if urgent:
                rows.append(t)
                urgent -= 1
        elif others:
            rows.append(t)
            others -= 1
    return rows
