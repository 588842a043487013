"""`prvng config …`: the workspaces' Nickel files through the control center — list, show,
validate, write (validated, with optimistic concurrency), history, diff, restore."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from provisioning.cli.output import OutputFormat, console, render
from provisioning.cli.state import run, state_of
from provisioning.control_center.client import ControlCenterClient
from provisioning.core.errors import NotFound, Unauthorized, UsageError, ValidationError

app = typer.Typer(
    help="Workspace configuration kept by the control center (config:read, config:write).",
    no_args_is_help=True,
)

Ws = Annotated[str, typer.Argument(help="Workspace id (`prvng config workspaces`).")]
FilePath = Annotated[
    str, typer.Argument(help="File path in the workspace, e.g. infra/x/settings.ncl.")
]
Expected = Annotated[
    str | None,
    typer.Option(
        "--expected-sha256",
        help="sha256 of the file you started from (`prvng config show` prints it); the write is "
        "refused if the file changed since.",
    ),
]
Force = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Without --expected-sha256: replace whatever the file holds now (or create it).",
    ),
]

FILE_COLUMNS = [
    ("path", "PATH"),
    ("size", "SIZE"),
    ("version", "VERSION"),
    ("mtime", "MODIFIED"),
    ("sha256", "SHA256"),
]
HISTORY_COLUMNS = [
    ("version", "VERSION"),
    ("created_at", "WHEN"),
    ("author", "AUTHOR"),
    ("message", "MESSAGE"),
    ("restored_from", "RESTORED FROM"),
    ("sha256", "SHA256"),
]


def _call(ctx: typer.Context, fn: Callable[[ControlCenterClient], Awaitable[Any]]) -> Any:
    st = state_of(ctx)

    async def go() -> Any:
        token = await st.credentials().bearer_async()
        if token is None:
            raise Unauthorized("not logged in: run `prvng login` (or set PRVNG_API_KEY)")
        async with st.cc_client(token) as c:
            return await fn(c)

    return run(go())


async def _expected(
    c: ControlCenterClient, ws: str, path: str, given: str | None, force: bool
) -> str | None:
    if given is not None:
        return given
    if not force:
        raise UsageError(
            "give --expected-sha256 (from `prvng config show`) or --force to replace the file as "
            "it is now"
        )
    try:
        return str((await c.config_read(ws, path))["sha256"])
    except NotFound:
        return None  # a new file


def _show_diagnostics(diags: list[dict[str, Any]]) -> None:
    for d in diags:
        where = ":".join(str(d[k]) for k in ("file", "line", "column") if d.get(k) is not None)
        old = " (already there)" if d.get("preexisting") else ""
        console.print(f"{where or '-'}: {d['message']}{old}", markup=False, highlight=False)


@app.command("workspaces")
def workspaces(ctx: typer.Context) -> None:
    """The workspaces the control center manages (`control_center.workspaces`)."""
    data = _call(ctx, lambda c: c.config_workspaces())
    render(
        data, state_of(ctx).output, columns=[("id", "ID"), ("path", "PATH"), ("available", "OK")]
    )


@app.command("files")
def files(ctx: typer.Context, ws: Ws) -> None:
    """The Nickel files of a workspace (VERSION is empty until the file is first read)."""
    render(_call(ctx, lambda c: c.config_files(ws)), state_of(ctx).output, columns=FILE_COLUMNS)


@app.command("show")
def show(
    ctx: typer.Context,
    ws: Ws,
    path: FilePath,
    version: Annotated[int | None, typer.Option(help="An older version.")] = None,
) -> None:
    """Print a file (its version and sha256 go to stderr; `-o json` prints all as JSON)."""
    st = state_of(ctx)
    if version is None:
        doc = _call(ctx, lambda c: c.config_read(ws, path))
    else:
        doc = _call(ctx, lambda c: c.config_version(ws, path, version))
    if st.output is not OutputFormat.TABLE:
        render(doc, st.output)
        return
    sys.stdout.write(doc["content"])
    sys.stderr.write(f"# {path} version {doc['version']} sha256 {doc['sha256']}\n")


@app.command("validate")
def validate(
    ctx: typer.Context,
    ws: Ws,
    path: Annotated[
        str | None, typer.Argument(help="File to replace; none: the workspace as is.")
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="New content of PATH.")] = None,
) -> None:
    """Validate the workspace as it would be with PATH holding --file's content (nothing is
    written); exit 2 when the change brings problems."""
    if (path is None) != (file is None):
        raise UsageError("give PATH and --file together, or neither")
    content = file.read_text(encoding="utf-8") if file is not None else None
    st = state_of(ctx)
    res = _call(ctx, lambda c: c.config_validate(ws, path, content))
    if st.output is not OutputFormat.TABLE:
        render(res, st.output)
    else:
        _show_diagnostics(res["diagnostics"])
    if not res["valid"]:
        raise ValidationError(f"{path or ws} is not valid", diagnostics=res["diagnostics"])
    if st.output is OutputFormat.TABLE:
        console.print("valid", markup=False)


@app.command("put")
def put(
    ctx: typer.Context,
    ws: Ws,
    path: FilePath,
    file: Annotated[Path, typer.Option("--file", "-f", help="The new content.")],
    message: Annotated[str, typer.Option("--message", "-m", help="Why (kept in the history).")],
    expected_sha256: Expected = None,
    force: Force = False,
) -> None:
    """Validate and write PATH with --file's content: a new version in the history, audited."""
    content = file.read_text(encoding="utf-8")

    async def go(c: ControlCenterClient) -> Any:
        expected = await _expected(c, ws, path, expected_sha256, force)
        return await c.config_write(ws, path, content, expected_sha256=expected, message=message)

    doc = _call(ctx, go)
    st = state_of(ctx)
    if st.output is not OutputFormat.TABLE:
        render(doc, st.output)
    elif doc["unchanged"]:
        console.print(f"{path}: unchanged (version {doc['version']})", markup=False)
    else:
        console.print(f"{path}: version {doc['version']} sha256 {doc['sha256']}", markup=False)


