"""`prvng server|taskserv|cluster|batch …`: provision what a workspace's infra describes.

Each command compiles the request on the orchestrator into a workflow and submits it (`--check`
shows the plan and changes nothing; `--wait` follows it to its end). With `--via-ops` the same
request goes to the ops-keeper as an operation instead (``workspace.api.op_target`` names its
target), and the ops-controller submits it once a policy or an approver allowed it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from provisioning.cli.commands.workflow import _wait, decided_by, report_workflow, via
from provisioning.cli.output import OutputFormat, console, render
from provisioning.cli.state import run, state_of

server_app = typer.Typer(help="Create, delete and list servers.", no_args_is_help=True)
taskserv_app = typer.Typer(help="Install, remove and list task services.", no_args_is_help=True)
cluster_app = typer.Typer(help="Form and dissolve clusters.", no_args_is_help=True)
batch_app = typer.Typer(help="Run batch workflows of an infra.", no_args_is_help=True)

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Workspace folder; default: the one around the current directory.",
        envvar="PRVNG_WORKSPACE",
    ),
]
InfraOpt = Annotated[str, typer.Option("--infra", "-i", help="Infra name.")]
CheckOpt = Annotated[
    bool, typer.Option("--check", help="Show the plan (tasks and what they do); change nothing.")
]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="Follow the workflow; exit 0 only if it Completed.")
]
ServersOpt = Annotated[
    list[str] | None,
    typer.Option("--server", "-s", help="Only this server (repeatable); default: all."),
]


def _via_ops(op_type: str, target: str) -> Any:
    """The ``--via-ops`` option of a command whose operation is ``op_type`` on ``target``."""
    return typer.Option(
        "--via-ops",
        envvar="PRVNG_VIA_OPS",
        help=f"Ask the ops-keeper for a `{op_type}` operation on target {target} instead of "
        "submitting; prints the operation id, the decision and the policy that made it. With "
        "--wait, follows the workflow the ops-controller makes of it; with --check, adds what "
        "the keeper would decide. Required when the orchestrator has "
        "orchestrator.require_signed_ops.",
    )


_SERVERS = "<infra>/<server> (one --server) or <infra>/@all (all, or several)"
_TASKSERV = "<infra>/<server>/<taskserv> (one --server) or <infra>/@all/<taskserv>"

# The ops-keeper's operation type of each orchestrator route (orchestrator/ops_routes.py).
_OP_TYPES = {
    "/workflows/servers/create": "server.create",
    "/workflows/servers/delete": "server.delete",
    "/workflows/taskserv/create": "taskserv.create",
    "/workflows/cluster/create": "cluster.create",
    "/workflows/cluster/delete": "cluster.delete",
    "/workflows/batch": "batch.submit",
}

SERVER_COLUMNS = [
    ("hostname", "HOSTNAME"),
    ("infra", "INFRA"),
    ("provider", "PROVIDER"),
    ("address", "ADDRESS"),
    ("status", "STATUS"),
    ("taskservs", "TASK SERVICES"),
    ("workspace_name", "WORKSPACE"),
]
PLAN_COLUMNS = [("name", "TASK"), ("does", "DOES"), ("depends_on", "AFTER")]


def _workspace(path: Path | None) -> str:
    from provisioning.workspace.model import find_workspace

    return str(path.resolve() if path else find_workspace())


def _provision(
    ctx: typer.Context,
    path: str,
    body: dict[str, Any],
    *,
    check: bool,
    wait: bool,
    via_ops: bool = False,
) -> None:
    """Submit ``body`` to the orchestrator route ``path``, or with ``via_ops`` ask the keeper
    for the matching operation with ``body`` as its params (what the route would get)."""
    st = state_of(ctx)
    from provisioning.workspace.api import op_target  # heavy imports: only when used

    op_type = _OP_TYPES[path]
    if op_type == "taskserv.create" and body.get("operation") == "remove":
        op_type = "taskserv.remove"
    if via_ops and not check:
        via(st, op_type, op_target(op_type, body), body, wait=wait)
        return

    async def go() -> dict[str, Any]:
        async with st.client() as c:
            answer = await c.provision(path, {**body, "check": check})
            if wait and not check:
                answer = await _wait(c, answer["id"], st.output)
        if via_ops:
            async with st.keeper_client() as k:
                answer["keeper"] = await k.evaluate(op_type, op_target(op_type, body), params=body)
        return answer

    answer = run(go())
    if not check:
        report_workflow(answer, st.output, wait=wait)
        return
    plan = answer["plan"]
    if st.output is not OutputFormat.TABLE:
        render({"plan": plan, "keeper": answer["keeper"]} if via_ops else plan, st.output)
        return
    console.print(f"plan of {plan['name']} ({len(plan['tasks'])} tasks, nothing changed):")
    rows = [
        {
            **t,
            "depends_on": ", ".join(
                d if isinstance(d, str) else d["task"] for d in t["depends_on"]
            ),
        }
        for t in plan["tasks"]
    ]
    render(rows, st.output, columns=PLAN_COLUMNS)
    if via_ops:
        d = answer["keeper"]
        console.print(
            f"the ops-keeper would decide {d['decision']} by {decided_by(d)} ({d['state']}): "
            f"{d['reason']}",
            markup=False,
        )


@server_app.command("create")
def server_create(
    ctx: typer.Context,
    infra: InfraOpt,
    workspace: WorkspaceOpt = None,
    server: ServersOpt = None,
    check: CheckOpt = False,
    wait: WaitOpt = False,
    via_ops: Annotated[bool, _via_ops("server.create", _SERVERS)] = False,
) -> None:
    """Create the infra's servers and install their task services (dependencies first);
    a failure rolls back what was made."""
    body = {"workspace": _workspace(workspace), "infra": infra, "servers": server or None}
    _provision(ctx, "/workflows/servers/create", body, check=check, wait=wait, via_ops=via_ops)


@server_app.command("delete")
def server_delete(
    ctx: typer.Context,
    infra: InfraOpt,
    workspace: WorkspaceOpt = None,
    server: ServersOpt = None,
    check: CheckOpt = False,
    wait: WaitOpt = False,
    via_ops: Annotated[bool, _via_ops("server.delete", _SERVERS)] = False,
) -> None:
    """Delete the infra's servers and everything running on them."""
    body = {"workspace": _workspace(workspace), "infra": infra, "servers": server or None}
    _provision(ctx, "/workflows/servers/delete", body, check=check, wait=wait, via_ops=via_ops)


