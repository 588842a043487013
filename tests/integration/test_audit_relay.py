"""The audit outbox of a standalone service and its relay to the control center, on SQLite and
PostgreSQL: events survive a control center that refuses them, arrive in order, are deleted only
once accepted, and a batch delivered twice is recorded once.

Both sides run in this process over their own stores; the relay talks to the control center's
real ASGI app (``POST /audit/ingest``) with a real service API key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request

from provisioning.control_center.app import ControlCenterService
from provisioning.core.audit_relay import AuditRelay, HttpAuditSender, outbox_hook
from provisioning.core.auth import Identity
from provisioning.core.settings import load_settings
from provisioning.core.store import Database, open_database
from provisioning.orchestrator.store import WorkflowStore
from provisioning.orchestrator.tables import audit_outbox
from tests.conftest import free_port

ADMIN_PASSWORD = "relay admin passphrase"
ALICE = Identity("u-alice", "alice", ("operator",), "user")


@dataclass
class World:
    cc: ControlCenterService
    http: httpx.AsyncClient
    admin: dict[str, str]
    service_db: Database  # the standalone service's own store

    async def key(self, *scopes: str) -> str:
        resp = await self.http.post(
            "/apikeys", headers=self.admin, json={"name": "svc", "scopes": list(scopes)}
        )
        assert resp.status_code == 201, resp.text
        return str(resp.json()["data"]["key"])

    def sender(self, key: str) -> HttpAuditSender:
        return HttpAuditSender("http://cc", key, transport=httpx.ASGITransport(app=self.cc.app))

    async def recorded(self) -> list[dict[str, Any]]:
        rows = await self.cc.identity.audit_query(service="orchestrator", limit=1000)
        return sorted(rows, key=lambda r: r["seq"])


def fake_request(path: str, request_id: str) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"x-request-id", request_id.encode())],
        "client": ("10.1.2.3", 5555),
        "query_string": b"",
    }
    return Request(scope)


@pytest.fixture
async def world(tmp_path: Path, state_url: str) -> AsyncIterator[World]:
    settings = load_settings(
        home=tmp_path / "cc",
        env={},
        overrides={
            "state": {"url": f"sqlite:///{tmp_path / 'cc.db'}", "sqlite_synchronous": "NORMAL"},
            "control_center": {"admin_password": ADMIN_PASSWORD, "port": free_port()},
        },
    )
    cc = ControlCenterService(settings)
    await cc.start()
    service_db = open_database(state_url, sqlite_synchronous="NORMAL")
    await WorkflowStore(service_db).migrate()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=cc.app), base_url="http://cc"
        ) as http:
            login = await http.post(
                "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            admin = {"Authorization": f"Bearer {login.json()['data']['access_token']}"}
            yield World(cc, http, admin, service_db)
    finally:
        await service_db.close()
        await cc.stop()


async def test_events_wait_until_the_control_center_takes_them_then_arrive_in_order(
    world: World,
) -> None:
    hook = outbox_hook(world.service_db, audit_outbox, "orchestrator")
    for n in range(5):
        await hook(
            fake_request(f"/workflows/wf-{n}/cancel", f"req-{n}"),
            ALICE,
            "workflow:cancel",
            "success",
            {"status": 200, "object": f"wf-{n}", "object_type": "Workflow", "token": "s3cret"},
        )
    relay = AuditRelay(world.service_db, audit_outbox, None, batch=2)
    assert await relay.pending() == 5

    with pytest.raises(RuntimeError, match="service_api_key"):
        await relay.deliver_once()
    relay.sender = world.sender(await world.key("workflow:read"))  # no audit:write
    with pytest.raises(RuntimeError, match="HTTP 403"):
        await relay.deliver_once()
    assert await relay.pending() == 5
    assert await world.recorded() == []

    relay.sender = world.sender(await world.key("audit:write"))
    sent = [await relay.deliver_once() for _ in range(4)]

    assert sent == [2, 2, 1, 0]
    assert await relay.pending() == 0
    records = await world.recorded()
    assert [r["object_id"] for r in records] == [f"wf-{n}" for n in range(5)]
    first = records[0]
    assert (first["actor"], first["actor_type"], first["action"]) == (
        "alice",
        "user",
        "workflow:cancel",
    )
    assert (first["source"], first["request_id"]) == ("10.1.2.3", "req-0")
    assert first["details"]["token"] == "[redacted]"
    assert first["details"]["forwarded_by"].startswith("prvng_")
    assert "occurred_at" in first["details"]
    assert (await world.cc.identity.audit_verify()).ok


async def test_a_batch_delivered_twice_is_recorded_once(world: World) -> None:
    hook = outbox_hook(world.service_db, audit_outbox, "orchestrator")
    for n in range(3):
        await hook(fake_request("/workflows", f"r{n}"), None, "workflow:create", "denied", {})
    sender = world.sender(await world.key("audit:write"))
    delivered: list[Sequence[dict[str, Any]]] = []

    async def then_crash(events: Sequence[dict[str, Any]]) -> None:
        await sender(events)  # the control center records the batch ...
        delivered.append(events)
        raise RuntimeError("the relay died before deleting its outbox rows")  # ... answer lost

    relay = AuditRelay(world.service_db, audit_outbox, then_crash)
    with pytest.raises(RuntimeError, match="died"):
        await relay.deliver_once()
    assert await relay.pending() == 3

    relay.sender = sender  # the next life sends the same rows again
    assert await relay.deliver_once() == 3

    records = await world.recorded()
    assert len(records) == 3
    assert {r["id"] for r in records} == {e["id"] for e in delivered[0]}
    assert {r["actor_type"] for r in records} == {"anonymous"}
    assert (await world.cc.identity.audit_verify()).ok


async def test_the_ingest_route_refuses_malformed_events_and_records_nothing(
    world: World,
) -> None:
    key = {"X-API-Key": await world.key("audit:write")}
    good = {
        "id": "e-1",
        "action": "workflow:create",
        "result": "success",
        "actor_type": "user",
        "service": "orchestrator",
    }
    for bad, where in [
        ({**good, "result": "maybe"}, "result"),
        ({**good, "actor_type": "robot"}, "actor_type"),
        ({**good, "action": "no colon"}, "action"),
        ({k: v for k, v in good.items() if k != "id"}, "id"),
        ({**good, "extra": 1}, "extra"),
    ]:
        resp = await world.http.post("/audit/ingest", headers=key, json={"events": [good, bad]})
        assert resp.status_code == 422, resp.text
        assert where in resp.text
    resp = await world.http.post("/audit/ingest", headers=key, json={"events": []})
    assert resp.status_code == 422
    assert await world.recorded() == []
