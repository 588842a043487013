"""The audit trail of the embedded platform (control center + orchestrator), SQLite and PostgreSQL.

Every mutating route of both services — found by walking the live apps' routes, so a new route
fails the first test until it is listed here — leaves a record when an admin calls it; logins and
denials are recorded; no password, key or token used reaches the log; the hash chain verifies,
and an edited or deleted record is found by `GET /audit/verify` at its `seq`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from fastapi import FastAPI
from sqlalchemy import delete, update

from provisioning.control_center.app import ControlCenterService
from provisioning.control_center.tables_audit import cc_audit
from provisioning.core.ops_token import OPS_AUDIENCE, OPS_ISSUER, canonical_params
from provisioning.core.settings import load_settings
from provisioning.core.signing import KeyRing
from provisioning.orchestrator.app import OrchestratorService
from provisioning.platform.embedded import build_services
from tests.conftest import free_port, wait_workflow
from tests.fake_workspace import make_fake_workspace

ADMIN_PASSWORD = "admin passphrase for audit"
USER_PASSWORD = "user passphrase for audit"
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
# POSTs that change nothing: they answer a question (a decision, a key's owner, a user's state).
NOT_MUTATIONS = {
    ("control-center", "POST", "/auth/introspect"),
    ("control-center", "POST", "/auth/user-state"),
    ("control-center", "POST", "/authz/check"),
    # Records other services' events: what it writes is the audit (tests/e2e/test_standalone_*).
    ("control-center", "POST", "/audit/ingest"),
    # Says whether a change of a workspace file would be valid; writes nothing.
    ("control-center", "POST", "/config/workspaces/{ws}/validate"),
}
SLEEPER = {"name": "sleeper", "tasks": [{"name": "wait", "command": ["sleep", "60"]}]}
QUICK = {"name": "quick", "tasks": [{"name": "a", "action": "noop"}]}


@dataclass
class Platform:
    cc: ControlCenterService
    orchestrator: OrchestratorService
    http: httpx.AsyncClient
    orch: httpx.AsyncClient
    secrets: list[str] = field(default_factory=list)  # every secret a test used

    async def login(self, username: str, password: str) -> dict[str, Any]:
        resp = await self.http.post(
            "/auth/login", json={"username": username, "password": password}
        )
        assert resp.status_code == 200, resp.text
        data = dict(resp.json()["data"])
        self.secrets += [password, data["access_token"], data["refresh_token"]]
        return data

    async def user(self, admin: dict[str, str], username: str, role: str) -> dict[str, str]:
        """Create a user; answer the headers of its login."""
        resp = await self.http.post(
            "/users",
            headers=admin,
            json={"username": username, "password": USER_PASSWORD, "roles": [role]},
        )
        assert resp.status_code == 201, resp.text
        return bearer(await self.login(username, USER_PASSWORD))

    async def records(self, after: int = 0) -> list[dict[str, Any]]:
        """The newest records (up to 1000) after ``seq`` ``after``, oldest first."""
        rows = await self.cc.identity.audit_query(limit=1000, newest_first=True)
        return [r for r in reversed(rows) if r["seq"] > after]

    async def head(self) -> int:
        rows = await self.cc.identity.audit_query(limit=1, newest_first=True)
        return int(rows[0]["seq"]) if rows else 0

    async def verify(self, headers: dict[str, str]) -> dict[str, Any]:
        resp = await self.http.get("/audit/verify", headers=headers)
        assert resp.status_code == 200, resp.text
        return dict(resp.json()["data"])


def bearer(tokens: dict[str, Any] | str) -> dict[str, str]:
    token = tokens if isinstance(tokens, str) else tokens["access_token"]
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def platform(tmp_path: Path, state_url: str) -> AsyncIterator[Platform]:
    settings = load_settings(
        home=tmp_path / "home",
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
            "orchestrator": {"poll_interval_s": 0.05, "kill_grace_s": 1.0, "port": free_port()},
            "control_center": {
                "admin_password": ADMIN_PASSWORD,
                "port": free_port(),
                "workspaces": [str(tmp_path / "ws")],  # the test's fake workspace
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
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=cc.app), base_url="http://cc")
        )
        orch = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=orchestrator.app), base_url="http://orch"
            )
        )
        yield Platform(cc, orchestrator, http, orch)


def mutating_routes(service: str, app: FastAPI) -> set[tuple[str, str, str]]:
    """``(service, method, path)`` of every mutating route the live app serves."""
    found: set[tuple[str, str, str]] = set()

    def walk(routes: list[Any]) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)  # an include_router() branch
            if included is not None:
                walk(included.routes)
                continue
            for method in getattr(route, "methods", None) or ():
                if method in MUTATING:  # as OpenAPI writes it: `{path}` for `{path:path}`
                    found.add((service, method, route.path.replace(":path}", "}")))

    walk(app.routes)
    documented = {
        (service, method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if method.upper() in MUTATING
    }
    assert found == documented, "the route walk and the OpenAPI document disagree"
    return found


Call = Callable[["Platform", dict[str, Any]], Awaitable[httpx.Response]]


async def test_every_mutating_route_of_both_services_leaves_an_audit_record(
    platform: Platform, tmp_path: Path
) -> None:
    p = platform
    admin_tokens = await p.login("admin", ADMIN_PASSWORD)
    admin = bearer(admin_tokens)
    ctx: dict[str, Any] = {}

    # Each call succeeds as an admin; ``ctx`` carries what later calls need.
    async def login(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        return await p.http.post(
            "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )

    async def refresh(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        return await p.http.post(
            "/auth/refresh", json={"refresh_token": admin_tokens["refresh_token"]}
        )

    async def logout(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        session = await p.login("admin", ADMIN_PASSWORD)
        return await p.http.post(
            "/auth/logout",
            headers=bearer(session),
            json={"refresh_token": session["refresh_token"]},
        )

    async def create_user(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        resp = await p.http.post(
            "/users",
            headers=admin,
            json={"username": "second-admin", "password": USER_PASSWORD, "roles": ["admin"]},
        )
        ctx["user_id"] = resp.json()["data"]["id"]
        return resp

    async def mfa_enroll(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        ctx["second"] = bearer(await p.login("second-admin", USER_PASSWORD))
        resp = await p.http.post("/auth/mfa/enroll", headers=ctx["second"])
        ctx["mfa_secret"] = resp.json()["data"]["secret"]
        return resp

    async def mfa_confirm(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        code = pyotp.TOTP(ctx["mfa_secret"]).now()
        p.secrets += [ctx["mfa_secret"]]
        return await p.http.post("/auth/mfa/confirm", headers=ctx["second"], json={"code": code})

    async def update_user(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        return await p.http.patch(
            f"/users/{ctx['user_id']}", headers=admin, json={"roles": ["operator"]}
        )

    async def create_key(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        resp = await p.http.post("/apikeys", headers=admin, json={"name": "ci"})
        ctx["key_id"] = resp.json()["data"]["id"]
        p.secrets.append(resp.json()["data"]["key"])
        return resp

    async def revoke_key(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        return await p.http.delete(f"/apikeys/{ctx['key_id']}", headers=admin)

    async def rotate(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        return await p.http.post("/keys/rotate", headers=admin)

    async def submit(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        resp = await p.orch.post("/workflows", headers=admin, json=SLEEPER)
        ctx["workflow"] = resp.json()["data"]["id"]
        return resp

    def control(verb: str) -> Call:
        async def call(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
            if verb == "retry":
                await wait_workflow(p.orchestrator, ctx["workflow"], {"Cancelled"})
            return await p.orch.post(f"/workflows/{ctx['workflow']}/{verb}", headers=admin)

        return call

    async def rollback(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        done = await p.orch.post("/workflows", headers=admin, json=QUICK)
        ctx["workflow"] = done.json()["data"]["id"]
        await wait_workflow(p.orchestrator, ctx["workflow"], {"Completed"})
        return await p.orch.post(f"/workflows/{ctx['workflow']}/rollback", headers=admin)

    ws = make_fake_workspace(tmp_path / "ws")

    def domain(path: str, **body: Any) -> Call:
        async def call(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
            doc = {"workspace": str(ws), "infra": "prod", "check": True, **body}
            return await p.orch.post(path, headers=admin, json=doc)

        return call

    config_file = "/config/workspaces/ws/files/infra/prod/settings.ncl"

    def config_sha() -> str:
        return hashlib.sha256((ws / "infra/prod/settings.ncl").read_bytes()).hexdigest()

    async def config_write(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        content = (ws / "infra/prod/settings.ncl").read_text(encoding="utf-8") + "# audited\n"
        body = {"content": content, "expected_sha256": config_sha(), "message": "audit"}
        return await p.http.put(config_file, headers=admin, json=body)

    async def config_restore(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        body = {"version": 0, "expected_sha256": config_sha()}
        return await p.http.post(f"{config_file}/restore", headers=admin, json=body)

    async def ops_dispatch(p: Platform, ctx: dict[str, Any]) -> httpx.Response:
        ring = KeyRing(p.orchestrator.settings.home / "keys" / "ops-keeper")
        ring.load_or_create()
        claims = {
            "sub": "admin",
            "jti": str(uuid.uuid4()),
            "op_type": "workflow.submit",
            "target": "t",
            "params_sha256": hashlib.sha256(canonical_params(QUICK)).hexdigest(),
        }
        token = ring.sign(claims, audience=OPS_AUDIENCE, ttl_s=60, issuer=OPS_ISSUER)
        return await p.orch.post("/ops/dispatch", json={"token": token, "params": QUICK})

    cc, orch = "control-center", "orchestrator"
    # In call order: (service, method, path) -> (call, the action its record names).
    calls: dict[tuple[str, str, str], tuple[Call, str]] = {
        (cc, "POST", "/auth/login"): (login, "auth:login"),
        (cc, "POST", "/auth/refresh"): (refresh, "auth:refresh"),
        (cc, "POST", "/auth/logout"): (logout, "auth:logout"),
        (cc, "POST", "/users"): (create_user, "user:create"),
        (cc, "POST", "/auth/mfa/enroll"): (mfa_enroll, "auth:mfa_enroll"),
        (cc, "POST", "/auth/mfa/confirm"): (mfa_confirm, "auth:mfa_enroll"),
        (cc, "PATCH", "/users/{user_id}"): (update_user, "user:update"),
        (cc, "POST", "/apikeys"): (create_key, "apikey:create"),
        (cc, "DELETE", "/apikeys/{key_id}"): (revoke_key, "apikey:revoke"),
        (cc, "POST", "/keys/rotate"): (rotate, "keys:rotate"),
        (cc, "PUT", "/config/workspaces/{ws}/files/{path}"): (config_write, "config:write"),
        (cc, "POST", "/config/workspaces/{ws}/files/{path}/restore"): (
            config_restore,
            "config:restore",
        ),
        (orch, "POST", "/workflows"): (submit, "workflow:create"),
        (orch, "POST", "/workflows/{workflow_id}/pause"): (control("pause"), "workflow:control"),
        (orch, "POST", "/workflows/{workflow_id}/resume"): (
            control("resume"),
            "workflow:control",
        ),
        (orch, "POST", "/workflows/{workflow_id}/cancel"): (control("cancel"), "workflow:cancel"),
        (orch, "POST", "/workflows/{workflow_id}/retry"): (control("retry"), "workflow:control"),
        (orch, "POST", "/workflows/{workflow_id}/rollback"): (rollback, "workflow:control"),
        (orch, "POST", "/workflows/servers/create"): (
            domain("/workflows/servers/create"),
            "server:create",
        ),
        (orch, "POST", "/workflows/servers/delete"): (
            domain("/workflows/servers/delete"),
            "server:delete",
        ),
        (orch, "POST", "/workflows/taskserv/create"): (
            domain("/workflows/taskserv/create", taskserv="db"),
            "taskserv:create",
        ),
        (orch, "POST", "/workflows/cluster/create"): (
            domain("/workflows/cluster/create", cluster="dbs"),
            "cluster:create",
        ),
        (orch, "POST", "/workflows/cluster/delete"): (
            domain("/workflows/cluster/delete", cluster="dbs"),
            "cluster:create",
        ),
        (orch, "POST", "/ops/dispatch"): (ops_dispatch, "ops:dispatch"),
        (orch, "POST", "/workflows/batch"): (
            domain("/workflows/batch", workflow="all"),
            "workflow:create",
        ),
    }
    live = mutating_routes(cc, p.cc.app) | mutating_routes(orch, p.orchestrator.app)
    assert sorted(live - NOT_MUTATIONS - calls.keys()) == [], "mutating routes with no audit check"
    assert sorted(calls.keys() - live) == [], "checks of routes that no longer exist"

    missing = []
    for (service, method, path), (call, action) in calls.items():
        before = await p.head()
        resp = await call(p, ctx)
        assert resp.status_code < 300, (method, path, resp.text)
        found = [
            r
            for r in await p.records(after=before)
            if r["action"] == action and r["result"] == "success" and r["service"] == service
        ]
        if not found:
            missing.append((method, path, action))
            continue
        assert found[-1]["actor"] in ("admin", "second-admin"), found[-1]
        if service == orch:
            assert found[-1]["details"]["path"] == path.format(workflow_id=ctx["workflow"])
            if "{workflow_id}" in path or path == "/workflows":  # submit names what it made
                assert found[-1]["object_type"] == "Workflow"
                assert found[-1]["object_id"] == ctx["workflow"]
    assert missing == []


async def test_logins_that_succeed_and_fail_are_recorded_with_their_origin(
    platform: Platform,
) -> None:
    p = platform
    await p.login("admin", ADMIN_PASSWORD)
    for n, username in enumerate(("admin", "ghost")):
        resp = await p.http.post(
            "/auth/login",
            json={"username": username, "password": "wrong password here"},
            headers={"X-Request-Id": f"req-{n}"},
        )
        assert resp.status_code == 401

    records = [r for r in await p.records() if r["action"] == "auth:login"]

    # A name that is no account is not kept: people type their password into the user field.
    assert [(r["actor"], r["actor_type"], r["result"], r["request_id"]) for r in records] == [
        ("admin", "user", "success", None),
        ("admin", "user", "failure", "req-0"),
        (None, "anonymous", "failure", "req-1"),
    ]
    assert records[-1]["details"] == {"reason": "bad credentials", "unknown_user": True}
    assert "ghost" not in json.dumps(records)
    assert {r["source"] for r in records} == {"127.0.0.1"}
    assert {r["service"] for r in records} == {"control-center"}
    assert [r["details"].get("reason") for r in records[1:]] == ["bad credentials"] * 2


async def test_denials_are_recorded_by_both_services(platform: Platform) -> None:
    p = platform
    admin = bearer(await p.login("admin", ADMIN_PASSWORD))
    viewer = await p.user(admin, "vera", "viewer")
    developer = await p.user(admin, "dave", "developer")
    before = await p.head()

    assert (await p.orch.post("/workflows", headers=viewer, json=QUICK)).status_code == 403
    assert (
        await p.http.post(
            "/users",
            headers=developer,
            json={"username": "x", "password": USER_PASSWORD, "roles": ["admin"]},
        )
    ).status_code == 403
    assert (await p.http.get("/audit", headers=developer)).status_code == 403

    denied = [
        (r["service"], r["actor"], r["action"], r["details"]["method"], r["details"]["path"])
        for r in await p.records(after=before)
    ]
    assert denied == [
        ("orchestrator", "vera", "workflow:create", "POST", "/workflows"),
        ("control-center", "dave", "user:manage", "POST", "/users"),
        ("control-center", "dave", "audit:read", "GET", "/audit"),
    ]
    assert {r["result"] for r in await p.records(after=before)} == {"denied"}


async def test_no_password_key_or_token_reaches_the_audit_log(platform: Platform) -> None:
    p = platform
    admin_tokens = await p.login("admin", ADMIN_PASSWORD)
    admin = bearer(admin_tokens)
    auditor = await p.user(admin, "audra", "auditor")
    dev = await p.user(admin, "dev", "developer")
    new_password = "the next passphrase"
    wrong = "a mistyped passphrase"
    p.secrets += [new_password, wrong]
    resp = await p.http.patch("/users/dev", headers=admin, json={"password": new_password})
    assert resp.status_code == 200
    assert (
        await p.http.post("/auth/login", json={"username": "dev", "password": wrong})
    ).status_code == 401
    dev_tokens = await p.login("dev", new_password)
    dev = bearer(dev_tokens)
    rotated = (
        await p.http.post("/auth/refresh", json={"refresh_token": dev_tokens["refresh_token"]})
    ).json()["data"]
    p.secrets += [rotated["access_token"], rotated["refresh_token"]]
    reuse = await p.http.post("/auth/refresh", json={"refresh_token": dev_tokens["refresh_token"]})
    assert reuse.status_code == 401
    key = (await p.http.post("/apikeys", headers=admin, json={"name": "ci"})).json()["data"]
    # prvng_<id>_<secret>: the secret is everything after the second "_" (it may hold "_" too).
    p.secrets += [key["key"], key["key"].split("_", 2)[2]]
    for headers in ({"X-API-Key": key["key"]}, bearer(key["key"])):
        resp = await p.orch.post("/workflows", headers=headers, json=QUICK)
        assert resp.status_code == 201
    # The reuse ended that login: a new one, denied twice; the guard records those requests.
    dev = bearer(await p.login("dev", new_password))
    assert (await p.http.get("/audit", headers=dev)).status_code == 403
    assert (await p.http.post("/keys/rotate", headers=dev)).status_code == 403
    enrol = (await p.http.post("/auth/mfa/enroll", headers=admin)).json()["data"]
    code = pyotp.TOTP(enrol["secret"]).now()
    p.secrets += [enrol["secret"]]
    resp = await p.http.post("/auth/mfa/confirm", headers=admin, json={"code": code})
    assert resp.status_code == 200, resp.text
    assert (await p.http.delete(f"/apikeys/{key['id']}", headers=admin)).status_code == 200
    resp = await p.http.post(
        "/auth/logout", headers=admin, json={"refresh_token": admin_tokens["refresh_token"]}
    )
    assert resp.status_code == 200

    export = await p.http.get("/audit/export", headers=auditor)
    listing = await p.http.get("/audit", headers=auditor, params={"limit": 1000})

    assert export.status_code == 200, export.text
    lines = export.text.splitlines()
    assert len(lines) == len(listing.json()["data"]) > 15
    assert {json.loads(line)["action"] for line in lines} >= {
        "auth:login",
        "auth:logout",
        "auth:refresh",
        "auth:mfa_enroll",
        "user:update",
        "apikey:create",
        "apikey:revoke",
        "workflow:create",
        "audit:read",
        "keys:rotate",
    }
    assert all(len(secret) >= 8 for secret in p.secrets)  # an empty "secret" is in every text
    for text in (export.text, listing.text):
        leaked = sorted({secret for secret in p.secrets if secret in text})
        assert leaked == []
    # Only records older than the key's revocation name it, and then by its prefix alone.
    assert key["id"] in export.text


async def test_the_chain_of_a_busy_log_verifies(platform: Platform) -> None:
    p = platform
    admin = bearer(await p.login("admin", ADMIN_PASSWORD))
    for name in ("ann", "bob", "cy"):
        await p.user(admin, name, "viewer")
    for _ in range(3):
        resp = await p.orch.post("/workflows", headers=admin, json=QUICK)
        assert resp.status_code == 201

    result = await p.verify(admin)

    head = await p.head()
    assert head > 10
    assert result == {
        "ok": True,
        "checked": head,
        "first_bad_seq": None,
        "reason": None,
        "last_seq": head,
    }


async def tampered_log(p: Platform) -> tuple[dict[str, str], int]:
    """A log of a dozen records and an auditor's headers; answers the seq to tamper with."""
    admin = bearer(await p.login("admin", ADMIN_PASSWORD))
    auditor = await p.user(admin, "audra", "auditor")
    for name in ("ann", "bob", "cy", "dee"):
        await p.user(admin, name, "viewer")
    assert (await p.verify(auditor))["ok"] is True
    return auditor, (await p.head()) // 2