@server_app.command("list")
def server_list(
    ctx: typer.Context,
    infra: Annotated[str | None, typer.Option("--infra", "-i", help="Only this infra.")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """The servers' inventory: provider id, address, status and installed task services."""
    st = state_of(ctx)
    ws = str(workspace.resolve()) if workspace else None

    async def go() -> list[dict[str, Any]]:
        async with st.client() as c:
            return await c.list_servers(workspace=ws, infra=infra)

    rows = run(go())
    if st.output is OutputFormat.TABLE:
        rows = [{**r, "taskservs": ", ".join(r["taskservs"])} for r in rows]
    render(rows, st.output, columns=SERVER_COLUMNS)


def _taskserv(
    ctx: typer.Context,
    name: str,
    operation: str,
    infra: str,
    workspace: Path | None,
    server: list[str] | None,
    check: bool,
    wait: bool,
    via_ops: bool = False,
) -> None:
    body = {
        "workspace": _workspace(workspace),
        "infra": infra,
        "taskserv": name,
        "servers": server or None,
        "operation": operation,
    }
    _provision(ctx, "/workflows/taskserv/create", body, check=check, wait=wait, via_ops=via_ops)


@taskserv_app.command("create")
def taskserv_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task service, e.g. redis.")],
    infra: InfraOpt,
    workspace: WorkspaceOpt = None,
    server: ServersOpt = None,
    check: CheckOpt = False,
    wait: WaitOpt = False,
    via_ops: Annotated[bool, _via_ops("taskserv.create", _TASKSERV)] = False,
) -> None:
    """Install a task service (and what it requires) on the servers that list it, or on
    --server."""
    _taskserv(ctx, name, "install", infra, workspace, server, check, wait, via_ops)


@taskserv_app.command("remove")
def taskserv_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task service, e.g. redis.")],
    infra: InfraOpt,
    workspace: WorkspaceOpt = None,
    server: ServersOpt = None,
    check: CheckOpt = False,
    wait: WaitOpt = False,
    via_ops: Annotated[bool, _via_ops("taskserv.remove", _TASKSERV)] = False,
) -> None:
    """Remove a task service from the servers that list it, or from --server."""
    _taskserv(ctx, name, "remove", infra, workspace, server, check, wait, via_ops)


