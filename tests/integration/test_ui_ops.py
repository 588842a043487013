"""The web UI's operations page, in-process: the control center (sessions, Cedar) and a real
ops-keeper (policy file, NATS for publishing) reached through httpx's ASGI transport.

A requester sees their pending operation but no way to approve it (and the keeper's refusal of
a forged self-approval shows as an error); another operator approves it with a reason and it is
published; a viewer sees no control and every forged POST of theirs is refused with nothing
changed; evaluate records nothing; a freeze shows in the banner until it is lifted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.control_center.app import ControlCenterService
from provisioning.core.auth import Guard
from provisioning.core.bus.nats import NatsBus
from provisioning.core.settings import load_settings
from provisioning.ops_keeper.app import OpsKeeperService
from provisioning.platform.nats_server import EmbeddedNats
from tests.conftest import free_port
from tests.integration.test_ui_security import Browser

ADMIN_PASSWORD = "admin passphrase for the ops page"
PASSWORD = "user passphrase for the ops page"
POLICY = """{
  policies = [
    { name = "dev-auto", op_types = ["server.*"], targets = ["dev/*"], decision = "approve" },
    { name = "prod-manual", op_types = ["server.*"], targets = ["prod/*"],
      decision = "require_approval", approver_role = "operator" },
  ],
}
"""


@dataclass
class OpsPlatform:
    cc: ControlCenterService
    keeper: httpx.AsyncClient
    api: httpx.AsyncClient
    admin: dict[str, str]
    stack: AsyncExitStack
    tokens: dict[str, dict[str, str]]

    async def user(self, name: str, role: str) -> Browser:
        resp = await self.api.post(
            "/users",
            headers=self.admin,
            json={"username": name, "password": PASSWORD, "roles": [role]},
        )
        assert resp.status_code == 201, resp.text
        login = await self.api.post("/auth/login", json={"username": name, "password": PASSWORD})
        self.tokens[name] = {"Authorization": f"Bearer {login.json()['data']['access_token']}"}
        b = Browser(self.cc)
        await self.stack.enter_async_context(b.http)
        resp = await b.login(name, PASSWORD)
        assert resp.status_code == 303 and b.session, resp.text
        return b

    async def request(self, who: str, op_type: str, target: str) -> dict[str, Any]:
        resp = await self.keeper.post(
            "/ops", headers=self.tokens[who], json={"op_type": op_type, "target": target}
        )
        assert resp.status_code == 201, resp.text
        return dict(resp.json()["data"])

    async def op(self, op_id: str) -> dict[str, Any]:
        resp = await self.keeper.get(f"/ops/{op_id}", headers=self.admin)
        return dict(resp.json()["data"])

    async def count(self) -> int:
        resp = await self.keeper.get("/ops", headers=self.admin, params={"limit": 1000})
        return len(resp.json()["data"])

    async def freezes(self) -> list[dict[str, Any]]:
        resp = await self.keeper.get("/ops/freezes", headers=self.admin)
        return list(resp.json()["data"])


@pytest.fixture
async def p(tmp_path: Path, state_url: str) -> AsyncIterator[OpsPlatform]:
    home = tmp_path / "home"
    settings = load_settings(
        home=home,
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
            "nats": {"port": free_port()},
            "control_center": {"admin_password": ADMIN_PASSWORD, "port": free_port()},
            "ops_keeper": {"port": free_port(), "reload_interval_s": 0.05},
        },
    )
    (home / "config").mkdir(parents=True)
    (home / "config" / "keeper_policy.ncl").write_text(POLICY, encoding="utf-8")
    async with AsyncExitStack() as stack:
        nats = EmbeddedNats(settings)
        await nats.start()
        stack.push_async_callback(nats.stop)
        bus = await NatsBus([nats.url]).connect()
        stack.push_async_callback(bus.close)
        await bus.ensure()
        cc = ControlCenterService(settings)
        await cc.start()
        stack.push_async_callback(cc.stop)
        guard = Guard(cc.authenticator, cc.authorizer, audit=cc.audit_hook("ops-keeper"))
        keeper = OpsKeeperService(settings, guard=guard, db=cc.db, bus=bus, retry_interval_s=0.05)
        await keeper.start()
        stack.push_async_callback(keeper.stop)
        cc.ui.backends.transports["ops-keeper"] = httpx.ASGITransport(app=keeper.app)
        keeper_http = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=keeper.app), base_url="http://k")
        )
        api = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=cc.app), base_url="http://cc")
        )
        login = await api.post(
            "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        admin = {"Authorization": f"Bearer {login.json()['data']['access_token']}"}
        yield OpsPlatform(cc, keeper_http, api, admin, stack, {})


async def test_another_operator_approves_in_the_ui_and_the_requester_cannot(
    p: OpsPlatform,
) -> None:
    olga = await p.user("olga", "operator")
    oscar = await p.user("oscar", "operator")
    op = await p.request("olga", "server.delete", "prod/web-01")
    assert op["state"] == "pending_approval"

    # The requester sees it waiting, without an approve button, and a forged approval of
    # their own is refused by the keeper with its message.
    page = await olga.get("/ui/ops")
    assert page.status_code == 200 and op["id"] in page.text
    assert f"/ui/ops/{op['id']}/approve" not in page.text
    assert "Your own request" in page.text
    resp = await olga.post(f"/ui/ops/{op['id']}/approve", {"csrf_token": olga.csrf, "reason": "me"})
    assert resp.status_code == 403 and 'id="ops-error"' in resp.text, resp.text
    assert (await p.op(op["id"]))["state"] == "pending_approval"

    # Another operator: the form is there; a reason is required.
    page = await oscar.get("/ui/ops")
    assert f'action="/ui/ops/{op["id"]}/approve"' in page.text
    resp = await oscar.post(f"/ui/ops/{op['id']}/approve", {"csrf_token": oscar.csrf})
    assert resp.status_code == 422
    assert (await p.op(op["id"]))["state"] == "pending_approval"
    resp = await oscar.post(
        f"/ui/ops/{op['id']}/approve", {"csrf_token": oscar.csrf, "reason": "change 42 ok"}
    )
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/ops?done=approved"
    deadline = time.monotonic() + 20
    while (found := await p.op(op["id"]))["state"] != "published":
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)
    assert found["approver_name"] == "oscar" and found["approver_reason"] == "change 42 ok"
    page = await oscar.get("/ui/ops?done=approved&state=published")
    assert "Operation approved." in page.text and "change 42 ok" in page.text

    # A second one is rejected with a reason.
    other = await p.request("olga", "server.create", "prod/web-02")
    resp = await oscar.post(
        f"/ui/ops/{other['id']}/reject", {"csrf_token": oscar.csrf, "reason": "not today"}
    )
    assert resp.status_code == 303
    assert (await p.op(other["id"]))["state"] == "rejected"


async def test_a_viewer_sees_no_control_and_forged_posts_change_nothing(p: OpsPlatform) -> None:
    await p.user("olga", "operator")
    vic = await p.user("vic", "viewer")
    op = await p.request("olga", "server.delete", "prod/db-01")
    page = await vic.get("/ui/ops")
    assert page.status_code == 200 and op["id"] in page.text  # the history shows it
    for control in ("data-action=", "/approve", "/reject", 'id="freeze-form"', "evaluate-form"):
        assert control not in page.text, control
    before = await p.count()
    forged = {
        f"/ui/ops/{op['id']}/approve": {"reason": "forged"},
        f"/ui/ops/{op['id']}/reject": {"reason": "forged"},
        "/ui/ops/freeze": {"reason": "forged", "scope": "*"},
        "/ui/ops/evaluate": {"op_type": "server.delete", "target": "prod/x"},
    }
    for path, form in forged.items():
        resp = await vic.post(path, {**form, "csrf_token": vic.csrf})
        assert resp.status_code == 403, (path, resp.status_code)
    assert (await p.op(op["id"]))["state"] == "pending_approval"
    assert await p.freezes() == [] and await p.count() == before
    # A freeze the viewer may not lift.
    resp = await p.keeper.post("/ops/freeze", headers=p.admin, json={"reason": "r", "scope": "x"})
    freeze_id = resp.json()["data"]["id"]
    page = await vic.get("/ui/ops")
    assert 'id="freeze-banner"' in page.text and "/lift" not in page.text
    resp = await vic.post(f"/ui/ops/freeze/{freeze_id}/lift", {"csrf_token": vic.csrf})
    assert resp.status_code == 403
    assert [f["id"] for f in await p.freezes()] == [freeze_id]
    audit = await p.api.get("/audit", headers=p.admin, params={"actor": "vic", "result": "denied"})
    assert {e["action"] for e in audit.json()["data"]} >= {"ops:approve", "ops:freeze"}


async def test_evaluate_records_nothing_and_a_freeze_shows_until_lifted(p: OpsPlatform) -> None:
    oscar = await p.user("oscar", "operator")
    await oscar.get("/ui/ops")
    before = await p.count()
    form = {"op_type": "server.delete", "target": "prod/web-01", "params": '{"force": true}'}
    resp = await oscar.post("/ui/ops/evaluate", {**form, "csrf_token": oscar.csrf})
    assert resp.status_code == 200 and 'id="evaluation"' in resp.text, resp.text
    assert "prod-manual" in resp.text and "pending_approval" in resp.text
    assert "dev-auto" in resp.text  # the trace names the policy that did not match
    resp = await oscar.post(
        "/ui/ops/evaluate", {**form, "params": "{not json", "csrf_token": oscar.csrf}
    )
    assert resp.status_code == 422 and "params" in resp.text
    resp = await oscar.post(
        "/ui/ops/evaluate", {**form, "op_type": "Bad Type", "csrf_token": oscar.csrf}
    )
    assert resp.status_code == 422 and "op_type" in resp.text
    assert await p.count() == before

    resp = await oscar.post(
        "/ui/ops/freeze",
        {"reason": "release week", "scope": "prod/*", "until": "", "csrf_token": oscar.csrf},
    )
    assert resp.status_code == 303, resp.text
    page = await oscar.get("/ui/ops")
    assert 'id="freeze-banner"' in page.text and "release week" in page.text
    [freeze] = await p.freezes()
    assert freeze["scope"] == "prod/*" and freeze["created_by_name"] == "oscar"
    resp = await oscar.post("/ui/ops/evaluate", {**form, "csrf_token": oscar.csrf})
    assert "frozen by" in resp.text
    resp = await oscar.post(
        "/ui/ops/freeze", {"reason": "past", "until": "2001-01-01T00:00", "csrf_token": oscar.csrf}
    )
    assert resp.status_code == 422 and "until" in resp.text
    resp = await oscar.post(f"/ui/ops/freeze/{freeze['id']}/lift", {"csrf_token": oscar.csrf})
    assert resp.status_code == 303
    assert await p.freezes() == []
    page = await oscar.get("/ui/ops")
    assert 'id="freeze-banner"' not in page.text
    # The nav's old address leads here.
    resp = await oscar.http.get("/ui/operations")
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/ops"