@app.command("history")
def history(ctx: typer.Context, ws: Ws, path: FilePath) -> None:
    """The versions of a file, newest first."""
    render(
        _call(ctx, lambda c: c.config_history(ws, path)),
        state_of(ctx).output,
        columns=HISTORY_COLUMNS,
    )


@app.command("diff")
def diff(
    ctx: typer.Context,
    ws: Ws,
    path: FilePath,
    start: Annotated[
        int | None, typer.Option("--from", help="Default: the version before --to.")
    ] = None,
    end: Annotated[int | None, typer.Option("--to", help="Default: the current version.")] = None,
) -> None:
    """Unified diff between two versions of a file."""
    doc = _call(ctx, lambda c: c.config_diff(ws, path, start, end))
    st = state_of(ctx)
    if st.output is not OutputFormat.TABLE:
        render(doc, st.output)
    else:
        sys.stdout.write(doc["diff"])


@app.command("restore")
def restore(
    ctx: typer.Context,
    ws: Ws,
    path: FilePath,
    version: Annotated[int, typer.Argument(help="The version to bring back.")],
    message: Annotated[
        str, typer.Option("--message", "-m", help="Default: restore version N.")
    ] = "",
    expected_sha256: Expected = None,
    force: Force = False,
) -> None:
    """Write an old version's content back, as a new version (validated like `put`)."""

    async def go(c: ControlCenterClient) -> Any:
        expected = await _expected(c, ws, path, expected_sha256, force)
        return await c.config_restore(ws, path, version, expected_sha256=expected, message=message)

    doc = _call(ctx, go)
    st = state_of(ctx)
    if st.output is not OutputFormat.TABLE:
        render(doc, st.output)
    else:
        console.print(
            f"{path}: version {doc['version']} (content of version {version})", markup=False
        )
