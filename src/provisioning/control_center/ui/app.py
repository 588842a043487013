"""Wiring of the web UI: one ASGI app mounted at ``/ui`` of the control center.

Layers, outermost first: security headers on every answer, then the CSRF/origin check of
every state-changing request, then the routes (``views``, ``workflow_views``) and the static
files (``static/``, htmx vendored). Each route finds its session through
:class:`~provisioning.control_center.ui.sessions.SessionManager` and asks the platform's
:class:`~provisioning.core.auth.Guard` (Cedar) for the action it needs, exactly as the JSON API
does; a button is drawn only when :meth:`WebUI.may` says its action would be allowed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from provisioning import __version__
from provisioning.control_center.monitoring import SystemMonitor
from provisioning.control_center.service import IdentityService
from provisioning.control_center.ui.backends import Backends
from provisioning.control_center.ui.security import (
    SECURITY_HEADERS,
    CsrfMiddleware,
    SecurityHeadersMiddleware,
    UiSecret,
)
from provisioning.control_center.ui.sessions import (
    PRE_COOKIE,
    SessionManager,
    UiSession,
    bearer_request,
)
from provisioning.control_center.ui.templating import PREFIX, STATIC_DIR, Templates
from provisioning.control_center.workspace_config import WorkspaceConfig
from provisioning.core.auth import Guard, Identity, _type_of
from provisioning.core.errors import Forbidden, ProvisioningError, Unauthorized
from provisioning.core.logging import get_logger
from provisioning.core.rbac import Resource
from provisioning.core.settings import Settings

__all__ = ["PREFIX", "EnrolmentRequired", "LoginRequired", "NavItem", "WebUI", "mount_ui"]

log = get_logger("control_center.ui")

_UNSET = object()


@dataclass(frozen=True)
class NavItem:
    key: str
    label: str
    path: str
    action: str | None  # what the user must be allowed to read to see it


NAV = (
    NavItem("dashboard", "Dashboard", "/", None),
    NavItem("workflows", "Workflows", "/workflows", "workflow:read"),
    NavItem("operations", "Operations", "/ops", "ops:read"),
    NavItem("infrastructure", "Infrastructure", "/infrastructure", "server:read"),
    NavItem("config", "Config", "/config", "config:read"),
    NavItem("audit", "Audit", "/audit", "audit:read"),
    NavItem("users", "Users", "/users", "user:read"),
    NavItem("system", "System", "/system", "system:read"),
)


class LoginRequired(Exception):
    """The request has no valid session: the answer sends the browser to the login page."""


class EnrolmentRequired(Exception):
    """The session's user must enrol a second factor first (their role requires it, the
    token says ``enrol_mfa``): the answer sends the browser to the account page."""


class WebUI:
    """The UI's state and services; :attr:`app` is what the control center mounts."""

    def __init__(
        self,
        settings: Settings,
        identity: IdentityService,
        guard: Guard,
        *,
        monitor: SystemMonitor | None = None,
        events_interval_s: float = 2.0,
    ) -> None:
        """``monitor``: the control center's system monitor, whose shared sample the
        dashboard shows (without one the UI probes each service's ``/health`` itself)."""
        if guard.authenticator is None:
            raise ValueError("the web UI needs authentication (a Guard with an Authenticator)")
        self.settings = settings
        self.identity = identity
        self.guard = guard
        self.events_interval_s = events_interval_s
        self.secret = UiSecret(settings.home / "keys" / "control-center-ui" / "csrf.key")
        self.sessions = SessionManager(
            identity, guard.authenticator, identity.ring, self.secret.token
        )
        self.monitor = monitor
        ops = monitor is not None and monitor.bus is not None
        self.backends = Backends(settings, ops_services=ops)
        self.templates = Templates(f"{PREFIX}/static")
        self._decisions: dict[tuple[Any, ...], bool] = {}
        self._policies: object = None
        self._names: tuple[float, dict[str, str]] = (0.0, {})
        self.config: WorkspaceConfig | None = None  # set by the control center (config pages)
        self.app = self._build()

    # ------------------------------------------------------------------ sessions and access

    async def current(self, request: Request) -> UiSession | None:
        """The request's session (looked up once per request)."""
        found = getattr(request.state, "ui_session", _UNSET)
        if found is _UNSET:
            found = await self.sessions.resolve(request)
            request.state.ui_session = found
        return found  # type: ignore[return-value]

    async def require(
        self, request: Request, action: str | None = None, *, enrolling: bool = False
    ) -> UiSession:
        """The session, authorized for ``action`` by the platform's guard (Cedar; a denial
        is audited as on the API). A user who must enrol MFA first (``enrol_mfa``) gets only
        the routes that say ``enrolling`` (their account page and its enrolment).

        Raises:
            LoginRequired: no valid session.
            EnrolmentRequired: the user must enrol MFA before using this route.
            Forbidden: the action is not allowed.
        """
        session = await self.current(request)
        if session is None:
            raise LoginRequired()
        if session.identity.enrol_mfa and not enrolling:
            raise EnrolmentRequired()
        if action is not None:
            try:
                await self.guard.check(bearer_request(request, session.token), action)
            except Forbidden:
                raise
            except Unauthorized:
                raise LoginRequired() from None
        return session

    def may(self, who: Identity, action: str, resource: Resource | None = None) -> bool:
        """Would ``action`` be allowed (on ``resource``, else at collection level)? Decides
        which links and buttons are drawn; the server checks again when they are used."""
        if who.enrol_mfa:
            return False
        if resource is not None:
            return self.guard.allows(who, action, resource)
        if self._policies is not self.guard.authorizer.policies:
            self._decisions.clear()
            self._policies = self.guard.authorizer.policies
        key = (who.subject, who.roles, who.scopes, who.mfa, action)
        allowed = self._decisions.get(key)
        if allowed is None:
            kind = _type_of(action)
            own = (
                Resource("User", who.subject)
                if kind == "User"
                else Resource(kind, "__own__", owner=who.subject)
            )
            allowed = self.guard.allows(who, action, Resource.platform()) or self.guard.allows(
                who, action, own
            )
            if len(self._decisions) > 10_000:
                self._decisions.clear()
            self._decisions[key] = allowed
        return allowed

    async def usernames(self, wanted: Iterable[str | None] = ()) -> dict[str, str]:
        """User id → name, to show owners (kept 10 s; 1 s when one of ``wanted`` is new)."""
        at, names = self._names
        age = time.monotonic() - at
        if age > 10 or (age > 1 and any(w and w not in names for w in wanted)):
            names = {u["id"]: u["username"] for u in await self.identity.list_users()}
            self._names = (time.monotonic(), names)
        return names

    def nav(self, who: Identity) -> list[NavItem]:
        return [n for n in NAV if n.action is None or self.may(who, n.action)]

    async def csrf_pairs(self, request: Request) -> list[tuple[str, str]]:
        """The CSRF tokens a state-changing request may carry (see ``security``)."""
        pairs = []
        session = await self.current(request)
        if session is not None:
            pairs.append(("session", session.family))
        path = request.url.path.rstrip("/")
        nonce = request.cookies.get(PRE_COOKIE)
        if nonce and (path.endswith("/login") or path.endswith("/login/mfa")):
            pairs.append(("login", nonce))
        return pairs

    # ------------------------------------------------------------------ pages

    def page(
        self,
        request: Request,
        name: str,
        session: UiSession | None,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> Response:
        who = session.identity if session else None
        return self.templates.page(
            name,
            status=status,
            headers=headers,
            session=session,
            who=who,
            nav=self.nav(who) if who else [],
            prefix=PREFIX,
            version=__version__,
            may=(lambda action, resource=None: who is not None and self.may(who, action, resource)),
            **context,
        )

    async def error_page(self, request: Request, status: int, title: str, message: str) -> Response:
        try:
            session = await self.current(request)
        except ProvisioningError:  # the store is down: the error page still shows
            session = None
        if request.headers.get("hx-request"):
            return self.templates.page("_error.html", status=status, title=title, message=message)
        return self.page(
            request,
            "error.html",
            session,
            status=status,
            title=title,
            message=message,
            active="",
        )

    def _build(self) -> FastAPI:
        from provisioning.control_center.ui.account_views import build_account_router
        from provisioning.control_center.ui.config_views import build_config_ui_router
        from provisioning.control_center.ui.ops_views import build_ops_router
        from provisioning.control_center.ui.submit_views import build_submit_router
        from provisioning.control_center.ui.task_views import build_task_router
        from provisioning.control_center.ui.users_views import build_users_router
        from provisioning.control_center.ui.views import build_router
        from provisioning.control_center.ui.workflow_views import build_workflow_router

        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        app.include_router(build_task_router(self))
        app.include_router(build_submit_router(self))  # before /workflows/{workflow_id}
        app.include_router(build_workflow_router(self))
        app.include_router(build_config_ui_router(self))
        app.include_router(build_ops_router(self))
        app.include_router(build_users_router(self))
        app.include_router(build_account_router(self))
        app.include_router(build_router(self))  # last: it ends with the catch-all /{section}
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
        self._install_error_pages(app)
        app.add_middleware(CsrfMiddleware, secret=self.secret, expected=self.csrf_pairs)
        app.add_middleware(SecurityHeadersMiddleware)
        return app

    def _install_error_pages(self, app: FastAPI) -> None:
        @app.exception_handler(LoginRequired)
        async def _login(request: Request, _exc: LoginRequired) -> Response:
            return login_redirect(request)

        @app.exception_handler(EnrolmentRequired)
        async def _enrol(request: Request, _exc: EnrolmentRequired) -> Response:
            return enrolment_redirect(request)

        @app.exception_handler(ProvisioningError)
        async def _typed(request: Request, exc: ProvisioningError) -> Response:
            if isinstance(exc, Unauthorized) and not isinstance(exc, Forbidden):
                return login_redirect(request)
            titles = {403: "Not allowed", 404: "Not found", 503: "Unavailable"}
            status = exc.http_status
            return await self.error_page(request, status, titles.get(status, "Error"), exc.message)

        @app.exception_handler(StarletteHTTPException)
        async def _http(request: Request, exc: StarletteHTTPException) -> Response:
            title = "Not found" if exc.status_code == 404 else "Error"
            return await self.error_page(request, exc.status_code, title, str(exc.detail))

        @app.exception_handler(RequestValidationError)
        async def _invalid(request: Request, exc: RequestValidationError) -> Response:
            fields = "; ".join(
                f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}"
                for e in exc.errors()
            )
            return await self.error_page(request, 422, "Invalid request", fields[:500])

        @app.exception_handler(Exception)
        async def _unexpected(request: Request, exc: Exception) -> Response:
            log.exception("unhandled error in the web UI", extra={"path": request.url.path})
            response = await self.error_page(
                request, 500, "Internal error", "Something went wrong; the log has the details."
            )
            response.headers.update(SECURITY_HEADERS)  # this answer bypasses the middleware
            return response