@taskserv_app.command("list")
def taskserv_list(
    ctx: typer.Context,
    infra: Annotated[str | None, typer.Option("--infra", "-i", help="Only this infra.")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Installed task services per server, from the inventory."""
    st = state_of(ctx)
    ws = str(workspace.resolve()) if workspace else None

    async def go() -> list[dict[str, Any]]:
        async with st.client() as c:
            return await c.list_servers(workspace=ws, infra=infra)

    rows = [
        {"taskserv": t, "hostname": r["hostname"], "infra": r["infra"], "address": r["address"]}
        for r in run(go())
        for t in r["taskservs"]
    ]
    render(
        rows,
        st.output,
        columns=[
            ("taskserv", "TASK SERVICE"),
            ("hostname", "SERVER"),
            ("infra", "INFRA"),
            ("address", "ADDRESS"),
        ],
    )


@cluster_app.command("create")
def cluster_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Cluster name from the infra.")],
    infra: InfraOpt,
    workspace: WorkspaceOpt = None,
    check: CheckOpt = False,
    wait: WaitOpt = False,
    via_ops: Annotated[bool, _via_ops("cluster.create", "<infra>/@cluster/<name>")] = False,
) -> None:
    """Create the cluster's servers and what it needs on them, then form the cluster."""
    body = {"workspace": _workspace(workspace), "infra": infra, "cluster": name}
    _provision(ctx, "/workflows/cluster/create", body, check=check, wait=wait, via_ops=via_ops)


@cluster_app.command("delete")
def cluster_delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Cluster name from the infra.")],
    infra: InfraOpt,
    workspace: WorkspaceOpt = None,
    check: CheckOpt = False,
    wait: WaitOpt = False,
    via_ops: Annotated[bool, _via_ops("cluster.delete", "<infra>/@cluster/<name>")] = False,
) -> None:
    """Dissolve the cluster (its servers stay; `prvng server delete` removes them)."""
    body = {"workspace": _workspace(workspace), "infra": infra, "cluster": name}
    _provision(ctx, "/workflows/cluster/delete", body, check=check, wait=wait, via_ops=via_ops)


@batch_app.command("submit")
def batch_submit(
    ctx: typer.Context,
    file: Annotated[
        str, typer.Argument(help="infra/<infra>/workflows/<NAME>.ncl: a path or just NAME.")
    ],
    infra: Annotated[
        str | None, typer.Option("--infra", "-i", help="Infra; default: from the path.")
    ] = None,
    workspace: WorkspaceOpt = None,
    check: CheckOpt = False,
    wait: WaitOpt = False,
    via_ops: Annotated[bool, _via_ops("batch.submit", "<infra>/@batch/<workflow>")] = False,
) -> None:
    """Run a batch workflow: its operations with their depends_on, parallel_limit and
    on_failure."""
    path = Path(file)
    name = path.stem if path.suffix else file
    if infra is None:
        if path.suffix and path.parent.name == "workflows":
            infra = path.resolve().parent.parent.name
        else:
            raise typer.BadParameter("name the infra with --infra", param_hint="--infra")
    ws = _workspace(
        workspace if workspace else (path.resolve().parents[3] if path.suffix else None)
    )
    body = {"workspace": ws, "infra": infra, "workflow": name}
    _provision(ctx, "/workflows/batch", body, check=check, wait=wait, via_ops=via_ops)
