"""`prvng task …`: inspect tasks and their logs."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from provisioning.cli.output import OutputFormat, render
from provisioning.cli.state import run, state_of

app = typer.Typer(help="Inspect tasks and follow their logs.", no_args_is_help=True)

COLUMNS = [
    ("id", "ID"),
    ("workflow_id", "WORKFLOW"),
    ("name", "TASK"),
    ("status", "STATUS"),
    ("tries", "ATTEMPTS"),
    ("error", "ERROR"),
]


@app.command("list")
def list_(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option(help="Only this status, e.g. Running, Failed.")
    ] = None,
    workflow: Annotated[str | None, typer.Option(help="Only tasks of this workflow id.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many (1-1000).")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many.")] = 0,
) -> None:
    """List tasks, newest first."""
    st = state_of(ctx)

    async def go() -> list[dict[str, Any]]:
        async with st.client() as c:
            return await c.list_tasks(
                status=status, workflow_id=workflow, limit=limit, offset=offset
            )

    data = run(go())
    if st.output is OutputFormat.TABLE:
        data = [{**t, "tries": len(t.get("attempts") or [])} for t in data]
    render(data, st.output, columns=COLUMNS)


@app.command()
def show(ctx: typer.Context, task_id: Annotated[str, typer.Argument(help="Task id.")]) -> None:
    """Show a task with its attempts, outputs and error."""
    st = state_of(ctx)

    async def go() -> dict[str, Any]:
        async with st.client() as c:
            return await c.get_task(task_id)

    t = run(go())
    render(t, st.output)
    if st.output is OutputFormat.TABLE:
        render(
            t["attempts"],
            st.output,
            columns=[
                ("number", "#"),
                ("phase", "PHASE"),
                ("started_at", "STARTED"),
                ("ended_at", "ENDED"),
                ("exit_code", "EXIT"),
                ("error", "ERROR"),
                ("worker", "WORKER"),
            ],
            title="attempts",
        )


@app.command()
def logs(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream until the task ends.")
    ] = False,
) -> None:
    """Print a task's log; --follow streams it live (Server-Sent Events, resumes on reconnect)."""
    st = state_of(ctx)

    async def go() -> None:
        async with st.client() as c:
            if not follow:
                for ln in await c.task_logs(task_id):
                    _print(ln, st.output)
                return
            last: str | None = None
            for _ in range(100):  # reconnects, each resuming after the last line seen
                try:
                    async for event, ident, data in c.follow_logs(task_id, last):
                        if event == "end":
                            return
                        last = ident or last
                        _print(data, st.output)
                    return
                except Exception:
                    if last is None:
                        raise

    run(go())


def _print(ln: dict[str, Any], fmt: OutputFormat) -> None:
    if fmt is OutputFormat.JSON:
        print(json.dumps(ln), flush=True)
    else:
        print(f"[{ln['attempt']}] {ln['stream']}: {ln['line']}", flush=True)
