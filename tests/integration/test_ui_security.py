"""Security of the web UI, in-process against the embedded platform (SQLite and PostgreSQL).

The session cookie's attributes; the security headers of every UI answer; every state-changing
UI route refused (403, nothing changed) without its session's CSRF token, with another
session's token, and from another site; the cookie authenticating nothing of the JSON API;
sessions ending with logout and with the user's disabling; the TOTP step of a login; a viewer
seeing no control button and a forged control request refused by Cedar.
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from starlette.requests import Request
from starlette.routing import Mount, Route

from provisioning.control_center.app import ControlCenterService
from provisioning.control_center.ui.security import CSP
from provisioning.control_center.ui.sessions import SESSION_COOKIE
from provisioning.core.settings import load_settings
from provisioning.orchestrator.app import OrchestratorService
from provisioning.platform.embedded import build_services
from tests.conftest import free_port

ADMIN_PASSWORD = "admin passphrase for the ui"
USER_PASSWORD = "user passphrase for the ui"
BASE = "https://cc.test"
SLOW = {"name": "slow", "tasks": [{"name": "wait", "action": "sleep", "args": {"seconds": 60}}]}
HEADERS = {
    "content-security-policy": CSP,
    "strict-transport-security": "max-age=63072000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}
SAME_SITE = {"Origin": BASE, "Sec-Fetch-Site": "same-origin"}


class Browser:
    """A browser of the UI: its own cookie jar, same-origin headers like a real one."""

    def __init__(self, cc: ControlCenterService) -> None:
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=cc.app), base_url=BASE)
        self.csrf = ""

    async def get(self, path: str, **headers: str) -> httpx.Response:
        resp = await self.http.get(path, headers=headers)
        found = re.search(r'<meta name="csrf-token" content="([^"]+)"', resp.text)
        if found:
            self.csrf = html.unescape(found.group(1))
        return resp

    async def post(
        self, path: str, data: dict[str, str] | None = None, **headers: str
    ) -> httpx.Response:
        return await self.http.post(path, data=data or {}, headers={**SAME_SITE, **headers})

    async def login(self, username: str, password: str) -> httpx.Response:
        page = await self.get("/ui/login")
        token = form_token(page)
        resp = await self.post(
            "/ui/login", {"username": username, "password": password, "csrf_token": token}
        )
        if resp.headers.get("location") == "/ui/":
            await self.get("/ui/")
        return resp

    @property
    def session(self) -> str | None:
        return self.http.cookies.get(SESSION_COOKIE)


def form_token(page: httpx.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, page.text
    return html.unescape(found.group(1))


@dataclass
class Platform:
    cc: ControlCenterService
    orchestrator: OrchestratorService
    api: httpx.AsyncClient  # the control center's JSON API
    orch: httpx.AsyncClient
    admin: dict[str, str]
    stack: AsyncExitStack

    async def browser(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> Browser:
        b = Browser(self.cc)
        await self.stack.enter_async_context(b.http)
        if username:
            resp = await b.login(username, password)
            assert resp.status_code == 303 and b.session, resp.text
        return b

    async def user(self, username: str, role: str) -> str:
        resp = await self.api.post(
            "/users",
            headers=self.admin,
            json={"username": username, "password": USER_PASSWORD, "roles": [role]},
        )
        assert resp.status_code == 201, resp.text
        return str(resp.json()["data"]["id"])

    async def workflow(self, spec: dict[str, Any] = SLOW) -> dict[str, Any]:
        resp = await self.orch.post("/workflows", headers=self.admin, json=spec)
        assert resp.status_code == 201, resp.text
        return dict(resp.json()["data"])

    async def status(self, wf_id: str) -> dict[str, Any]:
        resp = await self.orch.get(f"/workflows/{wf_id}", headers=self.admin)
        return dict(resp.json()["data"])


@pytest.fixture
async def platform(tmp_path: Path, state_url: str) -> AsyncIterator[Platform]:
    async with start_platform(tmp_path, state_url) as p:
        yield p


@asynccontextmanager
async def start_platform(
    tmp_path: Path, state_url: str, **control_center: Any
) -> AsyncIterator[Platform]:
    """The embedded platform, ``control_center`` settings added to the test's own."""
    settings = load_settings(
        home=tmp_path / "home",
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
            "orchestrator": {"poll_interval_s": 0.05, "port": free_port()},
            "control_center": {
                "admin_password": ADMIN_PASSWORD,
                "port": free_port(),
                **control_center,
            },
        },
    )
    cc, services = build_services(settings)
    orchestrator = services[1]
    assert isinstance(orchestrator, OrchestratorService)
    async with AsyncExitStack() as stack:
        for svc in services:
            await svc.start()
        stack.push_async_callback(cc.stop)  # last: it owns the shared store
        stack.push_async_callback(orchestrator.stop, kill_running=True)
        # The UI calls the orchestrator in-process instead of over HTTP.
        cc.ui.backends.transports["orchestrator"] = httpx.ASGITransport(app=orchestrator.app)
        api = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=cc.app), base_url="http://cc")
        )
        orch = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=orchestrator.app), base_url="http://orch"
            )
        )
        login = await api.post(
            "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        admin = {"Authorization": f"Bearer {login.json()['data']['access_token']}"}
        yield Platform(cc, orchestrator, api, orch, admin, stack)


def set_cookie_headers(resp: httpx.Response, name: str) -> list[str]:
    return [h for h in resp.headers.get_list("set-cookie") if h.startswith(f"{name}=")]


async def works(b: Browser) -> bool:
    """Whether the browser's session still opens the dashboard."""
    resp = await b.get("/ui/")
    return resp.status_code == 200


# ---------------------------------------------------------------------- cookie and headers


async def test_login_sets_a_host_only_secure_httponly_lax_cookie_holding_no_access_token(
    platform: Platform,
) -> None:
    b = await platform.browser("")
    page = await b.get("/ui/login")
    resp = await b.post(
        "/ui/login",
        {"username": "admin", "password": ADMIN_PASSWORD, "csrf_token": form_token(page)},
    )
    assert resp.status_code == 303
    [cookie] = set_cookie_headers(resp, SESSION_COOKIE)
    name_value, *attributes = [part.strip() for part in cookie.split(";")]
    attrs = {a.split("=")[0].lower(): [*a.split("=", 1), ""][1] for a in attributes}
    assert set(attrs) == {"httponly", "path", "samesite", "secure"}, cookie
    assert attrs["path"] == "/" and attrs["samesite"].lower() == "lax"
    value = name_value.split("=", 1)[1]
    assert len(value) >= 40 and value.count(".") == 0  # an opaque secret, not a JWT
    dashboard = await b.get("/ui/")
    assert dashboard.status_code == 200
    assert "eyJ" not in dashboard.text  # no token (JWT) anywhere in the page


async def test_every_ui_answer_carries_the_security_headers(platform: Platform) -> None:
    p = platform
    wf = await p.workflow()
    anonymous = await p.browser("")
    b = await p.browser()
    answers = [
        await anonymous.http.get("/"),
        await anonymous.get("/ui/login"),
        await anonymous.get("/ui/login/mfa"),
        await anonymous.get("/ui/workflows"),
        await anonymous.post("/ui/logout"),  # refused: no token
        await b.get("/ui/"),
        await b.get("/ui/dashboard/live"),
        await b.get("/ui/dashboard/health"),
        await b.get("/ui/workflows?state=Running"),
        await b.get("/ui/workflows/rows"),
        await b.get(f"/ui/workflows/{wf['id']}"),
        await b.get(f"/ui/workflows/{wf['id']}/live"),
        await b.get("/ui/workflows/wf_does_not_exist"),
        await b.get("/ui/operations"),
        await b.get("/ui/system"),
        await b.get("/ui/no-such-page"),
        await b.get("/ui/static/app.css"),
        await b.get("/ui/static/vendor/htmx-2.0.11.min.js"),
        await b.get("/ui/session"),
    ]
    for resp in answers:
        for name, value in HEADERS.items():
            assert resp.headers.get(name) == value, (resp.request.url, name, resp.headers)
        if "/static/" not in resp.request.url.path:
            assert resp.headers.get("cache-control") == "no-store", resp.request.url
    pages = [r for r in answers if r.headers.get("content-type", "").startswith("text/html")]
    for resp in pages:  # the CSP would block them anyway: none is written
        assert "<style" not in resp.text and " style=" not in resp.text, resp.request.url
        assert not re.search(r"<script(?![^>]*\bsrc=)", resp.text), resp.request.url
        assert not re.search(r"\son[a-z]+=", resp.text), resp.request.url


# ---------------------------------------------------------------------- CSRF


def routes_of(routes: Any) -> Iterator[Route]:
    """Every route, into included routers (FastAPI keeps them apart, unflattened)."""
    for route in routes:
        if isinstance(route, Route):
            yield route
        inner = getattr(route, "original_router", None)  # FastAPI >= 0.16x: included router
        if inner is not None:
            yield from routes_of(inner.routes)


def state_changing_routes(cc: ControlCenterService) -> set[tuple[str, str]]:
    mounted = [r for r in cc.app.routes if isinstance(r, Mount) and r.path == "/ui"]
    assert [m.app for m in mounted] == [cc.ui.app]
    out = set()
    for route in routes_of(cc.ui.app.routes):
        for method in (route.methods or set()) - {"GET", "HEAD"}:
            out.add((method, "/ui" + route.path))
    return out


async def test_every_state_changing_route_refuses_a_missing_foreign_or_cross_site_token(
    platform: Platform,
) -> None:
    p = platform
    # Every POST route of the UI is listed here: a new one must join the test.
    assert state_changing_routes(p.cc) == {
        ("POST", "/ui/login"),
        ("POST", "/ui/login/mfa"),
        ("POST", "/ui/logout"),
        ("POST", "/ui/workflows/{workflow_id}/{button}"),
        ("POST", "/ui/workflows/new"),
        ("POST", "/ui/ops/{op_id}/{verdict}"),
        ("POST", "/ui/ops/evaluate"),
        ("POST", "/ui/ops/freeze"),
        ("POST", "/ui/ops/freeze/{freeze_id}/lift"),
        ("POST", "/ui/users"),
        ("POST", "/ui/users/{user_id}/{change}"),
        ("POST", "/ui/users/keys"),
        ("POST", "/ui/users/keys/{key_id}/revoke"),
        ("POST", "/ui/config/{ws}/validate/{path:path}"),
        ("POST", "/ui/config/{ws}/review/{path:path}"),
        ("POST", "/ui/config/{ws}/save/{path:path}"),
        ("POST", "/ui/config/{ws}/restore/{path:path}"),
        ("POST", "/ui/account/mfa"),
        ("POST", "/ui/account/mfa/confirm"),
    }
    wf = await p.workflow()
    victim = await p.browser()
    await p.user("mallory", "operator")
    attacker = await p.browser("mallory", USER_PASSWORD)
    stranger = await p.browser("")
    login_page = await stranger.get("/ui/login")
    login_token = form_token(login_page)
    attempts = {
        "/ui/logout": {},
        f"/ui/workflows/{wf['id']}/cancel": {},
        f"/ui/workflows/{wf['id']}/pause": {},
        "/ui/workflows/new": {"format": "json", "text": json.dumps(SLOW), "intent": "submit"},
        "/ui/login": {"username": "admin", "password": ADMIN_PASSWORD},
        "/ui/login/mfa": {"code": "123456"},
        "/ui/ops/00000000-0000-4000-8000-000000000000/approve": {"reason": "forged"},
        "/ui/ops/00000000-0000-4000-8000-000000000000/reject": {"reason": "forged"},
        "/ui/ops/evaluate": {"op_type": "server.delete", "target": "prod/x"},
        "/ui/ops/freeze": {"reason": "forged", "scope": "*"},
        "/ui/ops/freeze/00000000-0000-4000-8000-000000000000/lift": {},
        "/ui/users": {"username": "eve", "password": USER_PASSWORD, "roles": "admin"},
        "/ui/users/admin/disable": {},
        "/ui/users/mallory/roles": {"roles": "admin"},
        "/ui/users/keys": {"name": "forged"},
        "/ui/users/keys/00000000-0000-4000-8000-000000000000/revoke": {},
        "/ui/config/demo/validate/infra/demo/settings.ncl": {"content": "{}"},
        "/ui/config/demo/review/infra/demo/settings.ncl": {"content": "{}"},
        "/ui/config/demo/save/infra/demo/settings.ncl": {"content": "{}", "message": "forged"},
        "/ui/config/demo/restore/infra/demo/settings.ncl": {"version": "0"},
        "/ui/account/mfa": {},
        "/ui/account/mfa/confirm": {"code": "123456"},
    }
    for path, form in attempts.items():
        for b, token, extra in (
            (victim, None, {}),  # no token at all
            (victim, attacker.csrf, {}),  # another session's token
            (victim, victim.csrf, {"Origin": "https://evil.test"}),
            (victim, victim.csrf, {"Sec-Fetch-Site": "cross-site"}),
            (victim, victim.csrf, {"Sec-Fetch-Site": "same-site"}),
            (victim, victim.csrf, {"Origin": "null"}),
            (stranger, None, {}),
            (stranger, victim.csrf, {}),  # a session's token is not a login token
            (stranger, login_token, {"Origin": "https://evil.test"}),
        ):
            data = dict(form) if token is None else {**form, "csrf_token": token}
            resp = await b.post(path, data, **extra)
            assert resp.status_code == 403, (path, token is None, extra, resp.status_code)
            assert "set-cookie" not in resp.headers
        # The token in the header instead of the form is checked just the same.
        resp = await victim.post(path, form, **{"X-CSRF-Token": attacker.csrf})
        assert resp.status_code == 403
    # Nothing changed: the victim is still logged in, the workflow runs, nobody logged in.
    assert await works(victim)
    assert (await p.status(wf["id"]))["status"] == "Running"
    assert stranger.session is None
    # And with the right token, from the same site, the same requests work.
    resp = await victim.post(f"/ui/workflows/{wf['id']}/cancel", {"csrf_token": victim.csrf})
    assert resp.status_code == 303, resp.text
    deadline = time.monotonic() + 30
    while (await p.status(wf["id"]))["status"] != "Cancelled":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    resp = await victim.post("/ui/logout", {}, **{"X-CSRF-Token": victim.csrf})
    assert resp.status_code == 303
    assert not await works(victim)
    resp = await stranger.post(
        "/ui/login", {"username": "admin", "password": ADMIN_PASSWORD, "csrf_token": login_token}
    )
    assert resp.status_code == 303 and stranger.session


# ---------------------------------------------------------------------- sessions


async def test_the_session_cookie_authenticates_nothing_of_the_json_api(platform: Platform) -> None:
    p = platform
    b = await p.browser()
    cookie = {"Cookie": f"{SESSION_COOKIE}={b.session}"}
    for method, path in (("GET", "/auth/whoami"), ("GET", "/users"), ("POST", "/apikeys")):
        resp = await p.api.request(method, path, headers=cookie, json={"name": "k"})
        assert resp.status_code == 401, (path, resp.text)
    assert (await p.orch.get("/workflows", headers=cookie)).status_code == 401
    # Nor do API credentials open the UI: only the session does.
    anonymous = await p.browser("")
    resp = await anonymous.get("/ui/", **p.admin)
    assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/login")


async def test_logout_ends_the_login_and_an_old_cookie_opens_nothing(platform: Platform) -> None:
    p = platform
    b = await p.browser()
    old = b.session
    assert old and await works(b)
    resp = await b.post("/ui/logout", {"csrf_token": b.csrf})
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/login"
    [cleared] = set_cookie_headers(resp, SESSION_COOKIE)
    assert "max-age=0" in cleared.lower()
    again = await p.browser("")
    again.http.cookies.set(SESSION_COOKIE, old, domain="cc.test")
    resp = await again.get("/ui/workflows")
    assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/login")
    # The login itself is over: its refresh token is refused by the API too.
    assert (await p.api.post("/auth/refresh", json={"refresh_token": old})).status_code == 401


async def test_a_disabled_users_session_stops_on_the_next_request(platform: Platform) -> None:
    p = platform
    await p.user("dev", "developer")
    b = await p.browser("dev", USER_PASSWORD)
    assert await works(b)
    resp = await p.api.patch("/users/dev", headers=p.admin, json={"disabled": True})
    assert resp.status_code == 200, resp.text
    resp = await b.get("/ui/")
    assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/login")
    resp = await b.get("/ui/workflows/rows", **{"HX-Request": "true"})
    assert resp.headers.get("hx-redirect", "").startswith("/ui/login")


async def test_ending_a_users_sessions_ends_their_ui_session_too(platform: Platform) -> None:
    p = platform
    await p.user("ops", "operator")
    b = await p.browser("ops", USER_PASSWORD)
    assert await works(b)
    resp = await p.api.patch("/users/ops", headers=p.admin, json={"end_sessions": True})
    assert resp.status_code == 200, resp.text
    assert not await works(b)


async def test_a_session_outlives_a_key_rotation_signed_by_the_new_key(platform: Platform) -> None:
    p = platform
    b = await p.browser()
    assert await works(b)
    resp = await p.api.post("/keys/rotate", headers=p.admin)
    assert resp.status_code == 200, resp.text
    assert await works(b)
    session = await p.cc.ui.sessions.resolve(b_request(b))
    assert session is not None
    header = session.token.split(".")[0]
    decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    assert decoded["kid"] == resp.json()["data"]["kid"]


def b_request(b: Browser) -> Request:
    """A bare request carrying the browser's session cookie."""
    cookie = f"{SESSION_COOKIE}={b.session}".encode()
    return Request({"type": "http", "headers": [(b"cookie", cookie)], "client": None})


async def test_a_totp_account_logs_in_in_two_steps(platform: Platform) -> None:
    p = platform
    secret = (await p.api.post("/auth/mfa/enroll", headers=p.admin)).json()["data"]["secret"]
    totp = pyotp.TOTP(secret)
    confirm = await p.api.post("/auth/mfa/confirm", headers=p.admin, json={"code": totp.now()})
    assert confirm.status_code == 200, confirm.text
    b = await p.browser("")
    page = await b.get("/ui/login?next=/ui/workflows")
    resp = await b.post(
        "/ui/login",
        {
            "username": "admin",
            "password": ADMIN_PASSWORD,
            "csrf_token": form_token(page),
            "next": "/ui/workflows",
        },
    )
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/login/mfa"
    assert b.session is None
    page = await b.get("/ui/login/mfa")
    assert page.status_code == 200 and 'name="code"' in page.text
    wrong = "000000" if totp.now() != "000000" else "111111"
    resp = await b.post("/ui/login/mfa", {"code": wrong, "csrf_token": form_token(page)})
    assert resp.status_code == 401 and b.session is None
    later = totp.at(int(time.time()) + 30)  # the confirmation used the current step
    resp = await b.post("/ui/login/mfa", {"code": later, "csrf_token": form_token(page)})
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/workflows"
    assert b.session and await works(b)
    who = await p.cc.ui.sessions.resolve(b_request(b))
    assert who is not None and who.identity.mfa


async def test_login_never_redirects_to_another_site(platform: Platform) -> None:
    b = await platform.browser("")
    for target in ("https://evil.test/", "//evil.test/ui/", "/ui/\\\\evil", "/elsewhere"):
        page = await b.get("/ui/login")
        resp = await b.post(
            "/ui/login",
            {
                "username": "admin",
                "password": ADMIN_PASSWORD,
                "csrf_token": form_token(page),
                "next": target,
            },
        )
        assert resp.status_code == 303 and resp.headers["location"] == "/ui/", target
        await b.get("/ui/")
        await b.post("/ui/logout", {"csrf_token": b.csrf})


# ---------------------------------------------------------------------- authorization


async def test_a_viewer_sees_no_control_and_a_forged_control_request_is_refused(
    platform: Platform,
) -> None:
    p = platform
    wf = await p.workflow()
    await p.user("vera", "viewer")
    viewer = await p.browser("vera", USER_PASSWORD)
    page = await viewer.get(f"/ui/workflows/{wf['id']}")
    assert page.status_code == 200 and wf["id"] in page.text
    assert "data-action=" not in page.text and "/cancel" not in page.text
    nav = re.findall(r'data-nav="([a-z]+)"', page.text)
    assert "audit" not in nav and "workflows" in nav
    for button in ("cancel", "pause", "rollback"):
        resp = await viewer.post(f"/ui/workflows/{wf['id']}/{button}", {"csrf_token": viewer.csrf})
        assert resp.status_code == 403, resp.text
    assert (await p.status(wf["id"]))["status"] == "Running"
    admin = await p.browser()
    page = await admin.get(f"/ui/workflows/{wf['id']}")
    assert 'data-action="cancel"' in page.text and 'data-action="pause"' in page.text
    audit = await p.api.get("/audit", headers=p.admin, params={"actor": "vera", "result": "denied"})
    assert {e["action"] for e in audit.json()["data"]} >= {"workflow:cancel", "workflow:control"}
