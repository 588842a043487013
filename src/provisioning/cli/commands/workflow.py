"""`prvng workflow …`: submit, watch and control workflows.

It also holds what every submitting command shares: following a workflow to its end
(``_wait``), reporting how it ended (``report_workflow``), and asking the ops-keeper for the
operation instead of submitting (``via``, the ``--via-ops`` flag).
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from provisioning.cli.commands.ops import _decided
from provisioning.cli.commands.ops import _wait as until_final
from provisioning.cli.output import OutputFormat, console, err_console, render
from provisioning.cli.state import CliState, run, state_of
from provisioning.core.errors import OperationFailed, Unreachable
from provisioning.orchestrator.client import OrchestratorClient
from provisioning.orchestrator.workflow_file import load_workflow_file

if TYPE_CHECKING:
    from provisioning.ops_keeper.client import OpsKeeperClient

app = typer.Typer(help="Submit, list, watch and control workflows.", no_args_is_help=True)

WF_COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("kind", "KIND"),
    ("status", "STATUS"),
    ("priority", "PRIO"),
    ("progress", "DONE/TOTAL"),
    ("created_at", "CREATED"),
]
TASK_COLUMNS = [
    ("name", "TASK"),
    ("status", "STATUS"),
    ("tries", "ATTEMPTS"),
    ("depends", "DEPENDS ON"),
    ("error", "ERROR"),
    ("id", "ID"),
]
_RECONNECT_S = 600.0
_ENDED = {"Completed", "Failed", "Cancelled", "RolledBack"}
_TASK_DONE = {"Completed", "Failed", "Cancelled", "Skipped", "RolledBack"}
WfId = Annotated[str, typer.Argument(help="Workflow id (see `prvng workflow list`).")]


def _progress(wf: dict[str, Any]) -> str:
    counts = wf.get("task_counts") or {}
    total = sum(counts.values())
    done = sum(n for s, n in counts.items() if s in _TASK_DONE)
    return f"{done}/{total}"


def _rows(wfs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**w, "progress": _progress(w)} for w in wfs]


def _task_rows(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **t,
            "tries": len(t.get("attempts") or []),
            "depends": [
                d["task"] if d["kind"] == "hard" else f"{d['task']} ({d['kind']})"
                for d in t["depends_on"]
            ],
        }
        for t in tasks
    ]


@app.command()
def submit(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Workflow file: .ncl, .json, .yaml or .yml.")],
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Show live progress; exit 0 only if it Completed.")
    ] = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Submitting the same key again returns the same workflow."),
    ] = None,
    via_ops: Annotated[
        bool,
        typer.Option(
            "--via-ops",
            envvar="PRVNG_VIA_OPS",
            help="Ask the ops-keeper for a `workflow.submit` operation on --target instead of "
            "submitting; prints the operation id, the decision and the policy that made it. "
            "With --wait, follows the workflow the ops-controller makes of it. Required when "
            "the orchestrator has orchestrator.require_signed_ops.",
        ),
    ] = False,
    target: Annotated[
        str | None,
        typer.Option(
            help="With --via-ops: the operation's target, which the keeper's policies glob "
            "on (e.g. prod/nightly-backup); default workflow/<name of the workflow>.",
        ),
    ] = None,
) -> None:
    """Validate a workflow file locally, submit it and print its id.

    Nickel files are checked against the shipped contract; errors show as Nickel prints them.
    """
    st = state_of(ctx)
    spec = load_workflow_file(file)
    if via_ops:
        if idempotency_key:
            raise typer.BadParameter(
                "does not go with --via-ops: the workflow's key is op:<operation id>",
                param_hint="--idempotency-key",
            )
        params = spec.model_dump(mode="json", exclude_none=True)
        via(st, "workflow.submit", target or workflow_target(spec.name), params, wait=wait)
        return
    if target:
        raise typer.BadParameter("goes with --via-ops only", param_hint="--target")
    if idempotency_key:
        spec = spec.model_copy(update={"idempotency_key": idempotency_key})

    async def go() -> dict[str, Any]:
        async with st.client() as c:
            wf = await c.submit(spec)
            if wait:
                wf = await _wait(c, wf["id"], st.output)
            return wf

    report_workflow(run(go()), st.output, wait=wait)


def report_workflow(wf: dict[str, Any], fmt: OutputFormat, *, wait: bool) -> None:
    """Print a submitted (or, with ``wait``, ended) workflow.

    Raises:
        OperationFailed: ``wait`` and it did not complete.
    """
    if fmt is OutputFormat.TABLE:
        console.print(f"workflow {wf['id']} {wf['name']}: {wf['status']}", markup=False)
        if wait and wf.get("error"):
            console.print(wf["error"], markup=False, style="red")
    else:
        render(wf, fmt)
    if wait and wf["status"] != "Completed":
        raise OperationFailed(
            f"workflow {wf['id']} ended {wf['status']}: {wf.get('error') or ''}".rstrip(": ")
        )


# --------------------------------------------------------------------------- --via-ops

_NOT_IN_TARGET = re.compile(r"[^A-Za-z0-9_.:@/-]+")
_DISPATCH_GRACE_S = 60.0  # a token the controller verified just before `exp` may still land


def workflow_target(name: str) -> str:
    """The default target of a ``workflow.submit`` operation: ``workflow/<name>``, characters
    a target may not hold replaced by ``-``."""
    return f"workflow/{_NOT_IN_TARGET.sub('-', name).strip('-') or 'unnamed'}"[:200]


def via(st: CliState, op_type: str, target: str, params: Mapping[str, Any], *, wait: bool) -> None:
    """``--via-ops``: request the operation from the ops-keeper and print its decision; with
    ``wait``, wait until the keeper published it (through an approval, if one is needed), find
    the workflow the ops-controller made of it (idempotency key ``op:<op id>``) and follow it.

    Raises:
        OperationFailed: the keeper rejected the operation (a policy, a freeze, an approver),
            it expired, no workflow came of it in time, or the workflow did not complete.
    """
    say = console if st.output is OutputFormat.TABLE else err_console

    async def go() -> tuple[dict[str, Any], dict[str, Any] | None]:
        async with st.keeper_client() as k:
            op = await k.request_op(op_type, target, params=params)
            _say_decision(op, say)
            if not wait or op["state"] == "rejected":
                return op, None
            op = await _until_published(k, op, say)
        async with st.client() as c:
            wf = await _op_workflow(c, op, say)
            return op, await _wait(c, wf["id"], st.output)

    op, wf = run(go())
    if wf is not None:
        report_workflow(wf, st.output, wait=True)
        return
    if st.output is not OutputFormat.TABLE:
        render(op, st.output)
    _raise_if_refused(op)


def decided_by(decision: Mapping[str, Any]) -> str:
    """Who made a keeper decision (an operation or an evaluation): a freeze, a policy, or the
    default rejection."""
    if decision.get("frozen_by"):
        return f"change freeze {decision['frozen_by']}"
    if decision.get("policy"):
        return f"policy {decision['policy']}"
    return "default (no policy matched)"


def _say_decision(op: dict[str, Any], say: Console) -> None:
    by = decided_by(op)
    say.print(
        f"operation {op['id']} {op['op_type']} {op['target']}: {op['decision']} by {by}, "
        f"now {op['state']}",
        markup=False,
    )
    say.print(f"  {op['decision_reason']}", markup=False)
    if op["state"] == "pending_approval":
        say.print(
            f"awaiting approval by another user holding the role {op['approver_role']}: "
            f"prvng ops approve {op['id']} --reason ...",
            markup=False,
            style="yellow",
        )


def _raise_if_refused(op: dict[str, Any]) -> None:
    if op["state"] == "rejected":
        why = op.get("approver_reason") or op["decision_reason"]
        raise OperationFailed(f"operation {op['id']} was rejected: {why}", op=op["id"])
    if op["state"] == "expired":
        why = op.get("expired_reason") or "it was not approved or published in time"
        raise OperationFailed(f"operation {op['id']} expired: {why}; request it again")


def _deadline(op: dict[str, Any], *fields: str, default_s: float) -> datetime:
    for field in fields:
        if op.get(field):
            at = datetime.fromisoformat(op[field])
            at = at if at.tzinfo else at.replace(tzinfo=UTC)
            return at + timedelta(seconds=_DISPATCH_GRACE_S)
    return datetime.now(UTC) + timedelta(seconds=default_s)


async def _until_published(k: OpsKeeperClient, op: dict[str, Any], say: Console) -> dict[str, Any]:
    """Poll the keeper while the operation waits for an approval or for NATS (``prvng ops
    request --wait``'s loop), until its approval window or token runs out.

    Raises:
        OperationFailed: it was rejected or expired, or is stuck past its deadline.
    """
    first = op["state"]
    if first == "pending_approval":
        say.print("waiting for the approval (Ctrl-C stops waiting; the request stays)")
    left = _deadline(op, "approval_expires_at", "token_expires_at", default_s=600)
    op = await until_final(k, op, max(1.0, (left - datetime.now(UTC)).total_seconds()), quiet=True)
    if op["state"] != first:
        say.print(_decided(op), markup=False)
    _raise_if_refused(op)
    say.print("waiting for the ops-controller to make the workflow", markup=False)
    return op


async def _op_workflow(c: OrchestratorClient, op: dict[str, Any], say: Console) -> dict[str, Any]:
    """The workflow the ops-controller made of a published operation.

    Raises:
        OperationFailed: none came of it before its token expired (no controller running, or
            it refused the operation: the audit log says why).
    """
    key = f"op:{op['id']}"
    deadline = _deadline(op, "token_expires_at", default_s=600)
    while (wf := await c.find_workflow(key)) is None:
        if datetime.now(UTC) > deadline:
            raise OperationFailed(
                f"no workflow came of operation {op['id']} (idempotency key {key}) before its "
                "token expired: is the ops-controller running (`prvng platform status`)? It "
                "refuses an operation it cannot dispatch, and the audit log says why"
            )
        await asyncio.sleep(0.5)
    say.print(f"workflow {wf['id']} made of operation {op['id']}", markup=False)
    return wf


async def _wait(
    c: OrchestratorClient, wf_id: str, fmt: OutputFormat, timeout_s: float = 7 * 86400
) -> dict[str, Any]:
    """Poll until the workflow ends, showing progress (a bar on a terminal, lines otherwise)."""
    deadline = time.monotonic() + timeout_s
    live = fmt is OutputFormat.TABLE and sys.stderr.isatty()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        console=console if live else None,
        transient=False,
        disable=not live,
    )
    bar = progress.add_task("starting", total=None, extra="")
    last = ""
    with progress:
        lost_since: float | None = None
        while True:
            try:
                wf = await c.get_workflow(wf_id, tasks="none")  # task_counts are enough
                lost_since = None
            except Unreachable:
                # A restarting orchestrator (crash, upgrade) is not the workflow failing: keep
                # waiting for it to come back, for a while.
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    print(
                        "lost the orchestrator; waiting for it to come back (Ctrl-C stops "
                        "waiting, the workflow goes on)",
                        file=sys.stderr,
                        flush=True,
                    )
                if now - lost_since > _RECONNECT_S:
                    raise
                await asyncio.sleep(1.0)
                continue
            counts = wf.get("task_counts") or {}
            total = sum(counts.values())
            done = sum(n for s, n in counts.items() if s in _TASK_DONE)
            failed = counts.get("Failed", 0)
            running = counts.get("Running", 0) + counts.get("RollingBack", 0)
            extra = f"running {running}" + (f", failed {failed}" if failed else "")
            progress.update(bar, description=wf["status"], total=total, completed=done, extra=extra)
            line = f"{wf['status']}: {done}/{total} tasks done, {extra}"
            if not live and line != last and fmt is OutputFormat.TABLE:
                print(line, file=sys.stderr, flush=True)
                last = line
            if wf["status"] in _ENDED:
                return await c.get_workflow(wf_id)  # with its tasks, for the report
            if time.monotonic() > deadline:
                raise OperationFailed(f"gave up waiting for workflow {wf_id} after {timeout_s:g}s")
            await asyncio.sleep(0.5)


@app.command("list")
def list_(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option(help="Only this status, e.g. Running, Failed.")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="Only this kind, e.g. custom, batch.")] = None,
    owner: Annotated[str | None, typer.Option(help="Only this owner.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many (1-1000).")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many.")] = 0,
) -> None:
    """List workflows, newest first."""
    st = state_of(ctx)

    async def go() -> list[dict[str, Any]]:
        async with st.client() as c:
            return await c.list_workflows(
                status=status, kind=kind, owner=owner, limit=limit, offset=offset
            )

    data = run(go())
    render(_rows(data) if st.output is OutputFormat.TABLE else data, st.output, columns=WF_COLUMNS)


@app.command()
def counts(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Option(help="Only this kind, e.g. custom, batch.")] = None,
    owner: Annotated[str | None, typer.Option(help="Only this owner.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only those created from this time (ISO 8601).")
    ] = None,
) -> None:
    """How many workflows are in each status: all of them, not a page."""
    st = state_of(ctx)

    async def go() -> dict[str, Any]:
        async with st.client() as c:
            return await c.count_workflows(kind=kind, owner=owner, since=since)

    data = run(go())
    if st.output is not OutputFormat.TABLE:
        render(data, st.output)
        return
    rows = [{"status": k, "workflows": n} for k, n in sorted(data["by_status"].items())]
    rows.append({"status": "total", "workflows": data["total"]})
    render(rows, st.output, columns=[("status", "STATUS"), ("workflows", "WORKFLOWS")])


@app.command()
def show(ctx: typer.Context, workflow_id: WfId) -> None:
    """Show a workflow and its tasks with their states, attempts and errors."""
    st = state_of(ctx)

    async def go() -> dict[str, Any]:
        async with st.client() as c:
            return await c.get_workflow(workflow_id)

    wf = run(go())
    if st.output is not OutputFormat.TABLE:
        render(wf, st.output)
        return
    summary = {k: v for k, v in wf.items() if k != "tasks"}
    summary["progress"] = _progress(wf)
    render(summary, st.output)
    render(_task_rows(wf.get("tasks") or []), st.output, columns=TASK_COLUMNS, title="tasks")


def _action(ctx: typer.Context, workflow_id: str, action: str) -> None:
    st = state_of(ctx)

    async def go() -> dict[str, Any]:
        async with st.client() as c:
            return await c.action(workflow_id, action)

    wf = run(go())
    if st.output is OutputFormat.TABLE:
        extra = f" ({wf['rerun_tasks']} tasks to run again)" if "rerun_tasks" in wf else ""
        console.print(f"workflow {wf['id']}: {action} accepted, now {wf['status']}{extra}")
    else:
        render(wf, st.output)


@app.command()
def cancel(ctx: typer.Context, workflow_id: WfId) -> None:
    """Cancel: running tasks get SIGTERM (then SIGKILL after a grace); the rest are cancelled."""
    _action(ctx, workflow_id, "cancel")


@app.command()
def pause(ctx: typer.Context, workflow_id: WfId) -> None:
    """Pause: no new task starts; running ones finish."""
    _action(ctx, workflow_id, "pause")


@app.command()
def resume(ctx: typer.Context, workflow_id: WfId) -> None:
    """Resume a paused workflow."""
    _action(ctx, workflow_id, "resume")


@app.command()
def retry(ctx: typer.Context, workflow_id: WfId) -> None:
    """Retry a Failed or Cancelled workflow from the point of failure (completed tasks are kept)."""
    _action(ctx, workflow_id, "retry")


@app.command()
def rollback(ctx: typer.Context, workflow_id: WfId) -> None:
    """Roll back: run the rollback commands of completed tasks in reverse topological order."""
    _action(ctx, workflow_id, "rollback")


@app.command()
def logs(
    ctx: typer.Context,
    workflow_id: WfId,
    task: Annotated[
        str | None, typer.Option("--task", "-t", help="Only this task (name or id).")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the workflow ends.")
    ] = False,
    grep: Annotated[str | None, typer.Option(help="Only lines containing this text.")] = None,
) -> None:
    """Print the logs of a workflow's tasks (or one task), optionally following them live."""
    st = state_of(ctx)

    async def go() -> None:
        async with st.client() as c:
            wf = await c.get_workflow(workflow_id)
            tasks = [t for t in wf["tasks"] if task in (None, t["name"], t["id"])]
            if task and not tasks:
                raise OperationFailed(f"workflow {workflow_id} has no task {task!r}")
            cursors: dict[str, str | None] = {t["id"]: None for t in tasks}
            names = {t["id"]: t["name"] for t in tasks}
            deadline = time.monotonic() + 7 * 86400
            while True:
                ended = False
                if follow:
                    # Read the state before the lines: once it says ended, this read is the last.
                    wf = await c.get_workflow(workflow_id, tasks="brief")
                    ended = wf["status"] in _ENDED and all(
                        t["status"] in _TASK_DONE for t in wf["tasks"] if t["id"] in cursors
                    )
                for tid in cursors:
                    params: dict[str, Any] = {"q": grep, "after": cursors[tid]}
                    for ln in await c.task_logs(tid, **params):
                        cursors[tid] = f"{ln['attempt']}:{ln['n']}"
                        _print_line(names[tid], ln, st.output)
                if not follow or ended or time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.5)

    run(go())


def _print_line(task: str, ln: dict[str, Any], fmt: OutputFormat) -> None:
    if fmt is OutputFormat.JSON:
        import json

        print(json.dumps({"task": task, **ln}), flush=True)
        return
    print(f"{task} [{ln['attempt']}] {ln['stream']}: {ln['line']}", flush=True)