@pytest.mark.parametrize(
    "column, value",
    [("actor", "mallory"), ("result", "failure"), ("details", {"roles": ["viewer"], "x": 1})],
)
async def test_an_edited_record_is_found_at_its_seq(
    platform: Platform, column: str, value: Any
) -> None:
    p = platform
    auditor, seq = await tampered_log(p)

    await p.cc.db.run_write(
        lambda c: c.execute(update(cc_audit).where(cc_audit.c.seq == seq).values({column: value}))
    )

    result = await p.verify(auditor)
    assert result["ok"] is False
    assert result["first_bad_seq"] == seq
    assert result["checked"] == seq - 1
    assert "altered" in result["reason"]


async def test_a_deleted_record_is_found_at_its_seq(platform: Platform) -> None:
    p = platform
    auditor, seq = await tampered_log(p)

    await p.cc.db.run_write(lambda c: c.execute(delete(cc_audit).where(cc_audit.c.seq == seq)))

    result = await p.verify(auditor)
    assert result["ok"] is False
    assert result["first_bad_seq"] == seq
    assert "missing" in result["reason"]


async def test_records_swapped_in_place_are_found(platform: Platform) -> None:
    p = platform
    auditor, seq = await tampered_log(p)

    def swap(conn: Any) -> None:
        rows = {
            r.seq: dict(r._mapping)
            for r in conn.execute(cc_audit.select().where(cc_audit.c.seq.in_([seq, seq + 1])))
        }
        for a, b in ((seq, seq + 1), (seq + 1, seq)):
            values = {k: v for k, v in rows[b].items() if k not in ("seq", "id")}
            conn.execute(update(cc_audit).where(cc_audit.c.seq == a).values(**values))

    await p.cc.db.run_write(swap)

    result = await p.verify(auditor)
    assert result["ok"] is False
    assert result["first_bad_seq"] == seq
