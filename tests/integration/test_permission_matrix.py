"""The permission matrix: every live route, every kind of caller, own, other's and missing objects.

The routes are read from the running apps (``app.routes`` of the control center and the
orchestrator of the embedded platform), never from a list in this file. Each route declares its
access through its dependencies: ``guard.require("<action>")`` (a callable named
``require_<resource>_<verb>``) or ``guard.authenticated()`` (any valid credentials). A route with
neither that is not in :data:`OPEN_ROUTES` fails the test, and so does a route with a path
parameter, or a body, this file does not know how to fill: a new route must enter the matrix.

Callers: the five default roles (each a user logged in through ``POST /auth/login``), an API key
of the developer scoped to ``["workflow:read"]``, and anonymous. Objects: workflows and tasks
(with their logs) owned by the developer ("own") and by the operator ("other"); for users the
caller's own record and a bystander's; for API keys a spare key of the caller's user and one of
the bystander; and an id nothing has ("missing"). Anonymous and the API key act for the
developer's own objects.

The expected answer comes from the loaded policy set (``Authorizer.decide``), never from a table
here. With ``A`` the route's action and ``P`` the caller:

* no credentials → 401, whatever the route;
* ``authenticated()`` routes → allowed for every valid credential, except MFA enrolment with an
  API key (403: only the user logged in enrols);
* ``P`` *may use* ``A`` when Cedar allows it on ``Platform::"platform"`` or on an object of
  ``P``'s own (``owner == P``; for ``user:*`` actions ``P``'s own user record) — actions a role
  may do on its own objects only open the collection, and the object decides;
* a route without an object → allowed when ``P`` may use ``A``, else 403;
* a missing object → 404 when ``P`` may use ``A``, else 403;
* an existing object ``O`` (as the guard describes it: a task is its workflow, with the
  workflow's owner) → allowed when Cedar allows ``A`` on ``O``; else 403 when ``P`` may not use
  ``A`` at all; else 403 when ``P`` may read ``O`` (``<resource>:read`` allowed on it) and 404
  when it may not (another owner's object does not exist for it).

"Allowed" is any 2xx, or 409 ``invalid_state`` (authorization passed, the workflow's state does
not fit, e.g. resuming a completed workflow); the answer is compared as allowed / 401 / 403 /
404, and anything else (422, 500, …) is a mismatch too. Each test runs one caller on a fresh
platform, so mutations never leak between callers; inside it the routes that spend what they act
on run last, in a fixed order (MFA enrolment then confirmation, user changes and key revocation
on spare objects, key rotation, and logout at the very end). Every mismatch is listed at once.
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
import pyotp
import pytest
from fastapi import Depends, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from provisioning.core.auth import Guard
from provisioning.core.rbac import ACTIONS, Authorizer, Principal, Resource
from provisioning.core.settings import load_settings
from provisioning.orchestrator.app import OrchestratorService
from provisioning.platform.embedded import build_services
from tests.conftest import free_port, wait_workflow
from tests.fake_workspace import make_fake_workspace

pytestmark = pytest.mark.timeout(120)

CC, ORCH = "control-center", "orchestrator"
AUTHENTICATED = "<authenticated>"
ADMIN_PASSWORD = "matrix admin passphrase 1"
PASSWORD = "matrix user passphrase 2"
ROLES = ("admin", "operator", "developer", "viewer", "auditor")
CALLERS = (*ROLES, "apikey", "anonymous")
KEY_SCOPES = ["workflow:read"]

#: Routes that answer without credentials, by design (every method of the path).
_EVERY_SERVICE_OPEN = (
    "/health",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
)
_CC_OPEN = (
    "/.well-known/jwks.json",
    "/auth/login",
    "/auth/refresh",
    "/auth/introspect",
    "/auth/user-state",
)
# Authenticated by the signed operation in its body, not by a login or key
# (tests/integration/test_ops_dispatch.py).
_ORCH_OPEN = ("/ops/dispatch",)
OPEN_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {(svc, path) for svc in (CC, ORCH) for path in _EVERY_SERVICE_OPEN}
    | {(CC, path) for path in _CC_OPEN}
    | {(ORCH, path) for path in _ORCH_OPEN}
)

#: Served by an app of its own with its own authentication, tested on its own: the web UI
#: (session cookie, CSRF, headers: tests/integration/test_ui_security.py) and `/`, which
#: redirects to it. Neither accepts the credentials of the JSON API.
SEPARATELY_TESTED: frozenset[tuple[str, str]] = frozenset({(CC, "/ui"), (CC, "/")})

#: Path parameter → the kind of object it names.
OBJECT_PARAMS = {
    "workflow_id": "workflow",
    "task_id": "task",
    "user_id": "user",
    "key_id": "apikey",
    "ws": "workspace",  # the configuration API's workspace (tests/fake_workspace.py, id "ws")
}

#: Path parameters naming a part of the object (a file of the workspace, a version of it): the
#: object is the other parameter's, these get a fixed value.
FIXED_PARAMS = {"path": "infra/prod/settings.ncl", "n": "0"}

#: Routes that spend what they act on run last, in this order; the rest run first (rank 0).
RANKS = {
    ("POST", "/auth/mfa/enroll"): 1,
    ("POST", "/auth/mfa/confirm"): 2,
    ("PATCH", "/users/{user_id}"): 3,
    ("DELETE", "/apikeys/{key_id}"): 3,
    ("POST", "/keys/rotate"): 4,
    ("POST", "/auth/logout"): 5,
}

_serial = itertools.count()


def _workflow_body(world: World) -> dict[str, Any]:
    return {"name": f"matrix-{next(_serial)}", "tasks": [{"name": "only", "action": "noop"}]}


def _user_body(world: World) -> dict[str, Any]:
    return {"username": f"matrix-{next(_serial)}", "password": PASSWORD, "roles": ["viewer"]}


def _config_file(world: World) -> Path:
    return Path(world.domain["workspace"]) / FIXED_PARAMS["path"]


def _mfa_code(world: World) -> dict[str, Any]:
    # The secret of this test's enrolment, when it was allowed; any code otherwise.
    secret = world.mfa_secret
    return {"code": pyotp.TOTP(secret).now() if secret else "000000"}


#: Valid bodies, so that authorization and not validation decides: (method, path) → factory.
BODIES: dict[tuple[str, str], Callable[[World], Any]] = {
    ("POST", "/workflows"): _workflow_body,
    ("POST", "/users"): _user_body,
    ("PATCH", "/users/{user_id}"): lambda w: {"disabled": False},
    ("POST", "/apikeys"): lambda w: {"name": "matrix", "scopes": []},
    ("POST", "/authz/check"): lambda w: {"action": "workflow:read"},
    ("POST", "/auth/mfa/confirm"): _mfa_code,
    ("POST", "/auth/logout"): lambda w: {},
    # `check: true`: the plan is answered, nothing is submitted or created.
    ("POST", "/workflows/servers/create"): lambda w: {**w.domain, "servers": ["a1"]},
    ("POST", "/workflows/servers/delete"): lambda w: {**w.domain, "servers": ["a1"]},
    ("POST", "/workflows/taskserv/create"): lambda w: {**w.domain, "taskserv": "db"},
    ("POST", "/workflows/cluster/create"): lambda w: {**w.domain, "cluster": "dbs"},
    ("POST", "/workflows/cluster/delete"): lambda w: {**w.domain, "cluster": "dbs"},
    ("POST", "/workflows/batch"): lambda w: {**w.domain, "workflow": "all"},
    # The file as it is: a write or a restore that changes nothing, yet is authorized and done.
    ("POST", "/config/workspaces/{ws}/validate"): lambda w: {},
    ("PUT", "/config/workspaces/{ws}/files/{path:path}"): lambda w: {
        "content": _config_file(w).read_text(encoding="utf-8"),
        "expected_sha256": hashlib.sha256(_config_file(w).read_bytes()).hexdigest(),
        "message": "matrix",
    },
    ("POST", "/config/workspaces/{ws}/files/{path:path}/restore"): lambda w: {
        "version": 0,
        "expected_sha256": hashlib.sha256(_config_file(w).read_bytes()).hexdigest(),
    },
    ("POST", "/audit/ingest"): lambda w: {
        "events": [
            {
                "id": str(uuid.uuid4()),
                "action": "workflow:create",
                "result": "success",
                "actor_type": "user",
                "service": "matrix",
            }
        ]
    },
}


# ---------------------------------------------------------------------- the live routes


@dataclass(frozen=True)
class Route:
    service: str
    method: str
    path: str
    access: str  # an action of rbac.ACTIONS, or AUTHENTICATED
    param: str | None  # the path parameter naming an object, if any
    has_body: bool

    def __str__(self) -> str:
        return f"{self.service} {self.method} {self.path} [{self.access}]"


def _guard_dependencies(dependant: Dependant) -> Iterator[str]:
    """The access every guard dependency of ``dependant`` (at any depth) declares."""
    by_name = {f"require_{a.replace(':', '_')}": a for a in ACTIONS}
    for dep in dependant.dependencies:
        call = dep.call
        qualname = getattr(call, "__qualname__", "")
        if qualname.startswith("Guard.require."):
            name = getattr(call, "__name__", "")
            yield by_name.get(name, f"<unknown action of {name}>")
        elif qualname.startswith("Guard.authenticated."):
            yield AUTHENTICATED
        yield from _guard_dependencies(dep)


def _flat_routes(app: FastAPI) -> Iterator[Any]:
    """Every route the app serves, routers included (FastAPI >= 0.165 includes them lazily:
    ``app.routes`` then holds one entry per included router)."""
    walk = getattr(fastapi.routing, "iter_route_contexts", None)
    yield from (walk(app.routes) if walk is not None else app.routes)


def live_routes(apps: dict[str, FastAPI]) -> tuple[list[Route], list[str]]:
    """Every guarded (service, method, path) of the apps, and what is wrong with the others."""
    routes: list[Route] = []
    problems: list[str] = []
    seen_open: set[tuple[str, str]] = set()
    for service, app in apps.items():
        for raw in _flat_routes(app):
            path = getattr(raw, "path", None)
            methods = sorted(getattr(raw, "methods", None) or [])
            if path is None:
                problems.append(f"{service}: a route without a path ({raw!r})")
                continue
            if (service, path) in OPEN_ROUTES:
                seen_open.add((service, path))
                continue
            if (service, path) in SEPARATELY_TESTED:
                continue
            original = getattr(raw, "original_route", raw)
            if not isinstance(original, APIRoute):
                problems.append(f"{service} {methods} {path}: not an API route and not open")
                continue
            dependant: Dependant = raw.dependant
            declared = sorted(set(_guard_dependencies(dependant)))
            params = sorted(p for p in raw.param_convertors if p not in FIXED_PARAMS)
            for method in methods:
                where = f"{service} {method} {path}"
                if len(declared) != 1 or declared[0].startswith("<unknown"):
                    problems.append(
                        f"{where}: declares {declared or 'no action'}, not in OPEN_ROUTES"
                    )
                    continue
                unknown = [p for p in params if p not in OBJECT_PARAMS]
                if unknown or len(params) > 1:
                    problems.append(f"{where}: no object cases for path parameters {params}")
                    continue
                has_body = bool(dependant.body_params)
                if has_body and (method, path) not in BODIES:
                    problems.append(f"{where}: takes a body and BODIES has none for it")
                    continue
                param = params[0] if params else None
                routes.append(Route(service, method, path, declared[0], param, has_body))
    for stale in sorted(OPEN_ROUTES - seen_open):
        problems.append(f"OPEN_ROUTES names {stale}, which no live router has")
    return routes, problems


# ---------------------------------------------------------------------- the platform


@dataclass
class World:
    """A running embedded platform with one user per role, objects and credentials."""

    apps: dict[str, FastAPI]
    clients: dict[str, httpx.AsyncClient]
    authz: Authorizer
    users: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → user document
    tokens: dict[str, str] = field(default_factory=dict)  # name → access token
    api_key: str = ""
    workflows: dict[str, tuple[str, str]] = field(default_factory=dict)  # case → (id, owner)
    tasks: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # → (id, wf, owner)
    spare_keys: dict[str, str] = field(default_factory=dict)  # user name → key id
    mfa_secret: str | None = None
    domain: dict[str, Any] = field(default_factory=dict)  # workspace, infra, check

    def uid(self, name: str) -> str:
        return str(self.users[name]["id"])

    async def call(
        self, service: str, method: str, path: str, token: str | None = None, body: Any = None
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return await self.clients[service].request(method, path, headers=headers, json=body)

    async def ok(self, service: str, method: str, path: str, token: str, body: Any) -> Any:
        resp = await self.call(service, method, path, token, body)
        assert resp.status_code in (200, 201), f"setup {method} {path}: {resp.text}"
        return resp.json()["data"]


@asynccontextmanager
async def platform(tmp_path: Path) -> AsyncIterator[World]:
    settings = load_settings(
        home=tmp_path / "home",
        env={},
        overrides={
            "state": {"url": f"sqlite:///{tmp_path / 'state.db'}", "sqlite_synchronous": "NORMAL"},
            "orchestrator": {"poll_interval_s": 0.05, "lease_s": 3.0, "port": free_port()},
            "control_center": {
                "admin_password": ADMIN_PASSWORD,
                "port": free_port(),
                "workspaces": [str(tmp_path / "ws")],
            },
        },
    )
    cc, services = build_services(settings)
    orch = next(s for s in services if isinstance(s, OrchestratorService))
    started: list[Any] = []
    try:
        for svc in services:
            await svc.start()
            started.append(svc)
        # Every service of the platform: a new one enters the matrix (and fails it) by itself.
        apps: dict[str, FastAPI] = {svc.name: svc.app for svc in services}
        clients = {
            name: httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
            for name, app in apps.items()
        }
        world = World(apps=apps, clients=clients, authz=cc.authorizer)
        ws = make_fake_workspace(tmp_path / "ws")
        world.domain = {"workspace": str(ws), "infra": "prod", "check": True}
        try:
            await _populate(world, orch)
            yield world
        finally:
            for client in clients.values():
                await client.aclose()
    finally:
        for svc in reversed(started):
            if isinstance(svc, OrchestratorService):
                await svc.stop(kill_running=True)
            else:
                await svc.stop()


async def _login(world: World, name: str, password: str) -> None:
    data = await world.ok(CC, "POST", "/auth/login", "", {"username": name, "password": password})
    world.tokens[name] = data["access_token"]
    world.users[name] = data["user"]


async def _populate(world: World, orch: Any) -> None:
    await _login(world, "admin", ADMIN_PASSWORD)
    admin = world.tokens["admin"]
    for name, role in (*((r, r) for r in ROLES[1:]), ("bystander", "viewer")):
        body = {"username": name, "password": PASSWORD, "roles": [role]}
        await world.ok(CC, "POST", "/users", admin, body)
        await _login(world, name, PASSWORD)
    body = {"name": "matrix-key", "scopes": KEY_SCOPES}
    world.api_key = (await world.ok(CC, "POST", "/apikeys", world.tokens["developer"], body))["key"]
    for name in world.tokens:
        spare = {"name": "spare", "scopes": []}
        world.spare_keys[name] = (
            await world.ok(CC, "POST", "/apikeys", world.tokens[name], spare)
        )["id"]
    for case, owner in (("own", "developer"), ("other", "operator")):
        doc = await world.ok(ORCH, "POST", "/workflows", world.tokens[owner], _workflow_body(world))
        await wait_workflow(orch, doc["id"], {"Completed"})
        world.workflows[case] = (doc["id"], world.uid(owner))
        task = (await orch.store.get_workflow(doc["id"], with_tasks=True))["tasks"][0]
        world.tasks[case] = (task["id"], doc["id"], world.uid(owner))


# ---------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Caller:
    name: str
    principal: Principal | None  # None: anonymous
    credential: str | None
    acts_for: str  # whose "own" objects and record the cases use


def caller_of(world: World, name: str) -> Caller:
    if name == "anonymous":
        return Caller(name, None, None, "developer")
    user = "developer" if name == "apikey" else name
    doc = world.users[user]
    scopes = frozenset(KEY_SCOPES) if name == "apikey" else None
    principal = Principal(str(doc["id"]), roles=frozenset(doc["roles"]), scopes=scopes)
    credential = world.api_key if name == "apikey" else world.tokens[name]
    return Caller(name, principal, credential, user)


_ENTITY = {"workflow": "Workflow", "task": "Task", "user": "User", "apikey": "ApiKey"}


def _may_use(authz: Authorizer, who: Principal, action: str) -> bool:
    """Cedar allows ``action`` on the platform, or on an object of the caller's own."""
    prefix = action.split(":")[0]
    if prefix == "user":
        own = Resource("User", who.user_id)
    else:
        own = Resource(_ENTITY.get(prefix, "Platform"), "own-probe", owner=who.user_id)
    return (
        authz.decide(who, action, Resource.platform()).allowed
        or authz.decide(who, action, own).allowed
    )


