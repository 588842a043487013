"""``POST /ops/dispatch``: the ops-controller hands over a signed operation.

The credential is the operation token itself (signed by the ops-keeper; verified here again
against the keeper's key set, with the same rules as the controller: ``core.ops_token``). The
op's ``jti`` becomes the workflow's idempotency key, so a re-dispatch after a crash answers the
workflow made the first time (200) instead of making a second (201). ``GET
/workflows?idempotency_key=op:<jti>`` finds it, for the controller's reconciliation.

Operation types and the workflow each becomes (params are the request's fields):

=====================  =====================================================
``workflow.submit``    the params are a workflow (``POST /workflows``)
``server.create``      ``/workflows/servers/create`` {workspace, infra, servers?}
``server.delete``      ``/workflows/servers/delete``
``taskserv.create``    ``/workflows/taskserv/create`` {…, taskserv, operation?}
``cluster.create``     ``/workflows/cluster/create`` {…, cluster}
``cluster.delete``     ``/workflows/cluster/delete``
``batch.submit``       ``/workflows/batch`` {…, workflow}
=====================  =====================================================

For the domain types the op's ``target`` must be the one its params name
(``workspace.api.op_target``): the keeper decided on the target, so an op whose params say
something else (``dev/x`` signed, ``prod`` in the params) is refused here too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError as PydanticValidationError

from provisioning.core.auth import Identity
from provisioning.core.errors import Unauthorized, ValidationError
from provisioning.core.ops_token import OpRejected, verify_op
from provisioning.core.signing import TokenVerifier
from provisioning.core.web import envelope
from provisioning.orchestrator.api import WorkflowSpec
from provisioning.orchestrator.engine import Engine
from provisioning.workspace.api import (
    BatchRequest,
    ClusterRequest,
    DomainRequest,
    ServersRequest,
    TaskservRequest,
    compile_request,
    op_target,
)

__all__ = ["build_ops_router"]

_DOMAIN: dict[str, tuple[str, type[DomainRequest]]] = {
    "server.create": ("servers.create", ServersRequest),
    "server.delete": ("servers.delete", ServersRequest),
    "taskserv.create": ("taskserv", TaskservRequest),
    "taskserv.remove": ("taskserv", TaskservRequest),
    "cluster.create": ("cluster.create", ClusterRequest),
    "cluster.delete": ("cluster.delete", ClusterRequest),
    "batch.submit": ("batch", BatchRequest),
}


def _workflow_for(op_type: str, params: dict[str, Any]) -> dict[str, Any]:
    """Raises: ValidationError (unknown op type, params that do not fit)."""
    try:
        if op_type == "workflow.submit":
            return WorkflowSpec.model_validate(params).model_dump(mode="json", exclude_none=True)
        if op_type in _DOMAIN:
            what, model = _DOMAIN[op_type]
            fixed: dict[str, Any] = {"check": False}
            if op_type.startswith("taskserv."):
                given = params.get("operation")
                wanted = "remove" if op_type == "taskserv.remove" else "install"
                if given not in (None, wanted):
                    raise ValidationError(
                        f"params.operation {given!r} does not match op_type {op_type} "
                        f"(use taskserv.{'remove' if given == 'remove' else 'create'})",
                        field="params.operation",
                    )
                fixed["operation"] = wanted
            body, _plan = compile_request(what, model.model_validate({**params, **fixed}))
            return body
    except PydanticValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()
        )
        raise ValidationError(f"params of {op_type}: {problems}", field="params") from None
    known = ", ".join(["workflow.submit", *sorted(_DOMAIN)])
    raise ValidationError(f"op_type {op_type!r} has no workflow here; known: {known}")


def build_ops_router(engine: Engine, verifier: Callable[[], TokenVerifier]) -> APIRouter:
    r = APIRouter(tags=["ops"])

    @r.post(
        "/ops/dispatch",
        status_code=201,
        summary="Run a signed operation (ops-controller); the op token is the credential",
    )
    async def dispatch(request: Request) -> Response:
        data = await request.body()
        try:
            op = await verify_op(verifier(), None, data)
        except OpRejected as exc:
            raise Unauthorized(f"operation refused: {exc.message}", reason=exc.reason) from None
        request.state.identity = Identity(op.requester, op.requester, (), "user")
        request.state.action = "ops:dispatch"
        if op.op_type in _DOMAIN and op.target != (named := op_target(op.op_type, op.params)):
            raise ValidationError(
                f"the op's target {op.target!r} is not the one its params name ({named!r})",
                field="target",
            )
        spec = await asyncio.to_thread(_workflow_for, op.op_type, op.params)
        spec["idempotency_key"] = f"op:{op.jti}"
        spec.setdefault("labels", {}).update(op_jti=op.jti, op_type=op.op_type)
        wf_id, created = await engine.submit(WorkflowSpec.model_validate(spec), owner=op.requester)
        request.state.audit_object = ("Workflow", wf_id)
        doc = await engine.store.get_workflow(wf_id, with_tasks=False)
        return envelope(doc, status=201 if created else 200)

    return r
