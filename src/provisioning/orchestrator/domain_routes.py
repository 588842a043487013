"""The workflow endpoints that compile a workspace request into a DAG (DESIGN §5, §6), and the
servers' inventory. Each is guarded by its own action; ``check: true`` answers the plan and
submits nothing (also under ``orchestrator.require_signed_ops``, which refuses the rest)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import Response

from provisioning.core.auth import Guard, Identity
from provisioning.core.web import envelope
from provisioning.orchestrator.api import WorkflowSpec
from provisioning.orchestrator.engine import Engine
from provisioning.orchestrator.routes import SignedOpsGate
from provisioning.workspace.api import (
    BatchRequest,
    ClusterRequest,
    DomainRequest,
    ServersRequest,
    TaskservRequest,
    compile_request,
    list_servers,
)

__all__ = ["build_domain_router"]


def build_domain_router(engine: Engine, guard: Guard, signed_ops: SignedOpsGate) -> APIRouter:
    r = APIRouter(tags=["provisioning"])

    def need(action: str) -> Any:
        return Depends(guard.require(action))

    async def submit(request: Request, what: str, req: DomainRequest, who: Identity) -> Response:
        if not req.check:
            await signed_ops.check(request, who)
        body, plan = await asyncio.to_thread(compile_request, what, req)
        if req.check:
            return envelope({"check": True, "plan": plan})
        spec = WorkflowSpec.model_validate(body)
        wf_id, created = await engine.submit(spec, owner=who.subject)
        request.state.audit_object = ("Workflow", wf_id)
        doc = await engine.store.get_workflow(wf_id, with_tasks=True)
        return envelope(doc, status=201 if created else 200)

    @r.post(
        "/workflows/servers/create",
        status_code=201,
        summary="Create servers of an infra with their task services",
    )
    async def servers_create(
        request: Request,
        req: Annotated[ServersRequest, Body()],
        who: Identity = need("server:create"),
    ) -> Response:
        return await submit(request, "servers.create", req, who)

    @r.post("/workflows/servers/delete", status_code=201, summary="Delete servers of an infra")
    async def servers_delete(
        request: Request,
        req: Annotated[ServersRequest, Body()],
        who: Identity = need("server:delete"),
    ) -> Response:
        return await submit(request, "servers.delete", req, who)

    @r.post(
        "/workflows/taskserv/create",
        status_code=201,
        summary="Install (or remove) a task service on servers",
    )
    async def taskserv(
        request: Request,
        req: Annotated[TaskservRequest, Body()],
        who: Identity = need("taskserv:create"),
    ) -> Response:
        return await submit(request, "taskserv", req, who)

    @r.post("/workflows/cluster/create", status_code=201, summary="Form a cluster")
    async def cluster_create(
        request: Request,
        req: Annotated[ClusterRequest, Body()],
        who: Identity = need("cluster:create"),
    ) -> Response:
        return await submit(request, "cluster.create", req, who)

    @r.post("/workflows/cluster/delete", status_code=201, summary="Dissolve a cluster")
    async def cluster_delete(
        request: Request,
        req: Annotated[ClusterRequest, Body()],
        who: Identity = need("cluster:create"),
    ) -> Response:
        return await submit(request, "cluster.delete", req, who)

    @r.post("/workflows/batch", status_code=201, summary="Run a batch workflow of an infra")
    async def batch(
        request: Request,
        req: Annotated[BatchRequest, Body()],
        who: Identity = need("workflow:create"),
    ) -> Response:
        return await submit(request, "batch", req, who)

    @r.get("/servers", summary="The servers' inventory")
    async def servers(
        workspace: Annotated[str | None, Query(max_length=1024)] = None,
        infra: Annotated[str | None, Query(max_length=63)] = None,
        who: Identity = need("server:read"),
    ) -> Response:
        return envelope(await list_servers(engine.store.db, workspace=workspace, infra=infra))

    return r
