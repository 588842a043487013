"""The ops pipeline end to end, in one process on real parts: a user asks the ops-keeper (its
app), the keeper decides by policy and publishes a signed op on a real nats-server, the
ops-controller (real idempotency store) verifies and dispatches it to the orchestrator's real app
(`POST /ops/dispatch`), the workflow runs, and the outcome reaches the control center's
hash-chained audit log through `ops.audit.>`. A rejected op, and one waiting for approval until
another operator approves it, take the same road or none."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.core.bus.nats import NatsBus
from provisioning.core.settings import load_settings
from provisioning.ops_controller.app import OpsControllerService
from provisioning.ops_controller.controller import OpsController
from provisioning.ops_keeper.app import OpsKeeperService
from provisioning.orchestrator.app import OrchestratorService
from provisioning.platform.embedded import build_services
from provisioning.platform.nats_server import EmbeddedNats
from tests.conftest import free_port
from tests.helpers import until

ADMIN = "pipeline admin passphrase"
PASSWORD = "pipeline user passphrase"
POLICY = """{
  policies = [
    { name = "dev", op_types = ["workflow.submit"], targets = ["dev/*"], decision = "approve" },
    { name = "prod", op_types = ["workflow.submit"], targets = ["prod/*"],
      decision = "require_approval", approver_role = "operator" },
    { name = "no-db", op_types = ["workflow.submit"], targets = ["db/*"], decision = "reject" },
  ],
}
"""
SPEC = {"name": "via-the-pipeline", "tasks": [{"name": "a", "action": "noop"}]}


@dataclass
class Pipeline:
    orch: OrchestratorService
    keeper: OpsKeeperService
    cc_http: httpx.AsyncClient
    keeper_http: httpx.AsyncClient
    controller: OpsController
    users: dict[str, dict[str, str]]

    async def request(self, who: str, target: str) -> dict[str, Any]:
        resp = await self.keeper_http.post(
            "/ops",
            headers=self.users[who],
            json={"op_type": "workflow.submit", "target": target, "params": SPEC},
        )
        assert resp.status_code == 201, resp.text
        return dict(resp.json()["data"])


@pytest.fixture
async def pipeline(tmp_path: Path, state_url: str) -> AsyncIterator[Pipeline]:
    home = tmp_path / "home"
    settings = load_settings(
        home=home,
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
            "nats": {"port": free_port(), "ack_wait_s": 5},
            "orchestrator": {"poll_interval_s": 0.05, "port": free_port()},
            "control_center": {"admin_password": ADMIN, "port": free_port()},
            "ops_keeper": {"port": free_port()},
        },
    )
    (home / "config").mkdir(parents=True)
    (home / "config" / "keeper_policy.ncl").write_text(POLICY)
    async with AsyncExitStack() as stack:
        nats = EmbeddedNats(settings)
        await nats.start()
        stack.push_async_callback(nats.stop)
        bus = await NatsBus(settings.nats_servers, ack_wait_s=5).connect()
        stack.push_async_callback(bus.close)
        await bus.ensure()
        cc, services = build_services(settings, bus=bus)
        orch = next(s for s in services if isinstance(s, OrchestratorService))
        keeper = next(s for s in services if isinstance(s, OpsKeeperService))
        ctl = next(s for s in services if isinstance(s, OpsControllerService))
        for svc in services:
            await svc.start()
            if svc is orch:
                stack.push_async_callback(orch.stop, kill_running=True)
            else:
                stack.push_async_callback(svc.stop)
        controller = ctl.controller
        cc_http = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=cc.app), base_url="http://cc")
        )
        keeper_http = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=keeper.app), base_url="http://k")
        )
        users: dict[str, dict[str, str]] = {}
        for name, role, password in (
            ("admin", None, ADMIN),
            ("olga", "operator", PASSWORD),
            ("oscar", "operator", PASSWORD),
        ):
            if role:
                resp = await cc_http.post(
                    "/users",
                    headers=users["admin"],
                    json={"username": name, "password": password, "roles": [role]},
                )
                assert resp.status_code == 201, resp.text
            login = await cc_http.post("/auth/login", json={"username": name, "password": password})
            users[name] = {"Authorization": f"Bearer {login.json()['data']['access_token']}"}
        yield Pipeline(orch, keeper, cc_http, keeper_http, controller, users)


async def workflows_of(p: Pipeline, op_id: str) -> list[dict[str, Any]]:
    return [
        w
        for w in await p.orch.store.list_workflows(limit=100)
        if w["labels"].get("op_jti") == op_id
    ]


async def test_an_approved_op_runs_once_and_its_outcome_is_audited(pipeline: Pipeline) -> None:
    p = pipeline
    op = await p.request("olga", "dev/web-01")
    assert op["state"] in ("published", "approved"), op

    (wf,) = await until("the op became a workflow", lambda: workflows_of(p, op["id"]))
    assert wf["owner"] and wf["name"] == "via-the-pipeline"
    done = await until(
        "it completed",
        lambda: _status(p, wf["id"], "Completed"),
    )
    assert done
    record = await until("the controller recorded it", lambda: p.controller.store.get(op["id"]))
    assert record.state in ("dispatched", "completed")
    audit = await until(
        "the outcome reached the control center's audit log",
        lambda: _audit(p, "ops:dispatch", op["id"]),
    )
    assert audit[0]["result"] == "success" and audit[0]["service"] == "ops-controller"
    # The keeper's decision is in the log once: as its ops.audit event, not also as the HTTP
    # call that asked for it.
    requested = await until("the decision was audited", lambda: _audit(p, "ops:request", op["id"]))
    await asyncio.sleep(0.5)
    requested = await _audit(p, "ops:request", op["id"])
    assert len(requested) == 1, requested
    assert requested[0]["details"]["forwarded_by"] == "nats:ops.audit"
    assert (await p.cc_http.get("/audit/verify", headers=p.users["admin"])).json()["data"]["ok"]


async def test_rejected_and_pending_ops_do_not_run_until_another_operator_approves(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    rejected = await p.request("olga", "db/main")
    pending = await p.request("olga", "prod/web-01")
    assert (rejected["state"], pending["state"]) == ("rejected", "pending_approval")
    await asyncio.sleep(1.5)
    assert await workflows_of(p, rejected["id"]) == []
    assert await workflows_of(p, pending["id"]) == []

    own = await p.keeper_http.post(
        f"/ops/{pending['id']}/approve", headers=p.users["olga"], json={"reason": "mine"}
    )
    assert own.status_code == 403
    other = await p.keeper_http.post(
        f"/ops/{pending['id']}/approve", headers=p.users["oscar"], json={"reason": "checked"}
    )
    assert other.status_code == 200, other.text
    (wf,) = await until("the approved op ran", lambda: workflows_of(p, pending["id"]))
    assert await until("completed", lambda: _status(p, wf["id"], "Completed"))


async def _status(p: Pipeline, wf_id: str, want: str) -> bool:
    return bool((await p.orch.store.get_workflow(wf_id, with_tasks=False))["status"] == want)


async def _audit(p: Pipeline, action: str, object_id: str) -> list[dict[str, Any]]:
    resp = await p.cc_http.get(
        "/audit", headers=p.users["admin"], params={"action": action, "object_id": object_id}
    )
    return list(resp.json()["data"])
