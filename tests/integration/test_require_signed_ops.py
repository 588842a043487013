"""`orchestrator.require_signed_ops` (SQLite and PostgreSQL): with it on, every route that makes a
workflow from a caller's own request answers 403 naming the setting and the way through the
ops-keeper, and stores nothing; `POST /ops/dispatch` with an op token the keeper's key ring
signed still makes its workflow, which can then be read, listed and cancelled as usual. A
`check: true` plan makes nothing and stays allowed. With the setting off, nothing changes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.core.signing import KeyRing
from provisioning.orchestrator.app import OrchestratorService
from tests.conftest import wait_workflow
from tests.fake_workspace import make_fake_workspace
from tests.integration.test_ops_dispatch import SPEC, op

CREATING = {
    "/workflows": None,
    "/workflows/servers/create": {"infra": "prod", "servers": ["a1"]},
    "/workflows/servers/delete": {"infra": "prod", "servers": ["a1"]},
    "/workflows/taskserv/create": {"infra": "prod", "taskserv": "db"},
    "/workflows/cluster/create": {"infra": "prod", "cluster": "dbs"},
    "/workflows/cluster/delete": {"infra": "prod", "cluster": "dbs"},
    "/workflows/batch": {"infra": "prod", "workflow": "all"},
}
DOMAIN = [path for path, body in CREATING.items() if body is not None]


def body_of(path: str, ws: Path) -> dict[str, Any]:
    extra = CREATING[path]
    return dict(SPEC) if extra is None else {"workspace": str(ws), **extra}


async def make(make_service: Any, required: bool) -> OrchestratorService:
    svc: OrchestratorService = await make_service(require_signed_ops=required)
    KeyRing(svc.settings.home / "keys" / "ops-keeper").load_or_create()
    return svc


@pytest.fixture
async def ws(tmp_path: Path) -> Path:
    return make_fake_workspace(tmp_path / "ws")


@pytest.fixture
async def signed_only(make_service: Any) -> OrchestratorService:
    return await make(make_service, True)


@pytest.fixture
async def http(signed_only: OrchestratorService) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=signed_only.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://o") as c:
        yield c


@pytest.mark.parametrize("path", list(CREATING))
async def test_a_route_that_makes_a_workflow_is_refused_naming_the_setting(
    signed_only: OrchestratorService, http: httpx.AsyncClient, ws: Path, path: str
) -> None:
    resp = await http.post(path, json=body_of(path, ws))

    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]
    assert error["code"] == "forbidden"
    assert "orchestrator.require_signed_ops" in error["message"]
    assert "--via-ops" in error["message"] and "ops-keeper" in error["message"]
    assert error["details"]["setting"] == "orchestrator.require_signed_ops"
    assert await signed_only.store.list_workflows(limit=10) == []
    assert (await http.get("/workflows")).json()["data"] == []


@pytest.mark.parametrize("path", DOMAIN)
async def test_a_check_plan_makes_nothing_and_stays_allowed(
    signed_only: OrchestratorService, http: httpx.AsyncClient, ws: Path, path: str
) -> None:
    resp = await http.post(path, json={**body_of(path, ws), "check": True})

    assert resp.status_code == 200, resp.text
    assert resp.json()["data"]["check"] is True
    assert await signed_only.store.list_workflows(limit=10) == []


async def test_a_signed_op_still_makes_its_workflow_which_reads_and_cancel_reach(
    signed_only: OrchestratorService, http: httpx.AsyncClient
) -> None:
    ring = KeyRing(signed_only.settings.home / "keys" / "ops-keeper")
    slow = {"name": "slow", "tasks": [{"name": "nap", "action": "sleep", "args": {"seconds": 30}}]}
    jti, data = op(ring, "workflow.submit", slow)

    made = await http.post(
        "/ops/dispatch", content=data, headers={"content-type": "application/json"}
    )

    assert made.status_code == 201, made.text
    wf_id = made.json()["data"]["id"]
    found = (await http.get("/workflows", params={"idempotency_key": f"op:{jti}"})).json()
    assert [w["id"] for w in found["data"]] == [wf_id]
    assert (await http.get(f"/workflows/{wf_id}")).status_code == 200
    cancelled = await http.post(f"/workflows/{wf_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert (await wait_workflow(signed_only, wf_id))["status"] == "Cancelled"


@pytest.mark.parametrize("required", [True, False])
async def test_health_shows_the_setting(make_service: Any, required: bool) -> None:
    svc = await make(make_service, required)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=svc.app), base_url="http://o"
    ) as c:
        assert (await c.get("/health")).json()["data"]["require_signed_ops"] is required


@pytest.mark.parametrize("path", list(CREATING))
async def test_without_the_setting_every_route_makes_its_workflow_as_before(
    make_service: Any, ws: Path, path: str
) -> None:
    svc = await make(make_service, False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=svc.app), base_url="http://o"
    ) as c:
        resp = await c.post(path, json=body_of(path, ws))
    assert resp.status_code == 201, resp.text
    assert [w["id"] for w in await svc.store.list_workflows(limit=10)] == [
        resp.json()["data"]["id"]
    ]
