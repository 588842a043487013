"""The ops-keeper's REST routes (DESIGN §7). Wiring lives in ``app.py``."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from provisioning import __version__
from provisioning.core.auth import Guard, Identity
from provisioning.core.bus.link import bus_connected
from provisioning.core.errors import Forbidden
from provisioning.core.rbac import Resource
from provisioning.core.web import envelope
from provisioning.ops_keeper.api import ApproveIn, FreezeIn, OpRequestIn, OpState
from provisioning.ops_keeper.metrics import Metrics
from provisioning.ops_keeper.service import KeeperService

__all__ = ["build_router"]

T = TypeVar("T")
Id = Annotated[str, Path(min_length=1, max_length=64, description="Object id (UUID).")]
Limit = Annotated[int, Query(ge=1, le=1000, description="Page size, 1-1000.")]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="Rows to skip.")]


def build_router(svc: KeeperService, metrics: Metrics, guard: Guard, started: float) -> APIRouter:
    """All routes, bound to one keeper."""
    r = APIRouter()

    def need(action: str) -> Any:
        return Depends(guard.require(action))

    @r.get("/health", tags=["system"], summary="Liveness, NATS connection and policy state")
    async def health() -> Response:
        connected = bus_connected(svc.bus)
        policy = svc.policy_file
        return envelope(
            {
                "status": "ok",
                "service": "ops-keeper",
                "version": __version__,
                "uptime_s": round(time.monotonic() - started, 3),
                "nats": "connected" if connected else "not connected",
                "policy": {
                    "policies": len(policy.current.policies) if policy else 0,
                    "file_broken": bool(policy and policy.last_error),
                },
            }
        )

    @r.get("/metrics", tags=["system"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        await metrics.refresh()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @r.get(
        "/.well-known/jwks.json",
        tags=["keys"],
        summary="Public keys that verify operation tokens (current and still-valid old ones)",
    )
    async def jwks() -> Response:
        return Response(
            content=json.dumps(svc.jwks()),
            media_type="application/json",
            headers={"Cache-Control": "max-age=60"},
        )

    @r.post("/keys/rotate", tags=["keys"], summary="Rotate the operation signing key")
    async def rotate(who: Identity = need("keys:rotate")) -> Response:
        return envelope(await svc.rotate_keys())

    # Fixed paths before /ops/{op_id}, which would swallow them.

    @r.get("/ops/policy", tags=["policy"], summary="The policy file: loaded policies, last error")
    async def policy_status(who: Identity = need("ops:read")) -> Response:
        return envelope(svc.policy_status())

    @r.get("/ops/freezes", tags=["freezes"], summary="Change freezes, newest first")
    async def list_freezes(
        state: Literal["active", "ended", "all"] = "active",
        who: Identity = need("ops:read"),
    ) -> Response:
        return envelope(await svc.list_freezes(state))

    @r.post("/ops/freeze", status_code=201, tags=["freezes"], summary="Start a change freeze")
    async def freeze(
        request: Request,
        body: Annotated[FreezeIn, Body()],
        who: Identity = need("ops:freeze"),
    ) -> Response:
        doc = await svc.freeze(body, who)
        request.state.audit_object = ("Freeze", doc["id"])
        return envelope(doc, status=201)

    @r.delete("/ops/freeze/{freeze_id}", tags=["freezes"], summary="Lift a change freeze")
    async def unfreeze(
        request: Request, freeze_id: Id, who: Identity = need("ops:freeze")
    ) -> Response:
        request.state.audit_object = ("Freeze", freeze_id)
        return envelope(await svc.unfreeze(freeze_id, who))

    @r.post(
        "/ops/evaluate",
        tags=["ops"],
        summary="What the keeper would decide, and which policy decided; records nothing",
    )
    async def evaluate(
        body: Annotated[OpRequestIn, Body()], who: Identity = need("ops:request")
    ) -> Response:
        return envelope(await svc.evaluate(body, who))

    @r.post("/ops", status_code=201, tags=["ops"], summary="Request an operation")
    async def request_op(
        request: Request,
        body: Annotated[OpRequestIn, Body()],
        who: Identity = need("ops:request"),
    ) -> Response:
        doc = await svc.request(body, who)
        request.state.audit_object = ("Operation", doc["id"])
        return envelope(doc, status=201)

    @r.get("/ops", tags=["ops"], summary="Operations, newest first")
    async def list_ops(
        state: OpState | None = None,
        limit: Limit = 50,
        offset: Offset = 0,
        who: Identity = need("ops:read"),
    ) -> Response:
        # Developers see only the operations they requested.
        requester = None if guard.sees_all(who, "ops:read") else who.subject
        rows = await svc.store.list_ops(
            state=state.value if state else None, requester=requester, limit=limit, offset=offset
        )
        return envelope(rows)

    async def operation(request: Request, who: Identity, op_id: str, action: str) -> None:
        op = await svc.store.get_op(op_id)
        resource = Resource("Operation", op_id, owner=op["requester"])
        await guard.check_object(request, who, action, resource)

    @r.get("/ops/{op_id}", tags=["ops"], summary="One operation with its decision")
    async def get_op(request: Request, op_id: Id, who: Identity = need("ops:read")) -> Response:
        await operation(request, who, op_id, "ops:read")
        return envelope(await svc.store.get_op(op_id))

    async def audited(
        request: Request, who: Identity, op_id: str, call: Callable[[], Awaitable[T]]
    ) -> T:
        """Run an approval; a refusal by the keeper's own rules is audited like a denial."""
        request.state.audit_object = ("Operation", op_id)
        try:
            return await call()
        except Forbidden as exc:
            if guard.audit is not None:
                details = {"object": op_id, "object_type": "Operation", **exc.details}
                await guard.audit(request, who, "ops:approve", "denied", details)
            raise

    @r.post("/ops/{op_id}/approve", tags=["ops"], summary="Approve a pending operation")
    async def approve(
        request: Request,
        op_id: Id,
        body: Annotated[ApproveIn, Body()],
        who: Identity = need("ops:approve"),
    ) -> Response:
        await operation(request, who, op_id, "ops:approve")
        doc = await audited(request, who, op_id, lambda: svc.approve(op_id, who, body.reason))
        return envelope(doc)

    @r.post("/ops/{op_id}/reject", tags=["ops"], summary="Reject a pending operation")
    async def reject(
        request: Request,
        op_id: Id,
        body: Annotated[ApproveIn, Body()],
        who: Identity = need("ops:approve"),
    ) -> Response:
        await operation(request, who, op_id, "ops:approve")
        doc = await audited(request, who, op_id, lambda: svc.reject(op_id, who, body.reason))
        return envelope(doc)

    return r
