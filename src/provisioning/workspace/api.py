"""What other services use of the workspace domain: the wire models of the workflow endpoints
(``POST /workflows/servers/create`` …), :func:`compile_request` that turns one into a workflow,
and the inventory reader."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from provisioning.core.errors import NickelError, NotFound, ProvisioningError, ValidationError
from provisioning.core.store import Database

__all__ = [
    "DOMAIN_OP_TYPES",
    "BatchRequest",
    "ClusterRequest",
    "DomainRequest",
    "ServersRequest",
    "TaskservRequest",
    "check_workspace",
    "compile_request",
    "list_servers",
    "op_target",
]

#: The operation types of the ops pipeline that are workspace requests (``op_target``).
DOMAIN_OP_TYPES = frozenset(
    {
        "server.create",
        "server.delete",
        "taskserv.create",
        "taskserv.remove",
        "cluster.create",
        "cluster.delete",
        "batch.submit",
    }
)

_Name = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")


class DomainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workspace: str = Field(
        min_length=1, max_length=1024, description="Absolute path of the workspace folder."
    )
    infra: str = _Name
    check: bool = Field(False, description="Answer the plan (the DAG) and change nothing.")

    @field_validator("workspace")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not Path(v).is_absolute():
            raise ValueError("the workspace must be an absolute path")
        return v


class ServersRequest(DomainRequest):
    servers: list[str] | None = Field(
        None, max_length=1000, description="Hostnames; default: every server of the infra."
    )


class TaskservRequest(DomainRequest):
    taskserv: str = _Name
    servers: list[str] | None = Field(None, max_length=1000)
    operation: Literal["install", "remove"] = "install"


class ClusterRequest(DomainRequest):
    cluster: str = _Name


class BatchRequest(DomainRequest):
    workflow: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description="Name of infra/<infra>/workflows/<name>.ncl.",
    )


def compile_request(what: str, req: DomainRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the workflow to submit, the plan ``check`` shows) for ``what`` — ``servers.create``,
    ``servers.delete``, ``taskserv``, ``cluster.create``, ``cluster.delete`` or ``batch``.
    Blocking (evaluates Nickel): call it in a thread.

    Raises:
        NotFound: no such workspace, infra, server, cluster, extension or batch file.
        NickelError: a file of the workspace breaks its contract.
        ValidationError: the request cannot be compiled (e.g. a dependency cycle).
    """
    from provisioning.workspace.model import Workspace
    from provisioning.workspace.plan import Planner, describe, split

    planner = Planner(Workspace.open(Path(req.workspace)), req.infra)
    if what == "servers.create" and isinstance(req, ServersRequest):
        spec = planner.servers_create(req.servers)
    elif what == "servers.delete" and isinstance(req, ServersRequest):
        spec = planner.servers_delete(req.servers)
    elif what == "taskserv" and isinstance(req, TaskservRequest):
        spec = planner.taskserv_create(req.taskserv, req.servers, req.operation)
    elif what == "cluster.create" and isinstance(req, ClusterRequest):
        spec = planner.cluster_create(req.cluster)
    elif what == "cluster.delete" and isinstance(req, ClusterRequest):
        spec = planner.cluster_delete(req.cluster)
    elif what == "batch" and isinstance(req, BatchRequest):
        spec = planner.batch(req.workflow)
    else:
        raise ValidationError(f"cannot compile {what} from {type(req).__name__}")
    plan = describe(spec)
    body, _ = split(spec)
    return body, plan


async def list_servers(
    db: Database, *, workspace: str | None = None, infra: str | None = None
) -> list[dict[str, Any]]:
    """The inventory (migrated on first use)."""
    from provisioning.workspace.inventory import Inventory

    inv = Inventory(db)
    await inv.migrate()
    return await inv.list(workspace=workspace, infra=infra)


def op_target(op_type: str, params: Mapping[str, Any]) -> str:
    """The target of a domain operation, derived from its params: what the ops-keeper's
    policies glob on (docs/reference/ops.md). The infra first, so ``prod/*`` covers everything
    in infra prod; then the one server, or ``@all`` for the whole infra or several servers (no
    hostname holds ``@``); a task service after its servers; ``@cluster/<name>``,
    ``@batch/<workflow>``. The keeper refuses a request whose target is not this, and the
    orchestrator checks it again before it runs the op.

    Raises:
        ValidationError: ``params`` lack what the target is made of.
    """
    try:
        infra = params["infra"]
        servers = params.get("servers") or []
        scope = servers[0] if isinstance(servers, list) and len(servers) == 1 else "@all"
        if op_type in ("server.create", "server.delete"):
            return f"{infra}/{scope}"
        if op_type in ("taskserv.create", "taskserv.remove"):
            return f"{infra}/{scope}/{params['taskserv']}"
        if op_type in ("cluster.create", "cluster.delete"):
            return f"{infra}/@cluster/{params['cluster']}"
        if op_type == "batch.submit":
            return f"{infra}/@batch/{params['workflow']}"
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValidationError(
            f"params of {op_type} lack {exc} (needed to name the target)", field="params"
        ) from None
    raise ValidationError(f"op_type {op_type!r} is not a domain operation", field="op_type")


def check_workspace(path: Path) -> list[ProvisioningError | str]:
    """What ``prvng workspace validate`` finds in the workspace at ``path``, infra by infra so
    that one broken infra does not hide the others: each problem as the error raised (a
    :class:`NickelError` carries Nickel's diagnostic and its ``source`` file) or as the message
    of a reference problem (``infra/x/settings.ncl: server a: no provider 'p'``). Blocking
    (evaluates Nickel): call it in a thread."""
    from provisioning.workspace.model import Workspace

    try:
        ws = Workspace.open(path)
    except (NickelError, NotFound, ValidationError) as exc:
        return [exc]
    out: list[ProvisioningError | str] = []
    for infra in ws.infra_names():
        try:
            out += ws.validate(infra)
        except (NickelError, NotFound, ValidationError) as exc:
            out.append(exc)
    return out
