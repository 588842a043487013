"""Config pages: the workspaces and their Nickel files, one file's editor (validate in place,
review the diff, save with a message and the sha256 read, so a concurrent edit is a clear
conflict), its history (view, diff, restore). Also registers the audit pages (``audit_views``).

Everything goes through the control center's own :class:`WorkspaceConfig` (the object behind
``/config/workspaces``): ``config:read`` to look and validate, ``config:write`` to save and
restore, both asked of Cedar on the platform and then on ``Workspace::"<id>"``, as the API does.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from provisioning.control_center.routes import actor_of
from provisioning.control_center.ui.audit_views import build_audit_router
from provisioning.control_center.ui.sessions import UiSession
from provisioning.control_center.ui.views import read_form
from provisioning.control_center.workspace_config import MAX_CONTENT_CHARS, WorkspaceConfig
from provisioning.core.errors import Conflict, NotFound, ValidationError
from provisioning.core.rbac import Resource

if TYPE_CHECKING:
    from provisioning.control_center.ui.app import WebUI

__all__ = ["build_config_ui_router", "unified_diff"]

_SHA = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"\d{1,9}")


def unified_diff(old: str, new: str, path: str, old_label: str, new_label: str) -> str:
    lines = difflib.unified_diff(
        old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile=f"a/{path} ({old_label})",
        tofile=f"b/{path} ({new_label})",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def diff_lines(diff: str) -> list[tuple[str, str]]:
    """A unified diff as (css class, line) pairs for the template."""
    out = []
    for line in diff.splitlines():
        if line.startswith(("+++", "---")):
            kind = "head"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = "ctx"
        out.append((kind, line))
    return out


def annotate(diags: list[dict[str, Any]], path: str, content: str) -> list[dict[str, Any]]:
    """Each diagnostic with the text of its line when it is in the edited file."""
    lines = content.splitlines()
    out = []
    for d in diags:
        doc = dict(d)
        line = d.get("line")
        if d.get("file") == path and isinstance(line, int) and 1 <= line <= len(lines):
            doc["source"] = lines[line - 1]
        out.append(doc)
    return out


def _content(form: dict[str, str]) -> str:
    # Browsers send a textarea's line breaks as CRLF.
    content = form.get("content", "").replace("\r\n", "\n")
    if len(content) > MAX_CONTENT_CHARS:
        raise ValidationError(f"content over {MAX_CONTENT_CHARS} characters", field="content")
    return content


def _sha(form: dict[str, str]) -> str | None:
    sha = form.get("expected_sha256", "")
    return sha if _SHA.fullmatch(sha) else None


def build_config_ui_router(ui: WebUI) -> APIRouter:
    r = APIRouter()
    r.include_router(build_audit_router(ui))

    def cfg() -> WorkspaceConfig:
        if ui.config is None:
            raise NotFound("configuration management is not set up here")
        return ui.config

    async def allowed(request: Request, action: str, ws: str) -> UiSession:
        """The session, allowed ``action`` on the platform and on the workspace."""
        session = await ui.require(request, action)
        cfg().root(ws)  # 404 for a workspace not managed here
        await ui.guard.check_object(request, session.identity, action, Resource("Workspace", ws))
        return session

    def may_write(session: UiSession, ws: str) -> bool:
        return ui.may(session.identity, "config:write", Resource("Workspace", ws))

    # ---------------------------------------------------------------- workspaces

    @r.get("/config")
    async def workspaces(request: Request) -> Response:
        session = await ui.require(request, "config:read")
        c = cfg() if ui.config is not None else None
        rows: list[dict[str, Any]] = []
        for w in c.list_workspaces() if c else []:
            if not ui.may(session.identity, "config:read", Resource("Workspace", w["id"])):
                continue
            try:
                files = await c.list_files(w["id"]) if c else []
                problem = ""
            except NotFound as exc:
                files, problem = [], exc.message
            rows.append({**w, "files": files, "problem": problem})
        return ui.page(
            request,
            "config/workspaces.html",
            session,
            title="Config",
            active="config",
            workspaces=rows,
            configured=c is not None,
        )

    # ---------------------------------------------------------------- one file

    async def editor(
        request: Request,
        session: UiSession,
        ws: str,
        path: str,
        *,
        status: int = 200,
        content: str | None = None,
        expected: str | None = None,
        diagnostics: list[dict[str, Any]] | None = None,
        error: str = "",
        conflict: str = "",
        saved: str = "",
    ) -> Response:
        c = cfg()
        doc = await c.read(ws, path)
        history = await c.history(ws, path)
        text = doc["content"] if content is None else content
        return ui.page(
            request,
            "config/editor.html",
            session,
            status=status,
            title=doc["path"],
            active="config",
            ws=ws,
            doc=doc,
            text=text,
            expected=expected or doc["sha256"],
            history=history,
            writable=may_write(session, ws),
            diagnostics=None if diagnostics is None else annotate(diagnostics, doc["path"], text),
            error=error,
            conflict=conflict,
            saved=saved,
        )

    @r.get("/config/{ws}/edit/{path:path}")
    async def edit(request: Request, ws: str, path: str) -> Response:
        session = await allowed(request, "config:read", ws)
        saved = request.query_params.get("saved", "")
        return await editor(
            request, session, ws, path, saved=saved if _VERSION.fullmatch(saved) else ""
        )

    @r.post("/config/{ws}/validate/{path:path}")
    async def validate(request: Request, ws: str, path: str) -> Response:
        session = await allowed(request, "config:read", ws)
        content = _content(await read_form(request))
        res = await cfg().validate(ws, path, content)
        return ui.page(
            request,
            "config/_diagnostics.html",
            session,
            checked=True,
            valid=res["valid"],
            diagnostics=annotate(res["diagnostics"], res["path"], content),
        )

    @r.post("/config/{ws}/review/{path:path}")
    async def review(request: Request, ws: str, path: str) -> Response:
        """The diff of the edit against the file as it is now, and the save form."""
        session = await allowed(request, "config:write", ws)
        form = await read_form(request)
        content = _content(form)
        current = await cfg().read(ws, path)
        diff = unified_diff(
            current["content"], content, current["path"], f"v{current['version']}", "your edit"
        )
        return ui.page(
            request,
            "config/_review.html",
            session,
            diff=diff_lines(diff),
            stale=_sha(form) != current["sha256"],
            current=current,
        )

    @r.post("/config/{ws}/save/{path:path}")
    async def save(request: Request, ws: str, path: str) -> Response:
        session = await allowed(request, "config:write", ws)
        form = await read_form(request)
        content, expected = _content(form), _sha(form)
        message = form.get("message", "").strip()[:1000]
        keep: dict[str, Any] = {"content": content, "expected": expected}
        if not message:
            error = "Say why: a message is needed."
            return await editor(request, session, ws, path, status=422, error=error, **keep)
        try:
            doc = await cfg().write(
                ws, path, content, expected, message, actor_of(request, session.identity)
            )
        except Conflict as exc:
            why = exc.message
            return await editor(request, session, ws, path, status=409, conflict=why, **keep)
        except ValidationError as exc:
            diags = exc.details.get("diagnostics")
            if diags is None:
                raise
            return await editor(
                request,
                session,
                ws,
                path,
                status=422,
                error="Not saved: the edit brings the problems below.",
                diagnostics=diags,
                **keep,
            )
        return RedirectResponse(
            f"/ui/config/{ws}/edit/{doc['path']}?saved={doc['version']}", status_code=303
        )

    # ---------------------------------------------------------------- history

    @r.get("/config/{ws}/versions/{n}/{path:path}")
    async def version(request: Request, ws: str, n: int, path: str) -> Response:
        session = await allowed(request, "config:read", ws)
        c = cfg()
        doc = await c.version(ws, path, n)
        current = await c.read(ws, path)
        prev = await c.diff(ws, path, max(n - 1, 0), n) if n > 0 else None
        now = unified_diff(
            doc["content"], current["content"], doc["path"], f"v{n}", f"v{current['version']}"
        )
        return ui.page(
            request,
            "config/version.html",
            session,
            title=f"{doc['path']} v{n}",
            active="config",
            ws=ws,
            v=doc,
            current=current,
            prev=diff_lines(prev["diff"]) if prev else None,
            to_current=diff_lines(now),
            writable=may_write(session, ws),
        )

    @r.post("/config/{ws}/restore/{path:path}")
    async def restore(request: Request, ws: str, path: str) -> Response:
        session = await allowed(request, "config:write", ws)
        form = await read_form(request)
        n = form.get("version", "")
        if not _VERSION.fullmatch(n):
            raise ValidationError("version: a version number", field="version")
        try:
            doc = await cfg().restore(
                ws,
                path,
                int(n),
                _sha(form),
                form.get("message", "").strip()[:1000],
                actor_of(request, session.identity),
            )
        except (Conflict, ValidationError) as exc:
            return await editor(
                request,
                session,
                ws,
                path,
                status=exc.http_status,
                conflict=exc.message if isinstance(exc, Conflict) else "",
                error="" if isinstance(exc, Conflict) else f"Not restored: {exc.message}",
                diagnostics=exc.details.get("diagnostics"),
            )
        return RedirectResponse(
            f"/ui/config/{ws}/edit/{doc['path']}?saved={doc['version']}", status_code=303
        )

    return r
