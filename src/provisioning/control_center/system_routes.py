"""The control center's monitoring routes: ``GET /system/status`` and ``GET /system/events``
(action ``system:read``; the logic is in ``monitoring.py``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from provisioning.control_center.monitoring import StreamOptions, SystemMonitor
from provisioning.core.auth import Guard, Identity
from provisioning.core.errors import Unreachable
from provisioning.core.rbac import Resource
from provisioning.core.sse import RingEvent
from provisioning.core.web import envelope, error_response

__all__ = ["build_system_router"]

_FORWARDED = ("authorization", "x-api-key")


def credentials_of(request: Request) -> dict[str, str]:
    """The caller's own credentials, forwarded to the orchestrator for what only they may see."""
    return {name: request.headers[name] for name in _FORWARDED if name in request.headers}


def build_system_router(monitor: SystemMonitor, guard: Guard) -> APIRouter:
    r = APIRouter()
    need = Depends(guard.require("system:read"))

    @r.get(
        "/system/status",
        tags=["system"],
        summary="Health of every service, NATS, the stores, the host and the orchestrator",
    )
    async def system_status(request: Request, who: Identity = need) -> Response:
        return envelope(await monitor.status(credentials_of(request)))

    @r.get(
        "/system/events",
        tags=["system"],
        summary="Server-Sent Events: `status` every `interval` s, `service` and `failure` "
        "as they happen; resumable with Last-Event-ID",
        responses={
            200: {"content": {"text/event-stream": {}}},
            503: {"description": "Too many live streams are open; retry after Retry-After."},
        },
    )
    async def system_events(
        request: Request,
        who: Identity = need,
        interval: Annotated[
            float, Query(ge=1, le=300, description="Seconds between `status` events.")
        ] = 5,
        last_event_id: Annotated[
            str | None,
            Header(max_length=64, description="Resume after this event (sent by EventSource)."),
        ] = None,
    ) -> Response:
        # Only a client that asks for an event stream gets a live one; any other (curl, a
        # generic HTTP tool) gets what it missed and one status, then the answer ends.
        follow = "text/event-stream" in request.headers.get("accept", "")
        if follow and monitor.ring.subscribers >= monitor.ring.max_subscribers:
            resp = error_response(
                Unreachable(
                    f"too many live monitoring streams are open ({monitor.ring.max_subscribers})"
                    "; retry later, or poll GET /system/status",
                )
            )
            resp.headers["Retry-After"] = "5"
            return resp

        def may_see(ev: RingEvent) -> bool:
            if ev.event != "failure":
                return True
            scope = ev.scope or {}
            workflow = Resource("Workflow", str(scope.get("workflow_id")), owner=scope.get("owner"))
            return guard.allows(who, "workflow:read", workflow)

        async def still_allowed() -> None:
            await guard.check(request, "system:read")

        opts = StreamOptions(
            credentials=credentials_of(request),
            interval_s=interval,
            last_event_id=last_event_id,
            follow=follow,
            may_see=may_see,
            still_allowed=still_allowed,
            disconnected=request.is_disconnected,
        )
        headers: dict[str, Any] = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            monitor.events(opts), media_type="text/event-stream", headers=headers
        )

    return r
