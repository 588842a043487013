"""`prvng ops …`: ask the ops-keeper for operations, approve them, freeze changes.

Every command talks to the keeper's HTTP API (docs/reference/ops.md) through
:class:`~provisioning.ops_keeper.client.OpsKeeperClient` with the stored login or
``PRVNG_API_KEY``; the keeper's errors come back typed, so ``cli/main.py`` prints them and exits
with the house codes (2 bad input, 1 not found / wrong state / rejected, 3 not allowed or not
reachable).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer
import yaml

from provisioning.cli.output import OutputFormat, console, err_console, render
from provisioning.cli.state import CliState, run, state_of
from provisioning.core.clock import as_utc, utcnow
from provisioning.core.errors import (
    NotFound,
    OperationFailed,
    Unreachable,
    UsageError,
    ValidationError,
)
from provisioning.ops_keeper.api import OpState

if TYPE_CHECKING:
    from provisioning.ops_keeper.client import OpsKeeperClient

__all__ = ["app", "parse_params"]

T = TypeVar("T")

app = typer.Typer(
    help="Request operations through the ops-keeper, approve them, and freeze changes.\n\n"
    "The keeper decides each request by its policy file and the active change freezes; see "
    "`prvng ops policy` for the policies it has loaded.",
    no_args_is_help=True,
)

OP_COLUMNS = [
    ("id", "ID"),
    ("op_type", "TYPE"),
    ("target", "TARGET"),
    ("state", "STATE"),
    ("policy", "POLICY"),
    ("requester_name", "BY"),
    ("approver_name", "APPROVER"),
    ("created_at", "CREATED"),
]
TRACE_COLUMNS = [
    ("policy", "POLICY"),
    ("matched", "MATCHED"),
    ("field", "FAILED ON"),
    ("detail", "DETAIL"),
]
FREEZE_COLUMNS = [
    ("id", "ID"),
    ("scope", "SCOPE"),
    ("reason", "REASON"),
    ("until", "UNTIL"),
    ("created_by_name", "BY"),
    ("created_at", "STARTED"),
    ("ended_at", "ENDED"),
]
_FINAL = {OpState.PUBLISHED.value, OpState.REJECTED.value, OpState.EXPIRED.value}
_FAILED = {OpState.REJECTED.value, OpState.EXPIRED.value}
_POLL_S = 0.5
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PARAM_FORMATS = {".json": "json", ".yaml": "yaml", ".yml": "yaml", ".ncl": "ncl"}


class FreezeState(StrEnum):
    ACTIVE = "active"
    ENDED = "ended"
    ALL = "all"


OpId = Annotated[str, typer.Argument(help="Operation id (see `prvng ops list`).")]
OpType = Annotated[
    str,
    typer.Option(
        "--type", "-t", help="Operation type: lower-case words joined by dots, e.g. server.delete."
    ),
]
Target = Annotated[str, typer.Option(help="What the operation acts on, e.g. prod/web-01.")]
Image = Annotated[
    str | None, typer.Option(help="Image the operation deploys, e.g. registry/app:1.2.")
]
Params = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        "-p",
        help="Parameter KEY=VALUE (repeatable). VALUE is JSON when it parses as JSON "
        "(3, true, null, \\[1,2], {...}, '\"3\"'), else a string; a.b=v sets b inside a.",
    ),
]
ParamsFile = Annotated[
    Path | None,
    typer.Option(
        help="Parameters from a file holding one object: .json, .yaml/.yml or .ncl "
        "(- reads JSON or YAML from stdin). --param values override its keys."
    ),
]
Reason = Annotated[str, typer.Option("--reason", "-r", help="Why; recorded and audited.")]


# ---------------------------------------------------------------------- parameters


def _json_or_text(raw: str) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(name)  # NaN and Infinity are not JSON: keep them as text

    try:
        return json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError):
        return raw


def _load_params_file(path: Path) -> dict[str, Any]:
    """The object in ``path`` (``-``: JSON or YAML on standard input).

    Raises:
        UsageError: the file cannot be read or has an unknown extension.
        ValidationError: it is malformed or does not hold an object.
        NickelError: a ``.ncl`` file does not evaluate.
    """
    if str(path) == "-":
        source, fmt = "stdin", "yaml"  # YAML reads JSON too
    else:
        source, fmt = str(path), _PARAM_FORMATS.get(path.suffix.lower(), "")
        if not fmt:
            raise UsageError(
                f"--params-file {source}: unsupported file type "
                f"{path.suffix or '(no extension)'!r}; use .json, .yaml, .yml or .ncl, or - "
                "for standard input"
            )
    data: Any
    if fmt == "ncl":
        from provisioning.core.nickel import evaluate_file  # slow import: only when needed

        data = evaluate_file(path)
    else:
        try:
            text = sys.stdin.read() if source == "stdin" else path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--params-file {source}: cannot read it: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ValidationError(f"{source}: not UTF-8 text (byte {exc.start})") from None
        data = _parse_text(text, source, "json" if fmt == "json" else "yaml")
    if not isinstance(data, dict):
        got = "nothing" if data is None else f"a {type(data).__name__}"
        raise ValidationError(
            f"--params-file {source}: expected an object of parameters, got {got}"
        )
    return data


def _parse_text(text: str, source: str, fmt: Literal["json", "yaml"]) -> Any:
    try:
        if fmt == "json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"{source}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ValidationError(f"{where}: invalid YAML: {exc.problem or 'syntax error'}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise ValidationError(f"{source}: cannot parse it: {exc}") from None


def parse_params(pairs: list[str] | None, params_file: Path | None = None) -> dict[str, Any]:
    """The parameters of ``--params-file`` and ``--param KEY=VALUE`` flags, the flags winning.

    Raises:
        UsageError: a flag is not KEY=VALUE, repeats a key, or clashes with another flag
            (``a=1`` and ``a.b=2``); the message names the key.
        ValidationError: the file is malformed or holds no object.
    """
    params = _load_params_file(params_file) if params_file is not None else {}
    given: list[tuple[str, ...]] = []
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(
                f"--param {pair!r}: expected KEY=VALUE, e.g. --param replicas=3 "
                "or --param force=true"
            )
        path = tuple(key.split("."))
        if not all(path):
            raise UsageError(f"--param {key}: a dotted key needs a name between every two dots")
        for other in given:
            if other == path:
                raise UsageError(f"--param {key}: given more than once; give each key once")
            if other[: len(path)] == path or path[: len(other)] == other:
                raise UsageError(
                    f"--param {key}: clashes with --param {'.'.join(other)} "
                    "(one sets a value where the other needs an object)"
                )
        given.append(path)
        node = params
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}  # a flag replaces what the file had there
            node = child
        node[path[-1]] = _json_or_text(raw)
    return params


def _until(text: str | None) -> datetime | None:
    if text is None:
        return None
    if m := _DURATION.match(text.strip()):
        return utcnow() + timedelta(seconds=float(m[1]) * _UNIT_S[m[2]])
    try:
        return as_utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise UsageError(
            f"--until {text!r}: expected a time like 2030-01-31T18:00 (UTC unless it has an "
            "offset) or a duration like 90m, 2h or 1d"
        ) from None


# ---------------------------------------------------------------------- plumbing


def _when(iso: str) -> str:
    """An API time (ISO 8601, UTC) to the second."""
    return iso[:19].replace("T", " ") + " UTC"


def _call(st: CliState, call: Callable[[OpsKeeperClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with st.keeper_client() as c:
            return await call(c)

    return run(go())


def _decided(op: dict[str, Any]) -> str:
    """One line: the operation, its state, and who or what decided it."""
    line = f"operation {op['id']} {op['state']}"
    if op.get("approver_name"):
        line += f" by {op['approver_name']}: {op.get('approver_reason') or ''}".rstrip(": ")
    elif op.get("policy") and not op.get("frozen_by"):
        line += f" (policy {op['policy']}): {op['decision_reason']}"
    else:  # a freeze or no policy at all: the reason says which
        line += f": {op['decision_reason']}"
    if op.get("expired_reason"):
        line += f"; {op['expired_reason']}"
    return line


def _print_op(st: CliState, op: dict[str, Any]) -> None:
    if st.output is OutputFormat.TABLE:
        console.print(_decided(op), markup=False, highlight=False)
    else:
        render(op, st.output)


async def _wait(
    c: OpsKeeperClient, op: dict[str, Any], timeout_s: float, quiet: bool
) -> dict[str, Any]:
    """Poll the operation until it is published, rejected or expired.

    Raises:
        OperationFailed: ``timeout_s`` passed first.
    """
    deadline = time.monotonic() + timeout_s
    hinted = quiet
    while op["state"] not in _FINAL:
        if not hinted and op["state"] == OpState.PENDING_APPROVAL.value:
            role = op.get("approver_role") or "operator"
            err_console.print(
                f"waiting for another user holding role {role} to approve it: "
                f"prvng ops approve {op['id']} --reason ...",
                markup=False,
                highlight=False,
            )
            hinted = True
        left = deadline - time.monotonic()
        if left <= 0:
            raise OperationFailed(
                f"gave up waiting after {timeout_s:g}s: operation {op['id']} is still "
                f"{op['state']}; `prvng ops show {op['id']}` follows it"
            )
        await asyncio.sleep(min(_POLL_S, left))
        try:
            op = await c.get_op(op["id"])
        except Unreachable:
            continue  # a restarting keeper is not the operation failing: keep trying
    return op


# ---------------------------------------------------------------------- operations


@app.command()
def request(
    ctx: typer.Context,
    op_type: OpType,
    target: Target,
    image: Image = None,
    param: Params = None,
    params_file: ParamsFile = None,
    reason: Annotated[
        str | None, typer.Option("--reason", "-r", help="Why, shown to the approver.")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            "-w",
            help="Wait until it is published, rejected or expired; exit 1 unless published.",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=1, help="With --wait: give up (exit 1) after this many seconds.")
    ] = 300,
) -> None:
    """Request an operation; prints its id, its state and the policy that decided it.

    The keeper decides by its policy and the active change freezes, records
    the operation, and publishes it signed once approved. Without --wait the
    exit code is 0 whatever the keeper decided; with --wait the command
    follows the operation and exits 0 only once it is published (1 when it
    is rejected or expires, or the --timeout passes first).

    Example: prvng ops request --type server.delete --target prod/web-01 -p force=true --wait
    """
    st = state_of(ctx)
    params = parse_params(param, params_file)

    async def go(c: OpsKeeperClient) -> dict[str, Any]:
        op = await c.request_op(op_type, target, image=image, params=params, reason=reason)
        if wait and op["state"] not in _FINAL:
            if st.output is OutputFormat.TABLE:
                _print_op(st, op)
            op = await _wait(c, op, timeout, quiet=st.output is not OutputFormat.TABLE)
        return op

    op = _call(st, go)
    _print_op(st, op)
    if wait and op["state"] in _FAILED:
        raise OperationFailed(_decided(op))


@app.command("list")
def list_(
    ctx: typer.Context,
    state: Annotated[OpState | None, typer.Option(help="Only operations in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many (1-1000).")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many.")] = 0,
) -> None:
    """List operations, newest first (a developer sees only their own).

    Example: prvng ops list --state pending_approval
    """
    st = state_of(ctx)
    value = state.value if state else None
    rows = _call(st, lambda c: c.list_ops(state=value, limit=limit, offset=offset))
    render(rows, st.output, columns=OP_COLUMNS)


@app.command()
def show(ctx: typer.Context, op_id: OpId) -> None:
    """Show an operation: request, decision, approval, publishing, policies compared.

    Example: prvng ops show 0b6f2c1e-5d0a-4c59-9f0e-8a7d3c2b1a00
    """
    st = state_of(ctx)
    try:
        op = _call(st, lambda c: c.get_op(op_id))
    except NotFound as exc:
        raise NotFound(
            f"{exc.message}; `prvng ops list` shows the operations you may see"
        ) from None
    if st.output is not OutputFormat.TABLE:
        render(op, st.output)
        return
    summary = {k: v for k, v in op.items() if k != "trace"}
    summary["params"] = json.dumps(op["params"], sort_keys=True, ensure_ascii=False)
    render(summary, st.output)
    render(op.get("trace") or [], st.output, columns=TRACE_COLUMNS, title="policies compared")


@app.command()
def approve(ctx: typer.Context, op_id: OpId, reason: Reason) -> None:
    """Approve an operation in pending_approval: the keeper signs and publishes it.

    You need the approver role its policy names (admin counts as every
    role), and may not approve your own request. Refused while a change
    freeze covers the target.

    Example: prvng ops approve 0b6f2c1e-5d0a-4c59-9f0e-8a7d3c2b1a00 --reason "change CHG-42"
    """
    st = state_of(ctx)
    _print_op(st, _call(st, lambda c: c.approve(op_id, reason)))


@app.command()
def reject(ctx: typer.Context, op_id: OpId, reason: Reason) -> None:
    """Reject an operation in pending_approval; its requester may so withdraw it.

    Example: prvng ops reject 0b6f2c1e-5d0a-4c59-9f0e-8a7d3c2b1a00 --reason "not this week"
    """
    st = state_of(ctx)
    _print_op(st, _call(st, lambda c: c.reject(op_id, reason)))


@app.command()
def evaluate(
    ctx: typer.Context,
    op_type: OpType,
    target: Target,
    image: Image = None,
    param: Params = None,
    params_file: ParamsFile = None,
) -> None:
    """What the keeper would decide on a request now, and which policy decides it.

    Shows every policy compared, in order, and the first field that did not
    match. Records nothing: no operation, no message. Exits 0 whatever the
    decision (use --output json and read `decision` in scripts).

    Example: prvng ops evaluate --type server.delete --target prod/web-01
    """
    st = state_of(ctx)
    params = parse_params(param, params_file)
    doc = _call(st, lambda c: c.evaluate(op_type, target, image=image, params=params))
    if st.output is not OutputFormat.TABLE:
        render(doc, st.output)
        return
    console.print(
        f"{doc['decision']} (a request would be {doc['state']}), policy {doc['policy'] or '-'}: "
        f"{doc['reason']}",
        markup=False,
        highlight=False,
    )
    render(doc["trace"], st.output, columns=TRACE_COLUMNS, title="policies compared")


# ---------------------------------------------------------------------- freezes and policy


@app.command()
def freeze(
    ctx: typer.Context,
    reason: Reason,
    until: Annotated[
        str | None,
        typer.Option(
            help="When it ends by itself: a time (2030-01-31T18:00, UTC unless it has an "
            "offset) or a duration (90m, 2h, 1d). Default: until lifted."
        ),
    ] = None,
    scope: Annotated[
        str, typer.Option(help="Glob on the targets it covers, e.g. prod/*; * is everything.")
    ] = "*",
) -> None:
    """Start a change freeze: requests on targets matching --scope are rejected.

    Pending operations it covers cannot be approved either, until the freeze
    ends (--until) or is lifted with `prvng ops unfreeze`.

    Example: prvng ops freeze --reason "release weekend" --scope "prod/*" --until 2d
    """
    st = state_of(ctx)
    end = _until(until)
    doc = _call(st, lambda c: c.freeze(reason, scope=scope, until=end))
    if st.output is OutputFormat.TABLE:
        ends = f"until {_when(doc['until'])}" if doc.get("until") else "until lifted"
        console.print(
            f"change freeze {doc['id']} on {doc['scope']} {ends}", markup=False, highlight=False
        )
    else:
        render(doc, st.output)


@app.command()
def unfreeze(
    ctx: typer.Context,
    freeze_id: Annotated[
        str | None,
        typer.Argument(help="Freeze id (see `prvng ops freezes`); default: the only active one."),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Lift every active freeze.")] = False,
) -> None:
    """Lift a change freeze (by id, the only active one, or --all).

    Without an id it lifts the only active freeze; when several are active
    it names them and lifts none, unless --all is given. With none active it
    says so and exits 0.

    Example: prvng ops unfreeze 5c1d7e2a-0f3b-4a8e-9d61-2b7c4e8f9a10
    """
    st = state_of(ctx)
    if freeze_id is not None and all_:
        raise UsageError("give a freeze id or --all, not both")

    async def go(c: OpsKeeperClient) -> list[dict[str, Any]]:
        if freeze_id is not None:
            return [await c.unfreeze(freeze_id)]
        active = await c.list_freezes("active")
        if len(active) > 1 and not all_:
            ids = ", ".join(f"{f['id']} ({f['scope']})" for f in active)
            raise UsageError(
                f"{len(active)} change freezes are active: {ids}; name the one to lift, "
                "or give --all to lift every one"
            )
        return [await c.unfreeze(f["id"]) for f in active]

    lifted = _call(st, go)
    if st.output is not OutputFormat.TABLE:
        render(lifted, st.output)
    elif not lifted:
        console.print("no change freeze is active; nothing to lift")
    for doc in lifted if st.output is OutputFormat.TABLE else []:
        console.print(
            f"change freeze {doc['id']} on {doc['scope']} lifted", markup=False, highlight=False
        )


@app.command()
def freezes(
    ctx: typer.Context,
    state: Annotated[FreezeState, typer.Option(help="Which freezes.")] = FreezeState.ACTIVE,
) -> None:
    """List change freezes, newest first.

    Example: prvng ops freezes --state all
    """
    st = state_of(ctx)
    rows = _call(st, lambda c: c.list_freezes(state.value))
    render(rows, st.output, columns=FREEZE_COLUMNS)


@app.command()
def policy(ctx: typer.Context) -> None:
    """Show the keeper's policy file: the policies loaded and the file's last error.

    Policies are listed in the order they are compared. While the file on
    disk is broken the keeper keeps the last good policy; this command then
    prints Nickel's error and exits 1.

    Example: prvng ops policy
    """
    st = state_of(ctx)
    doc = _call(st, lambda c: c.policy())
    if st.output is OutputFormat.TABLE:
        render({**doc, "names": ", ".join(doc.get("names") or []) or "-"}, st.output)
    else:
        render(doc, st.output)
    if doc.get("last_error"):
        raise OperationFailed(
            f"the policy file {doc['path']} does not load (Nickel's error is in last_error); "
            "the keeper keeps the last good policy until it does"
        )
