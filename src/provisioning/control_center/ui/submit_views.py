"""Submitting a workflow from the web UI (``/ui/workflows/new``): the same workflow file
``prvng workflow submit FILE`` takes — Nickel, JSON or YAML — pasted into the form or read from a
file by the page's script (``FileReader``, so no upload parsing and the CSRF token stays in the
form), with the name and priority optionally set by fields.

The text is read here, in the control center, exactly as the CLI reads a file (Nickel evaluated
with the ``Workflow`` contract); a mistake is shown under the editor with the line the parser
names, and nothing is submitted. "Check" stops there; "Submit" then calls the orchestrator's
``POST /workflows`` with the user's own token (it checks ``workflow:create`` and
``orchestrator.require_signed_ops`` again), or — "via ops-keeper" — requests a
``workflow.submit`` operation on a target, as ``prvng workflow submit --via-ops`` does.

A Nickel text may not ``import``: it is evaluated on the control center's host, whose files an
import would read into the workflow. It is evaluated in a child process
(:mod:`provisioning.core.isolated`) within ``control_center.nickel_timeout_s`` and
``nickel_memory_mb``: a text that never ends evaluating, or needs more memory, is shown with a
problem naming the limit, like any other mistake.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from provisioning.control_center.ui.sessions import UiSession
from provisioning.control_center.ui.views import read_form
from provisioning.core import isolated
from provisioning.core.errors import NickelError, ProvisioningError, ValidationError
from provisioning.core.nickel import schemas_dir
from provisioning.orchestrator.api import WorkflowSpec
from provisioning.orchestrator.client import parse_workflow_text

if TYPE_CHECKING:
    from provisioning.control_center.ui.app import WebUI

__all__ = ["FORMATS", "build_submit_router", "read_workflow", "workflow_target"]

FORMATS = ("ncl", "json", "yaml")
MAX_TEXT = 256 * 1024
_SUFFIX = {"ncl": ".ncl", "json": ".json", "yaml": ".yaml"}
_FILE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
# `import` followed by anything but a plain word (which Nickel would refuse anyway) — so a
# command string like "python -c 'import os'" is fine.
_IMPORT = re.compile(r"\bimport\b(?!\s+[A-Za-z_])")
_NOT_IN_TARGET = re.compile(r"[^A-Za-z0-9_.:@/-]+")
_CHECKS = asyncio.Semaphore(2)  # Nickel evaluations are CPU-bound


@dataclass
class Problem:
    """Why a workflow text was refused: the parser's message and, when it gives one, the line."""

    message: str
    line: int | None = None
    column: int | None = None


@dataclass
class Draft:
    """The form as submitted, shown again with its problem."""

    text: str = ""
    fmt: str = "json"
    filename: str = ""
    name: str = ""
    priority: str = ""
    via_ops: bool = False
    target: str = ""
    problems: list[Problem] = field(default_factory=list)

    @classmethod
    def of(cls, form: dict[str, str]) -> Draft:
        fmt = form.get("format", "json")
        return cls(
            text=form.get("text", "").replace("\r\n", "\n"),
            fmt=fmt if fmt in FORMATS else "json",
            filename=_FILE_NAME.sub("-", form.get("filename", "").strip())[:100].strip(".-"),
            name=form.get("name", "").strip(),
            priority=form.get("priority", "").strip(),
            via_ops=form.get("via_ops") == "on",
            target=form.get("target", "").strip(),
        )

    @property
    def source(self) -> str:
        """What error messages call the text: the file's name, else ``workflow.<ext>``."""
        name = self.filename or "workflow"
        return name if name.endswith(_SUFFIX[self.fmt]) else name + _SUFFIX[self.fmt]


def workflow_target(name: str) -> str:
    """The default target of a ``workflow.submit`` operation, as the CLI's ``--via-ops`` makes
    it: ``workflow/<name>``, characters a target may not hold replaced by ``-``."""
    return f"workflow/{_NOT_IN_TARGET.sub('-', name).strip('-') or 'unnamed'}"[:200]


def _evaluate_nickel(text: str, source: str, limits: isolated.Limits) -> WorkflowSpec:
    with tempfile.TemporaryDirectory(prefix="prvng-ui-wf-") as tmp:
        path = Path(tmp) / source
        path.write_text(text, encoding="utf-8")
        try:
            data = isolated.run(
                "provisioning.control_center.workflow_nickel:load_workflow_data",
                {"path": str(path)},
                limits=limits,
                source=source,
            )
        except NickelError as exc:
            # Name the file as the user knows it, and the shipped contract by its package path.
            message = exc.message.replace(f"{tmp}/", "").replace(
                f"{schemas_dir()}/", "provisioning/schemas/"
            )
            raise NickelError(message, source=source) from None
        return WorkflowSpec.model_validate(data)


