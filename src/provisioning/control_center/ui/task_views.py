"""Task pages: one task (its attempts, durations, outputs), its log followed live, searched and
downloaded, and a search across the logs of a whole workflow.

Every page checks its action with Cedar here (``task:read``, ``task:logs``) and then asks the
orchestrator with the user's own access token, which checks the task's workflow again (another
user's task is "not found"). The live log is the orchestrator's SSE stream re-sent through the
control center: bounded in time (the browser reconnects where it stopped, with
``Last-Event-ID``), with keep-alives, ended when the task ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from provisioning.control_center.ui.sessions import UiSession
from provisioning.core.errors import NotFound, ProvisioningError
from provisioning.core.rbac import Resource
from provisioning.core.sse import comment, format_event

if TYPE_CHECKING:
    from provisioning.control_center.ui.app import WebUI

__all__ = ["TERMINAL", "build_task_router"]

_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_POSITION = re.compile(r"\d{1,7}:\d{1,12}")
TERMINAL = ("Completed", "Failed", "Cancelled", "Skipped", "RolledBack")
STREAM_S = 600.0  # one proxied stream at most this long; the browser then resumes
KEEPALIVE_S = 15.0
RELAY_QUEUE = 10_000  # events read ahead from the orchestrator's stream at most
RELAY_BATCH = 2_000  # events sent to the browser in one write at most
MAX_LINES = 5000  # kept in the page (static/logs.js)
SEARCH_TASKS = 200  # a workflow search looks in at most this many tasks…
SEARCH_HITS = 500  # …and shows at most this many lines…
SEARCH_PER_TASK = 50  # …at most this many of one task
SEARCH_PARALLEL = 8


def _check_id(value: str, what: str) -> None:
    if not _ID.fullmatch(value):
        raise NotFound(f"{what} {value[:64]} not found")


def build_task_router(ui: WebUI) -> APIRouter:
    r = APIRouter()

    def may_logs(session: UiSession, task: dict[str, Any], owner: str | None) -> bool:
        resource = Resource("Workflow", str(task.get("workflow_id")), owner=owner)
        return ui.may(session.identity, "task:logs", resource)

    async def task_data(session: UiSession, task_id: str) -> dict[str, Any]:
        _check_id(task_id, "task")
        async with ui.backends.orchestrator(session.token) as orch:
            task = await orch.get_task(task_id)
            wf = await orch.get_workflow(str(task["workflow_id"]), tasks="none")
        return {
            "task": task,
            "wf": wf,
            "logs_allowed": may_logs(session, task, wf.get("owner")),
            "finished": task["status"] in TERMINAL,
        }

    @r.get("/tasks/{task_id}")
    async def task_page(request: Request, task_id: str) -> Response:
        session = await ui.require(request, "task:read")
        data = await task_data(session, task_id)
        if request.headers.get("hx-request"):
            return ui.page(request, "tasks/_task.html", session, **data)
        return ui.page(
            request,
            "tasks/task.html",
            session,
            title=data["task"]["name"],
            active="workflows",
            **data,
        )

    @r.get("/tasks/{task_id}/logs")
    async def logs_page(request: Request, task_id: str) -> Response:
        session = await ui.require(request, "task:logs")
        data = await task_data(session, task_id)
        return ui.page(
            request,
            "tasks/logs.html",
            session,
            title=f"Logs of {data['task']['name']}",
            active="workflows",
            max_lines=MAX_LINES,
            **data,
        )

    @r.get("/tasks/{task_id}/logs/stream")
    async def logs_stream(request: Request, task_id: str) -> Response:
        """The orchestrator's log SSE, re-sent: ``log`` events (id ``<attempt>:<n>``),
        ``end`` with the task's final status, ``failure`` with a message."""
        session = await ui.require(request, "task:logs")
        _check_id(task_id, "task")
        last = request.headers.get("last-event-id") or request.query_params.get("after") or ""
        if last and not _POSITION.fullmatch(last):
            last = ""
        async with ui.backends.orchestrator(session.token) as orch:
            # Checks this user's access to this task's log (and that it exists) up front, so
            # a refusal is an error page rather than a broken stream. Reads no line.
            await orch.task_logs(task_id, attempt=1000000)
        token = session.token

        async def stream() -> AsyncIterator[str]:
            # A reader task takes the orchestrator's events into a bounded queue; each write
            # to the browser carries every event that is waiting (one chunk per batch, not one
            # per line, and no task and timer per line), so a fast log does not fall behind.
            yield "retry: 2000\n\n"
            started = time.monotonic()
            queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=RELAY_QUEUE)

            async def read() -> None:
                async with ui.backends.orchestrator(token) as orch:
                    events = orch.follow_logs(task_id, last_event_id=last or None)
                    try:
                        async for item in events:
                            await queue.put(item)
                        await queue.put(None)
                    except Exception as exc:  # handed to the stream, which ends with it
                        await queue.put(exc)
                    finally:
                        with contextlib.suppress(BaseException):
                            await events.aclose()  # type: ignore[attr-defined]

            reader = asyncio.create_task(read())
            try:
                while time.monotonic() - started < STREAM_S:
                    try:
                        first = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        yield comment("keepalive")
                        continue
                    batch = [first]
                    while len(batch) < RELAY_BATCH and not queue.empty():
                        batch.append(queue.get_nowait())
                    out: list[str] = []
                    for item in batch:
                        if item is None:
                            out.append(format_event({"status": "?"}, event="end"))
                            yield "".join(out)
                            return
                        if isinstance(item, ProvisioningError):
                            out.append(format_event({"message": item.message}, event="failure"))
                            yield "".join(out)
                            return
                        if isinstance(item, BaseException):
                            if out:
                                yield "".join(out)
                            raise item
                        event, eid, data = item
                        out.append(format_event(data, event=event, id=eid or None))
                        if event == "end":
                            yield "".join(out)
                            return
                    yield "".join(out)
            finally:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @r.get("/tasks/{task_id}/logs/download")
    async def logs_download(request: Request, task_id: str) -> Response:
        session = await ui.require(request, "task:logs")
        _check_id(task_id, "task")
        async with ui.backends.orchestrator(session.token) as orch:
            body = await orch.task_log_text(task_id)
        return Response(
            body,
            media_type="text/plain; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{task_id}.log"'},
        )

    @r.get("/workflows/{workflow_id}/logs/search")
    async def search(request: Request, workflow_id: str) -> Response:
        """Lines containing ``q`` in the logs of the workflow's tasks (bounded)."""
        session = await ui.require(request, "task:logs")
        _check_id(workflow_id, "workflow")
        q = request.query_params.get("q", "").strip()[:200]
        hits: list[dict[str, Any]] = []
        note = ""
        async with ui.backends.orchestrator(session.token) as orch:
            wf = await orch.get_workflow(workflow_id, tasks="brief")
            tasks = [t for t in wf.get("tasks", []) if t.get("attempt_count")]
            if len(tasks) > SEARCH_TASKS:
                note = f"Searched the first {SEARCH_TASKS} of {len(tasks)} tasks that ran."
                tasks = tasks[:SEARCH_TASKS]
            if q:
                gate = asyncio.Semaphore(SEARCH_PARALLEL)

                async def one(task: dict[str, Any]) -> list[dict[str, Any]]:
                    async with gate:
                        try:
                            lines = await orch.task_logs(str(task["id"]), q=q)
                        except ProvisioningError:
                            return []
                    return [{**ln, "task": task} for ln in lines[:SEARCH_PER_TASK]]

                for found in await asyncio.gather(*(one(t) for t in tasks)):
                    hits.extend(found)
                if len(hits) > SEARCH_HITS:
                    note = (note + " " if note else "") + f"Showing the first {SEARCH_HITS} lines."
                    hits = hits[:SEARCH_HITS]
        return ui.page(
            request,
            "tasks/_search.html",
            session,
            wf=wf,
            q=q,
            hits=hits,
            note=note,
            per_task=SEARCH_PER_TASK,
        )

    return r
