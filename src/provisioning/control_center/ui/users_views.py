"""Users, roles and API keys (``/ui/users``, ``/ui/users/keys``) and the system page
(``/ui/system``).

The identity operations run in-process on the control center's
:class:`~provisioning.control_center.service.IdentityService`, exactly as its JSON routes call
them: the same Cedar action first (``user:read`` / ``user:manage`` / ``apikey:manage``, asked of
the platform's guard with the session's identity), the same service call with the session's
identity as the actor, so the audit log names the user. A new API key's secret is shown once:
the creating request parks it in memory under a one-time ticket bound to the session, the page it
redirects to takes it out (a reload finds nothing); it never enters a URL, a log or the store.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from provisioning import __version__
from provisioning.control_center.routes import actor_of
from provisioning.control_center.ui.backends import ServiceHealth
from provisioning.control_center.ui.infra_views import build_infra_router
from provisioning.control_center.ui.sessions import UiSession
from provisioning.core.errors import NotFound, ProvisioningError, ValidationError
from provisioning.core.rbac import ACTIONS, ROLES, Principal, Resource

if TYPE_CHECKING:
    from provisioning.control_center.ui.app import WebUI

__all__ = ["EXPIRIES", "build_users_router", "roles_table"]

#: Expiry choices of a new API key (days; "" = never).
EXPIRIES = {"": "never", "1": "1 day", "7": "7 days", "30": "30 days", "90": "90 days",
            "365": "1 year"}  # fmt: skip
USER_CHANGES = ("disable", "enable", "roles")
_TICKET_TTL_S = 120.0
_KEY_ID = 64


async def read_multi_form(request: Request) -> dict[str, list[str]]:
    """An URL-encoded body with every value of each field (checkbox groups)."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    body = (await request.body()).decode("utf-8", "replace")
    return parse_qs(body, keep_blank_values=True, max_num_fields=300)


def _first(form: dict[str, list[str]], name: str, limit: int = 200) -> str:
    return (form.get(name) or [""])[0][:limit]


def _uptime(row: dict[str, Any]) -> str:
    secs = row.get("uptime_s")
    if not isinstance(secs, int | float):
        return "\u2013"
    if secs < 3600:
        return f"{int(secs // 60)} min"
    if secs < 86400:
        return f"{int(secs // 3600)} h {int(secs % 3600 // 60)} min"
    return f"{int(secs // 86400)} d {int(secs % 86400 // 3600)} h"


def roles_table(ui: WebUI) -> list[dict[str, Any]]:
    """Every role with what it may do (as ``GET /roles`` answers)."""
    authorizer = ui.identity.authorizer
    out = []
    for name, desc in ROLES.items():
        p = Principal(f"role-probe-{name}", roles=frozenset({name}))
        allowed = [
            a
            for a in ACTIONS
            if authorizer.decide(p, a, Resource.platform()).allowed
            or authorizer.decide(p, a, Resource("Workflow", "x", owner=p.user_id)).allowed
        ]
        out.append({"name": name, "description": desc, "actions": allowed})
    return out


