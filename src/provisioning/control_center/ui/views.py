"""The UI's pages: login (with the TOTP step), logout, the dashboard, the live event stream and
the sections still to come. Workflow pages are in ``workflow_views``."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from provisioning import __version__
from provisioning.control_center.ui.backends import ServiceHealth
from provisioning.control_center.ui.sessions import (
    PRE_COOKIE,
    SESSION_COOKIE,
    clear_cookie,
    set_cookie,
)
from provisioning.core.errors import NotFound, ProvisioningError, RateLimited, Unauthorized

if TYPE_CHECKING:
    from provisioning.control_center.ui.app import WebUI

__all__ = ["build_router", "read_form", "safe_next"]

_COMING: dict[str, tuple[str, str, str]] = {}  # section: (title, action, what is to come)


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as a dict (first value of each field)."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    body = (await request.body()).decode("utf-8", "replace")
    parsed = parse_qs(body, keep_blank_values=True, max_num_fields=200)
    return {k: v[0] for k, v in parsed.items()}


def safe_next(value: str | None, prefix: str) -> str:
    """Where to go after login: a path of the UI, never another site."""
    if (
        not value
        or len(value) > 1000
        or not (value == prefix or value.startswith(prefix + "/"))
        or "//" in value
        or "\\" in value
        or any(ord(c) < 32 for c in value)
    ):
        return prefix + "/"
    return value


def build_router(ui: WebUI) -> APIRouter:
    r = APIRouter()
    prefix = "/ui"

    # ---------------------------------------------------------------- login

    def login_page(
        request: Request,
        nonce: str,
        *,
        status: int = 200,
        error: str = "",
        username: str = "",
        next_url: str | None = None,
    ) -> Response:
        response = ui.page(
            request,
            "login.html",
            None,
            status=status,
            title="Log in",
            csrf=ui.secret.token("login", nonce),
            next=next_url or safe_next(request.query_params.get("next"), prefix),
            error=error,
            username=username,
            active="",
        )
        if request.cookies.get(PRE_COOKIE) != nonce:
            set_cookie(response, PRE_COOKIE, nonce)
        return response

    @r.get("/login")
    async def login_form(request: Request) -> Response:
        if await ui.current(request) is not None:
            return RedirectResponse(safe_next(request.query_params.get("next"), prefix), 303)
        nonce = request.cookies.get(PRE_COOKIE) or ui.sessions.new_nonce()
        if len(nonce) > 64:
            nonce = ui.sessions.new_nonce()
        return login_page(request, nonce)

    def logged_in(doc: dict[str, Any], next_url: str) -> Response:
        response = RedirectResponse(next_url, status_code=303)
        set_cookie(response, SESSION_COOKIE, str(doc["refresh_token"]))
        clear_cookie(response, PRE_COOKIE)
        return response

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = await read_form(request)
        nonce = request.cookies.get(PRE_COOKIE, "")
        username = form.get("username", "").strip()[:64]
        password = form.get("password", "")[:1024]
        next_url = safe_next(form.get("next"), prefix)
        try:
            doc = await ui.sessions.login(request, username, password, None)
        except RateLimited as exc:
            return login_page(
                request, nonce, status=429, error=exc.message, username=username, next_url=next_url
            )
        except Unauthorized as exc:
            if exc.details.get("mfa_required"):
                ui.sessions.hold_for_mfa(nonce, username, password, next_url)
                return RedirectResponse(f"{prefix}/login/mfa", status_code=303)
            return login_page(
                request,
                nonce,
                status=401,
                error="Invalid username or password.",
                username=username,
                next_url=next_url,
            )
        return logged_in(doc, next_url)

    def mfa_page(request: Request, nonce: str, *, status: int = 200, error: str = "") -> Response:
        return ui.page(
            request,
            "mfa.html",
            None,
            status=status,
            title="Verification code",
            csrf=ui.secret.token("login", nonce),
            error=error,
            active="",
        )

    @r.get("/login/mfa")
    async def mfa_form(request: Request) -> Response:
        nonce = request.cookies.get(PRE_COOKIE)
        if ui.sessions.pending(nonce) is None or nonce is None:
            return RedirectResponse(f"{prefix}/login", status_code=303)
        return mfa_page(request, nonce)

    @r.post("/login/mfa")
    async def mfa(request: Request) -> Response:
        form = await read_form(request)
        nonce = request.cookies.get(PRE_COOKIE, "")
        held = ui.sessions.pending(nonce)
        if held is None:
            return RedirectResponse(f"{prefix}/login", status_code=303)
        code = form.get("code", "").strip()[:16]
        try:
            doc = await ui.sessions.login(request, held.username, held.password, code or None)
        except RateLimited as exc:
            ui.sessions.drop_pending(nonce)
            return login_page(request, nonce, status=429, error=exc.message)
        except Unauthorized as exc:
            if not exc.details.get("mfa_required"):  # the password changed meanwhile
                ui.sessions.drop_pending(nonce)
                return RedirectResponse(f"{prefix}/login", status_code=303)
            held.tries += 1
            return mfa_page(request, nonce, status=401, error="That code is not valid.")
        ui.sessions.drop_pending(nonce)
        return logged_in(doc, held.next)

    @r.post("/logout")
    async def logout(request: Request) -> Response:
        session = await ui.current(request)
        if session is not None:
            await ui.sessions.logout(request, session)
        response = RedirectResponse(f"{prefix}/login", status_code=303)
        clear_cookie(response, SESSION_COOKIE)
        return response

    @r.get("/session")
    async def session_check(request: Request) -> Response:
        """204 while the session lives; otherwise the login redirect (the page listens for
        the event stream's ``session-ended`` and asks here)."""
        await ui.require(request, enrolling=True)
        return Response(status_code=204)

    # ---------------------------------------------------------------- dashboard

    @r.get("/")
    async def dashboard(request: Request) -> Response:
        session = await ui.require(request)
        data = await dashboard_data(session)
        return ui.page(
            request,
            "dashboard.html",
            session,
            title="Dashboard",
            active="dashboard",
            data=data,
            names=await owners(data),
        )

    async def dashboard_data(session: Any) -> Any:
        who = session.identity
        if not ui.may(who, "workflow:read"):
            return None
        return await ui.backends.dashboard(session.token, may_read_ops=ui.may(who, "ops:read"))

    @r.get("/dashboard/live")
    async def dashboard_live(request: Request) -> Response:
        session = await ui.require(request)
        data = await dashboard_data(session)
        return ui.page(
            request, "_dashboard_live.html", session, data=data, names=await owners(data)
        )

    async def owners(data: Any) -> dict[str, str]:
        rows = [] if data is None else [*data.running, *data.recent]
        return await ui.usernames(w.get("owner") for w in rows)

    @r.get("/dashboard/health")
    async def dashboard_health(request: Request) -> Response:
        session = await ui.require(request, "system:read")
        overall: dict[str, Any] = {}
        if ui.monitor is not None:
            doc = await ui.monitor.sample()
            services = [ServiceHealth.of_monitor(row) for row in doc.get("services", [])]
            overall = {
                "status": doc.get("status"),
                "reasons": doc.get("reasons") or [],
                "store": (doc.get("stores") or {}).get("state") or {},
                "nats": doc.get("nats") or {},
                "queue_depth": (doc.get("orchestrator") or {}).get("queue_depth"),
            }
        else:
            services = await ui.backends.health(__version__)
        return ui.page(request, "_health.html", session, services=services, overall=overall)

    # ---------------------------------------------------------------- live events

    @r.get("/events")
    async def events(request: Request) -> Response:
        """Server-sent events for the open page: ``workflows`` when the caller's workflows
        changed (and once on connect, so a page that reconnects catches up), ``tick`` every
        few seconds, ``session-ended`` (then the stream ends) once the session is over."""
        session = await ui.current(request)
        interval = ui.events_interval_s

        async def stream() -> AsyncIterator[str]:
            yield "retry: 3000\n\n"
            if session is None:
                yield "event: session-ended\ndata: login\n\n"
                return
            last = ""
            started = time.monotonic()
            ticks = 0
            while time.monotonic() - started < 300:  # the browser reconnects
                current = await ui.sessions.resolve(request)
                if current is None:
                    yield "event: session-ended\ndata: login\n\n"
                    return
                mark = await workflows_mark(current)
                if mark != last:
                    last = mark
                    yield f"event: workflows\ndata: {mark}\n\n"
                if ticks % max(1, round(10 / interval)) == 0:
                    yield f"event: tick\ndata: {ticks}\n\n"
                ticks += 1
                await asyncio.sleep(interval)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def workflows_mark(session: Any) -> str:
        if not ui.may(session.identity, "workflow:read"):
            return "-"
        try:
            async with ui.backends.orchestrator(session.token) as orch:
                rows = await orch.list_workflows(limit=100)
        except ProvisioningError as exc:
            return f"error:{exc.code}"
        digest = hashlib.sha256()
        for wf in rows:
            digest.update(f"{wf['id']}|{wf['status']}|{wf['updated_at']}\n".encode())
        return digest.hexdigest()[:16]

    # ---------------------------------------------------------------- still to come

    @r.get("/{section}")
    async def coming(request: Request, section: str) -> Response:
        await ui.require(request)
        if section not in _COMING:
            raise NotFound(f"there is no page {section!r}")
        title, action, what = _COMING[section]
        session = await ui.require(request, action)
        return ui.page(request, "coming.html", session, title=title, active=section, what=what)

    return r