MISSING = Resource("Platform", "missing")  # marker: the object does not exist


def expected(authz: Authorizer, caller: Caller, route: Route, obj: Resource | None) -> str:
    """What the policy set says the route must answer (see the module docstring)."""
    who = caller.principal
    if who is None:
        return "401"
    if route.access == AUTHENTICATED:
        # MFA is enrolled by the user logged in: an API key must not turn it on for its owner.
        if who.scopes is not None and route.path.startswith("/auth/mfa/"):
            return "403"
        return "allowed"
    action = route.access
    may_use = _may_use(authz, who, action)
    if obj is None:
        return "allowed" if may_use else "403"
    if obj is MISSING:
        return "404" if may_use else "403"
    if authz.decide(who, action, obj).allowed:
        return "allowed"
    if not may_use:
        return "403"
    read = action.split(":")[0] + ":read"
    if read != action and read in ACTIONS and authz.decide(who, read, obj).allowed:
        return "403"
    return "404"


def outcome(resp: httpx.Response) -> str:
    status = resp.status_code
    if 200 <= status < 300:
        return "allowed"
    code = ""
    if resp.headers.get("content-type", "").startswith("application/json"):
        code = (resp.json().get("error") or {}).get("code", "")
    if status == 409 and code == "invalid_state":
        return "allowed"
    if status in (401, 403, 404):
        return str(status)
    return f"unexpected {status} {code}".strip()