def _problem(exc: ProvisioningError, source: str) -> Problem:
    line, column = exc.details.get("line"), exc.details.get("column")
    if line is None:
        found = re.search(rf"(?<![\w./-]){re.escape(source)}:(\d+):(\d+)", exc.message)
        if found:
            line, column = int(found.group(1)), int(found.group(2))
    return Problem(
        exc.message,
        line if isinstance(line, int) else None,
        column if isinstance(column, int) else None,
    )


async def read_workflow(
    draft: Draft, limits: isolated.Limits | None = None
) -> WorkflowSpec | Problem:
    """The draft's workflow, read as ``prvng workflow submit`` reads a file, with the name and
    priority fields applied; or why it cannot be. A Nickel text is evaluated in a child process
    within ``limits`` (default :class:`~provisioning.core.isolated.Limits`)."""
    if not draft.text.strip():
        return Problem("Paste a workflow or choose a file.")
    if len(draft.text) > MAX_TEXT:
        return Problem(
            f"The workflow is too long ({len(draft.text)} characters; at most {MAX_TEXT})."
        )
    source = draft.source
    try:
        if draft.fmt == "ncl":
            found = _IMPORT.search(draft.text)
            if found:
                line = draft.text.count("\n", 0, found.start()) + 1
                return Problem(
                    f"{source}:{line}: a workflow submitted from the web UI cannot use `import` "
                    "(it is evaluated on the control center); inline the imported values or "
                    "submit the file with `prvng workflow submit`.",
                    line,
                )
            async with _CHECKS:
                spec = await asyncio.to_thread(
                    _evaluate_nickel, draft.text, source, limits or isolated.Limits()
                )
        else:
            fmt: Any = draft.fmt
            spec = parse_workflow_text(draft.text, fmt, source)
    except (NickelError, ValidationError) as exc:
        return _problem(exc, source)
    changes: dict[str, Any] = {}
    if draft.name:
        changes["name"] = draft.name
    if draft.priority:
        changes["priority"] = draft.priority
    if changes:
        data = {**spec.model_dump(mode="json", exclude_none=True), **changes}
        try:
            spec = parse_workflow_text(json.dumps(data), "json", source)
        except ValidationError as exc:
            return Problem(exc.message)
    return spec


def build_submit_router(ui: WebUI) -> APIRouter:
    r = APIRouter()
    prefix = "/ui"

    async def require_signed(session: UiSession) -> bool:
        """Whether the orchestrator makes workflows only of signed operations."""
        try:
            async with ui.backends.orchestrator(session.token) as orch:
                return bool((await orch.health()).get("require_signed_ops"))
        except ProvisioningError:
            return False

    async def render(
        request: Request,
        session: UiSession,
        draft: Draft,
        *,
        status: int = 200,
        checked: WorkflowSpec | None = None,
        error: str = "",
    ) -> Response:
        signed = await require_signed(session)
        if request.method == "GET" and signed:
            draft.via_ops = True
        return ui.page(
            request,
            "submit/submit.html",
            session,
            status=status,
            title="Submit a workflow",
            active="workflows",
            draft=draft,
            formats=FORMATS,
            checked=checked,
            error=error,
            signed=signed,
            may_ops=ui.may(session.identity, "ops:request"),
            max_text=MAX_TEXT,
        )

    @r.get("/workflows/new")
    async def new(request: Request) -> Response:
        session = await ui.require(request, "workflow:create")
        return await render(request, session, Draft())

    @r.post("/workflows/new")
    async def submit(request: Request) -> Response:
        session = await ui.require(request, "workflow:create")
        form = await read_form(request)
        draft = Draft.of(form)
        read = await read_workflow(draft, isolated.Limits.of(ui.settings.control_center))
        if isinstance(read, Problem):
            draft.problems.append(read)
            return await render(request, session, draft, status=422)
        spec = read
        if form.get("intent") == "check":
            return await render(request, session, draft, checked=spec)
        try:
            if draft.via_ops:
                await ui.require(request, "ops:request")
                params = spec.model_dump(mode="json", exclude_none=True)
                target = draft.target or workflow_target(spec.name)
                async with ui.backends.keeper(session.token) as keeper:
                    op = await keeper.request_op("workflow.submit", target[:200], params=params)
                query = urlencode({"state": op.get("state", "")})
                return RedirectResponse(f"{prefix}/ops?{query}", status_code=303)
            async with ui.backends.orchestrator(session.token) as orch:
                wf = await orch.submit(spec)
        except ProvisioningError as exc:
            return await render(request, session, draft, status=exc.http_status, error=exc.message)
        return RedirectResponse(f"{prefix}/workflows/{wf['id']}", status_code=303)

    return r
