"""`prvng workspace|component|extension …`: workspaces in Nickel and the extensions they use."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from provisioning.cli.output import console, render
from provisioning.cli.state import run, state_of
from provisioning.core.errors import ValidationError

workspace_app = typer.Typer(help="Create and validate workspaces.", no_args_is_help=True)
component_app = typer.Typer(
    help="Providers, task services and clusters visible from a workspace.", no_args_is_help=True
)
extension_app = typer.Typer(help="Run extension operations by hand.", no_args_is_help=True)

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Workspace folder; default: the one around the current directory.",
        envvar="PRVNG_WORKSPACE",
    ),
]
InfraOpt = Annotated[str | None, typer.Option("--infra", "-i", help="Infra name.")]

COMPONENT_COLUMNS = [
    ("kind", "KIND"),
    ("name", "NAME"),
    ("version", "VERSION"),
    ("layer", "LAYER"),
    ("requires", "REQUIRES"),
    ("path", "PATH"),
]


@workspace_app.command("init")
def workspace_init(
    name: Annotated[str, typer.Argument(help="Workspace name (lowercase, digits, _ and -).")],
    template: Annotated[
        str, typer.Option(help="Starting point: local (namespaces here) or ssh (existing hosts).")
    ] = "local",
    path: Annotated[
        Path | None, typer.Option(help="Folder to create it in; default ./NAME.")
    ] = None,
    infra: Annotated[str, typer.Option(help="Name of its first infra.")] = "main",
) -> None:
    """Create a workspace: config/workspace.ncl, infra/INFRA/settings.ncl, extensions/, and a
    .gitignore for runtime/."""
    from provisioning.workspace.templates import init_workspace

    target = path if path is not None else Path(name)
    files = init_workspace(target.resolve(), name, template=template, infra=infra)
    console.print(f"workspace {name} created in {target.resolve()}:")
    for f in files:
        console.print(f"  {f.relative_to(target.resolve())}")
    console.print(f"next: `prvng workspace validate -w {target}` and `prvng component list`")


@workspace_app.command("validate")
def workspace_validate(
    ctx: typer.Context, workspace: WorkspaceOpt = None, infra: InfraOpt = None
) -> None:
    """Evaluate every Nickel file of the workspace (or one infra) against the shipped contracts
    and check what they refer to: providers, task services (and their requirements, without
    cycles), clusters, batch operations. Nickel errors are shown as Nickel prints them."""
    from provisioning.workspace.operate import open_workspace

    ws = open_workspace(workspace)
    problems = ws.validate(infra)
    if problems:
        raise ValidationError(
            f"workspace {ws.name} has {len(problems)} problem(s):\n  " + "\n  ".join(problems),
            problems=problems,
        )
    infras = [infra] if infra else ws.infra_names()
    if state_of(ctx).output.value == "json":
        sys.stdout.write(json.dumps({"workspace": ws.name, "infras": infras, "ok": True}) + "\n")
        return
    console.print(f"workspace {ws.name} is valid ({len(infras)} infra(s): {', '.join(infras)})")


@component_app.command("list")
def component_list(
    ctx: typer.Context, workspace: WorkspaceOpt = None, infra: InfraOpt = None
) -> None:
    """Every provider, task service and cluster with its version, layer (builtin < workspace <
    infra) and folder; the winner of each name is listed."""
    from provisioning.workspace.extensions import discover
    from provisioning.workspace.model import find_workspace

    ws_path: Path | None = workspace
    if ws_path is None:
        try:
            ws_path = find_workspace()
        except Exception:
            ws_path = None  # outside a workspace: the built-ins alone
    cat = discover(ws_path.resolve() if ws_path else None, infra)
    rows: list[dict[str, Any]] = []
    for ext in cat.all():
        doc = ext.describe()
        doc["requires"] = ", ".join(ext.requires)
        rows.append(doc)
    render(rows, state_of(ctx).output, columns=COMPONENT_COLUMNS)
    for err in cat.errors:
        typer.echo(f"warning: {err}", err=True)


@extension_app.command(
    "run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def extension_run(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="KIND/NAME, e.g. providers/local, taskservs/redis.")],
    operation: Annotated[str, typer.Argument(help="Operation, e.g. create, install, check.")],
    workspace: WorkspaceOpt = None,
    infra: Annotated[str, typer.Option("--infra", "-i", help="Infra name.")] = "main",
    target: Annotated[
        str | None, typer.Option(help="Server hostname (or cluster name for clusters).")
    ] = None,
    wait_running: Annotated[
        float | None,
        typer.Option(help="With `status`: poll until the server runs, at most this many seconds."),
    ] = None,
) -> None:
    """Run one operation of an extension on a workspace target and print its JSON answer.
    Progress goes to stderr. For `exec`, put the command after `--`. The inventory in the
    platform's store is kept current (created/deleted servers, installed task services)."""
    from provisioning.core.logging import configure_logging
    from provisioning.core.store import open_database
    from provisioning.workspace.operate import Operator, open_workspace

    settings = state_of(ctx).settings()
    configure_logging("warning", "text")
    ws = open_workspace(workspace)
    command = list(ctx.args)

    async def go() -> dict[str, Any]:
        db = open_database(settings.state_url, sqlite_synchronous=settings.state.sqlite_synchronous)
        try:
            op = Operator(ws, infra, db)
            return await op.run(
                ref,
                operation,
                target,
                command=command or None,
                wait_running_s=wait_running,
                stderr=sys.stderr,
            )
        finally:
            await db.close()

    answer = run(go())
    sys.stdout.write(json.dumps(answer, indent=2, default=str) + "\n")
    # A task that runs this passes the answer on to the tasks that depend on it.
    import os

    if out := os.environ.get("PRVNG_OUTPUT"):
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(answer, default=str) + "\n")