def target(world: World, caller: Caller, kind: str, case: str) -> tuple[str, Resource]:
    """The path value for an object case, and the object as the guard describes it."""
    if case == "missing":
        return (uuid.uuid4().hex[:16] if kind == "apikey" else str(uuid.uuid4())), MISSING
    if kind == "workflow":
        wf_id, owner = world.workflows[case]
        return wf_id, Resource("Workflow", wf_id, owner=owner)
    if kind == "task":
        task_id, wf_id, owner = world.tasks[case]
        return task_id, Resource("Workflow", wf_id, owner=owner)
    if kind == "workspace":  # nobody owns one: "own" and "other" are the managed workspace
        return "ws", Resource("Workspace", "ws")
    name = caller.acts_for if case == "own" else "bystander"
    if kind == "user":
        return world.uid(name), Resource("User", world.uid(name))
    key_id = world.spare_keys[name]
    return key_id, Resource("ApiKey", key_id, owner=world.uid(name))


@dataclass(frozen=True)
class Probe:
    route: Route
    case: str  # "collection" | "own" | "other" | "missing"


def plan(routes: list[Route]) -> list[Probe]:
    probes = [
        Probe(route, case)
        for route in routes
        for case in (("own", "other", "missing") if route.param else ("collection",))
    ]
    return sorted(probes, key=lambda p: RANKS.get((p.route.method, p.route.path), 0))