class _OnceBox:
    """New API keys waiting to be shown once: ticket → (session family, deadline, document)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, float, dict[str, Any]]] = {}

    def put(self, family: str, doc: dict[str, Any]) -> str:
        now = time.monotonic()
        self._held = {k: v for k, v in self._held.items() if v[1] > now}
        ticket = secrets.token_urlsafe(18)
        self._held[ticket] = (family, now + _TICKET_TTL_S, doc)
        return ticket

    def take(self, family: str, ticket: str) -> dict[str, Any] | None:
        held = self._held.get(ticket)
        if held is None or held[0] != family:
            return None
        del self._held[ticket]
        return held[2] if held[1] > time.monotonic() else None


def build_users_router(ui: WebUI) -> APIRouter:
    r = APIRouter()
    r.include_router(build_infra_router(ui))
    prefix = "/ui"
    once = _OnceBox()

    # ---------------------------------------------------------------- users and roles

    async def users_page(
        request: Request, session: UiSession, *, status: int = 200, error: str = "", done: str = ""
    ) -> Response:
        who = session.identity
        rows = [
            u
            for u in await ui.identity.list_users()
            if ui.guard.allows(who, "user:read", Resource("User", u["id"]))
        ]
        return ui.page(
            request,
            "users/users.html",
            session,
            status=status,
            title="Users",
            active="users",
            users=rows,
            roles=roles_table(ui),
            role_names=list(ROLES),
            manage=ui.may(who, "user:manage"),
            error=error,
            done=done,
        )

    @r.get("/users")
    async def users(request: Request) -> Response:
        session = await ui.require(request, "user:read")
        done = request.query_params.get("done", "")
        known = {"created", "disabled", "enabled", "roles"}
        return await users_page(request, session, done=done if done in known else "")

    @r.post("/users")
    async def create_user(request: Request) -> Response:
        session = await ui.require(request, "user:manage")
        form = await read_multi_form(request)
        username = _first(form, "username", 64).strip()
        password = _first(form, "password", 4096)
        roles = [x for x in form.get("roles", []) if x][:20]
        try:
            await ui.identity.create_user(
                username, password, roles, actor_of(request, session.identity)
            )
        except ProvisioningError as exc:
            if exc.http_status >= 500:
                raise
            return await users_page(request, session, status=exc.http_status, error=exc.message)
        return RedirectResponse(f"{prefix}/users?done=created", status_code=303)

    @r.post("/users/{user_id}/{change}")
    async def change_user(request: Request, user_id: str, change: str) -> Response:
        if change not in USER_CHANGES or len(user_id) > _KEY_ID:
            raise NotFound(f"there is no action {change!r}")
        session = await ui.require(request, "user:manage")
        form = await read_multi_form(request)
        actor = actor_of(request, session.identity)
        try:
            uid = await ui.identity.find_user_id(user_id)
            if change == "roles":
                roles = [x for x in form.get("roles", []) if x][:20]
                await ui.identity.update_user(uid, actor, roles=roles)
            else:
                if change == "disable" and uid == session.identity.subject:
                    raise ValidationError("you cannot disable yourself")
                await ui.identity.update_user(uid, actor, disabled=change == "disable")
        except ProvisioningError as exc:
            if exc.http_status >= 500 or isinstance(exc, NotFound):
                raise
            return await users_page(request, session, status=exc.http_status, error=exc.message)
        done = {"disable": "disabled", "enable": "enabled", "roles": "roles"}[change]
        return RedirectResponse(f"{prefix}/users?done={done}", status_code=303)

    # ---------------------------------------------------------------- API keys

    async def keys_page(
        request: Request,
        session: UiSession,
        *,
        status: int = 200,
        error: str = "",
        new_key: dict[str, Any] | None = None,
        done: str = "",
    ) -> Response:
        who = session.identity
        everyone = ui.may(who, "apikey:admin")
        keys = await ui.identity.list_api_keys(None if everyone else who.subject)
        now = datetime.now(UTC)
        for k in keys:
            expired = k["expires_at"] is not None and k["expires_at"] <= now
            k["state"] = "revoked" if k["revoked_at"] else ("expired" if expired else "active")
        names = await ui.usernames(k["user_id"] for k in keys)
        return ui.page(
            request,
            "users/keys.html",
            session,
            status=status,
            title="API keys",
            active="users",
            keys=keys,
            names=names,
            everyone=everyone,
            scopes=[a for a in ACTIONS if ui.may(who, a)],
            expiries=EXPIRIES,
            can_create=who.kind != "apikey",
            new_key=new_key,
            error=error,
            done=done,
        )

    @r.get("/users/keys")
    async def keys(request: Request) -> Response:
        session = await ui.require(request, "apikey:manage")
        ticket = request.query_params.get("created", "")[:64]
        new_key = once.take(session.family, ticket) if ticket else None
        done = "revoked" if request.query_params.get("done") == "revoked" else ""
        return await keys_page(request, session, new_key=new_key, done=done)

    @r.post("/users/keys")
    async def create_key(request: Request) -> Response:
        session = await ui.require(request, "apikey:manage")
        form = await read_multi_form(request)
        name = _first(form, "name", 101).strip()
        scopes = [s for s in form.get("scopes", []) if s][:64]
        expiry = _first(form, "expires_in_days", 8)
        try:
            if not name or len(name) > 100:
                raise ValidationError("a key needs a name of 1 to 100 characters", field="name")
            if expiry not in EXPIRIES:
                raise ValidationError("choose an expiry from the list", field="expires_in_days")
            doc = await ui.identity.create_api_key(
                session.identity,
                name,
                scopes,
                float(expiry) if expiry else None,
                actor_of(request, session.identity),
            )
        except ProvisioningError as exc:
            if exc.http_status >= 500:
                raise
            return await keys_page(request, session, status=exc.http_status, error=exc.message)
        ticket = once.put(session.family, doc)
        return RedirectResponse(f"{prefix}/users/keys?created={ticket}", status_code=303)

    @r.post("/users/keys/{key_id}/revoke")
    async def revoke_key(request: Request, key_id: str) -> Response:
        session = await ui.require(request, "apikey:manage")
        who = session.identity
        if len(key_id) > _KEY_ID:
            raise NotFound(f"API key {key_id} not found")
        key = await ui.identity.get_api_key(key_id)
        if key["user_id"] != who.subject and not ui.may(who, "apikey:admin"):
            raise NotFound(f"API key {key_id} not found")
        await ui.identity.revoke_api_key(key_id, actor_of(request, who))
        if ui.guard.authenticator is not None:
            ui.guard.authenticator.forget_key(key_id)
        return RedirectResponse(f"{prefix}/users/keys?done=revoked", status_code=303)

    # ---------------------------------------------------------------- system

    async def system_data() -> dict[str, Any]:
        if ui.monitor is None:
            services = await ui.backends.health(__version__)
            return {"doc": None, "services": services, "uptimes": ["\u2013"] * len(services)}
        doc = await ui.monitor.sample()
        rows = doc.get("services", [])
        services = [ServiceHealth.of_monitor(row) for row in rows]
        return {"doc": doc, "services": services, "uptimes": [_uptime(r) for r in rows]}

    @r.get("/system")
    async def system(request: Request) -> Response:
        session = await ui.require(request, "system:read")
        return ui.page(
            request,
            "users/system.html",
            session,
            title="System",
            active="system",
            **await system_data(),
        )

    @r.get("/system/live")
    async def system_live(request: Request) -> Response:
        session = await ui.require(request, "system:read")
        return ui.page(request, "users/_system_live.html", session, **await system_data())

    return r
