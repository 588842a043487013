"""The operations page (``/ui/ops``): the ops-keeper's pending approvals with approve / reject,
the evaluate-a-request form, the active change freezes with their control, and the history.

Every keeper call is made server-side with the session's own access token, so the keeper checks
Cedar (and its own rules: no self-approval, the approver role, freezes) for that user; the UI
also asks the platform's guard for the route's action first, and draws a control only when
:meth:`WebUI.may` would allow it.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from provisioning.control_center.ui.sessions import UiSession
from provisioning.control_center.ui.views import read_form
from provisioning.core.errors import NotFound, ProvisioningError
from provisioning.ops_keeper.api import OpState

if TYPE_CHECKING:
    from provisioning.control_center.ui.app import WebUI

__all__ = ["STATES", "build_ops_router"]

STATES = [s.value for s in OpState]
HISTORY = 50
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
#: ``?done=`` of the redirect after an action → what the banner says.
DONE = {
    "approved": "Operation approved.",
    "rejected": "Operation rejected.",
    "frozen": "Change freeze started.",
    "lifted": "Change freeze lifted.",
}


def _may_decide(who: Any, op: dict[str, Any]) -> str:
    """Why ``who`` may not approve ``op`` (empty: they may, as far as the UI can tell)."""
    if op.get("requester") == who.subject:
        return "Your own request: another approver must decide it."
    role = op.get("approver_role")
    if role and role not in who.roles and "admin" not in who.roles:
        return f"Needs the {role} role to approve."
    return ""


def build_ops_router(ui: WebUI) -> APIRouter:
    r = APIRouter()
    prefix = "/ui"

    async def render(
        request: Request,
        session: UiSession,
        *,
        status: int = 200,
        error: str = "",
        evaluation: dict[str, Any] | None = None,
        form: dict[str, str] | None = None,
    ) -> Response:
        who = session.identity
        state = request.query_params.get("state", "")
        state = state if state in STATES else ""
        may = {
            "approve": ui.may(who, "ops:approve"),
            "freeze": ui.may(who, "ops:freeze"),
            "request": ui.may(who, "ops:request"),
        }
        problems: list[str] = []
        pending: list[dict[str, Any]] = []
        freezes: list[dict[str, Any]] = []
        history: list[dict[str, Any]] = []
        async with ui.backends.keeper(session.token) as keeper:
            calls = [
                keeper.list_freezes("active"),
                keeper.list_ops(state=state or None, limit=HISTORY),
            ]
            if may["approve"]:
                calls.append(keeper.list_ops(state="pending_approval", limit=100))
            results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ProvisioningError):
                raise result
            if isinstance(result, ProvisioningError) and f"ops-keeper: {result.message}" not in (
                problems
            ):
                problems.append(f"ops-keeper: {result.message}")
        if isinstance(results[0], list):
            freezes = results[0]
        if isinstance(results[1], list):
            history = results[1]
        if len(results) > 2 and isinstance(results[2], list):
            pending = [{**op, "refusal": _may_decide(who, op)} for op in results[2]]
        done = request.query_params.get("done", "")
        return ui.page(
            request,
            "ops/ops.html",
            session,
            status=status,
            title="Operations",
            active="operations",
            may_do=may,
            pending=pending,
            freezes=freezes,
            history=history,
            states=STATES,
            state=state,
            problems=problems,
            error=error,
            done=DONE.get(done, ""),
            evaluation=evaluation,
            form=form or {},
            history_limit=HISTORY,
        )

    @r.get("/ops")
    async def ops_page(request: Request) -> Response:
        session = await ui.require(request, "ops:read")
        return await render(request, session)

    @r.get("/operations")
    async def operations(request: Request) -> Response:  # the nav's former address
        await ui.require(request, "ops:read")
        return RedirectResponse(f"{prefix}/ops", status_code=303)

    def back(done: str, request: Request) -> Response:
        query = {"done": done}
        state = request.query_params.get("state", "")
        if state in STATES:
            query["state"] = state
        return RedirectResponse(f"{prefix}/ops?{urlencode(query)}", status_code=303)

    async def refused(request: Request, session: UiSession, exc: ProvisioningError) -> Response:
        return await render(request, session, status=exc.http_status, error=exc.message)

    @r.post("/ops/{op_id}/{verdict}")
    async def decide(request: Request, op_id: str, verdict: str) -> Response:
        if verdict not in ("approve", "reject") or not _ID.fullmatch(op_id):
            raise NotFound(f"there is no action {verdict!r}")
        session = await ui.require(request, "ops:approve")
        form = await read_form(request)
        reason = form.get("reason", "").strip()
        if not reason:
            return await render(
                request, session, status=422, error=f"Give a reason to {verdict} the operation."
            )
        try:
            async with ui.backends.keeper(session.token) as keeper:
                call = keeper.approve if verdict == "approve" else keeper.reject
                await call(op_id, reason[:500])
        except ProvisioningError as exc:
            return await refused(request, session, exc)
        return back("approved" if verdict == "approve" else "rejected", request)

    @r.post("/ops/evaluate")
    async def evaluate(request: Request) -> Response:
        session = await ui.require(request, "ops:request")
        form = await read_form(request)
        fields = {k: form.get(k, "").strip() for k in ("op_type", "target", "image", "params")}
        try:
            params = json.loads(fields["params"]) if fields["params"] else {}
        except ValueError as exc:
            return await render(
                request, session, status=422, error=f"params: not JSON ({exc})", form=fields
            )
        if not isinstance(params, dict):
            return await render(
                request, session, status=422, error="params: must be a JSON object", form=fields
            )
        try:
            async with ui.backends.keeper(session.token) as keeper:
                result = await keeper.evaluate(
                    fields["op_type"],
                    fields["target"],
                    image=fields["image"] or None,
                    params=params,
                )
        except ProvisioningError as exc:
            return await render(
                request, session, status=exc.http_status, error=exc.message, form=fields
            )
        return await render(request, session, evaluation=result, form=fields)

    @r.post("/ops/freeze")
    async def freeze(request: Request) -> Response:
        session = await ui.require(request, "ops:freeze")
        form = await read_form(request)
        reason = form.get("reason", "").strip()
        scope = form.get("scope", "").strip() or "*"
        until_text = form.get("until", "").strip()
        if not reason:
            return await render(request, session, status=422, error="Give a reason for the freeze.")
        until = None
        if until_text:
            try:
                until = datetime.fromisoformat(until_text)
            except ValueError:
                return await render(
                    request, session, status=422, error=f"until: not a date and time: {until_text}"
                )
            if until.tzinfo is None:
                until = until.replace(tzinfo=UTC)
        try:
            async with ui.backends.keeper(session.token) as keeper:
                await keeper.freeze(reason[:500], scope=scope[:200], until=until)
        except ProvisioningError as exc:
            return await refused(request, session, exc)
        return back("frozen", request)

    @r.post("/ops/freeze/{freeze_id}/lift")
    async def lift(request: Request, freeze_id: str) -> Response:
        if not _ID.fullmatch(freeze_id):
            raise NotFound(f"freeze {freeze_id} not found")
        session = await ui.require(request, "ops:freeze")
        try:
            async with ui.backends.keeper(session.token) as keeper:
                await keeper.unfreeze(freeze_id)
        except ProvisioningError as exc:
            return await refused(request, session, exc)
        return back("lifted", request)

    return r