# ---------------------------------------------------------------------- the tests


async def test_every_live_route_declares_an_action_or_is_open(tmp_path: Path) -> None:
    async with platform(tmp_path) as world:
        routes, problems = live_routes(world.apps)
        assert not problems, "routes missing from the matrix:\n" + "\n".join(problems)
        assert {r.service for r in routes} >= {CC, ORCH}
        assert {r.param for r in routes} == {None, *OBJECT_PARAMS}

        # A route added without a guard, or with an object the matrix cannot name, fails it.
        async def endpoint() -> None: ...

        orch = world.apps[ORCH]
        orch.add_api_route("/unguarded", endpoint, methods=["GET"])
        orch.add_api_route(
            "/servers/{server_id}",
            endpoint,
            methods=["DELETE"],
            dependencies=[Depends(Guard(None, world.authz).require("server:delete"))],
        )
        _, problems = live_routes(world.apps)
    assert problems == [
        f"{ORCH} GET /unguarded: declares no action, not in OPEN_ROUTES",
        f"{ORCH} DELETE /servers/{{server_id}}: no object cases for path parameters ['server_id']",
    ]


@pytest.mark.parametrize("name", CALLERS)
async def test_each_route_answers_the_caller_as_the_policy_set_decides(
    name: str, tmp_path: Path
) -> None:
    async with platform(tmp_path) as world:
        routes, problems = live_routes(world.apps)
        assert not problems, "routes missing from the matrix:\n" + "\n".join(problems)
        caller = caller_of(world, name)
        mismatches: list[str] = []
        for probe in plan(routes):
            route = probe.route
            path, obj = route.path, None
            if route.param:
                value, obj = target(world, caller, OBJECT_PARAMS[route.param], probe.case)
                path = path.replace(f"{{{route.param}}}", value)
            for name, fixed in FIXED_PARAMS.items():
                path = path.replace(f"{{{name}:path}}", fixed).replace(f"{{{name}}}", fixed)
            body = BODIES[(route.method, route.path)](world) if route.has_body else None
            resp = await world.call(route.service, route.method, path, caller.credential, body)
            if route.path == "/auth/mfa/enroll" and resp.status_code == 200:
                world.mfa_secret = resp.json()["data"]["secret"]
            want = expected(world.authz, caller, route, obj)
            got = outcome(resp)
            if got != want:
                mismatches.append(
                    f"{route} on {probe.case}: expected {want}, got {got}: {resp.text[:200]}"
                )
        if caller.principal is None:
            mismatches += await _open_routes_answer_anonymous(world)
    assert not mismatches, f"{name}: {len(mismatches)} mismatches\n" + "\n".join(mismatches)


async def _open_routes_answer_anonymous(world: World) -> list[str]:
    """Every open GET route without parameters answers 200 with no credentials."""
    wrong = []
    for service, path in sorted(OPEN_ROUTES):
        app_routes = [r for r in _flat_routes(world.apps[service]) if r.path == path]
        if not any("GET" in (getattr(r, "methods", None) or ()) for r in app_routes):
            continue
        resp = await world.call(service, "GET", path)
        if resp.status_code != 200:
            wrong.append(f"open {service} GET {path}: {resp.status_code}")
    return wrong