def login_redirect(request: Request) -> Response:
    """To the login page, coming back here afterwards (htmx: ``HX-Redirect``)."""
    here = request.url.path
    if request.url.query and request.method == "GET":
        here += "?" + request.url.query
    if request.headers.get("hx-request"):  # back to the page, not to its fragment
        current = urlsplit(request.headers.get("hx-current-url", ""))
        here = current.path + (f"?{current.query}" if current.query else "")
    elif request.method != "GET":
        here = PREFIX + "/"
    if not (here == PREFIX or here.startswith(PREFIX + "/")) or "//" in here:
        here = PREFIX + "/"
    target = f"{PREFIX}/login?next={quote(here, safe='/')}"
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def enrolment_redirect(request: Request) -> Response:
    """To the account page, where the user enrols MFA (htmx: ``HX-Redirect``)."""
    target = f"{PREFIX}/account"
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def mount_ui(
    app: FastAPI,
    settings: Settings,
    identity: IdentityService,
    guard: Guard,
    *,
    monitor: SystemMonitor | None = None,
) -> WebUI:
    """Mount the web UI at ``/ui`` of ``app`` (and send ``/`` there); answer it."""
    ui = WebUI(settings, identity, guard, monitor=monitor)
    app.mount(PREFIX, ui.app, name="ui")

    async def root() -> Response:
        return RedirectResponse(
            f"{PREFIX}/", status_code=303, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"}
        )

    app.add_api_route("/", root, methods=["GET"], include_in_schema=False)
    return ui
