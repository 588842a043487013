"""The control center and an orchestrator as two processes with their own stores
(`prvng serve control-center`, `prvng serve orchestrator`), as in the distributed topology.

The orchestrator verifies tokens against the control center's JWKS, sees a logout and a
disabled user within seconds, and forwards its audit events (mutations and denials) through
its outbox with a service API key. Without the key the events wait in the outbox; they reach
the control center's hash-chained log once the key is set, each recorded once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.procs import ControlCenterProc, Worker, WorkerPool

ADMIN_PASSWORD = "standalone admin passphrase"
WORKFLOW = {"name": "standalone", "tasks": [{"name": "a", "action": "noop"}]}


def eventually(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll ``check`` until it answers something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Topology:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.cc: ControlCenterProc = pool.add_control_center(
            env={"PRVNG_CONTROL_CENTER__ADMIN_PASSWORD": ADMIN_PASSWORD}
        )
        self.cc.start()
        self.cc.wait_healthy()
        self.http = httpx.Client(base_url=self.cc.url, timeout=10.0)
        self.admin = self.login("admin", ADMIN_PASSWORD)

    def login(self, username: str, password: str) -> dict[str, Any]:
        resp = self.http.post("/auth/login", json={"username": username, "password": password})
        assert resp.status_code == 200, resp.text
        return dict(resp.json()["data"])

    def orchestrator(self, service_key: str | None) -> Worker:
        env = {
            "PRVNG_ORCHESTRATOR__AUTH": "required",
            "PRVNG_CONTROL_CENTER__URL": self.cc.url,
        }
        if service_key:
            env["PRVNG_CONTROL_CENTER__SERVICE_API_KEY"] = service_key
        worker = self.pool.add("orch-1", env=env)
        worker.start()
        worker.wait_healthy()
        return worker

    def audit(self, **params: Any) -> list[dict[str, Any]]:
        resp = self.http.get("/audit", params=params, headers=bearer(self.admin["access_token"]))
        assert resp.status_code == 200, resp.text
        return list(resp.json()["data"])

    def service_key(self) -> str:
        resp = self.http.post(
            "/apikeys",
            headers=bearer(self.admin["access_token"]),
            json={"name": "orchestrator audit", "scopes": ["audit:write"]},
        )
        assert resp.status_code == 201, resp.text
        return str(resp.json()["data"]["key"])


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    pool = WorkerPool(tmp_path)
    try:
        topo = Topology(pool)
        yield topo
        topo.http.close()
    finally:
        pool.close()


def test_a_standalone_orchestrator_forwards_its_audit_events_and_sees_logouts(
    topology: Topology,
) -> None:
    t = topology
    orch = t.orchestrator(t.service_key())
    admin = bearer(t.admin["access_token"])
    resp = t.http.post(
        "/users",
        headers=admin,
        json={"username": "vic", "password": "viewer passphrase 1", "roles": ["viewer"]},
    )
    assert resp.status_code == 201, resp.text
    viewer = bearer(t.login("vic", "viewer passphrase 1")["access_token"])

    with httpx.Client(base_url=orch.url, timeout=10.0) as o:
        assert o.get("/workflows").status_code == 401
        submitted = o.post("/workflows", headers=admin, json=WORKFLOW)
        assert submitted.status_code == 201, submitted.text
        wf_id = submitted.json()["data"]["id"]
        assert o.post("/workflows", headers=viewer, json=WORKFLOW).status_code == 403

        created = eventually(
            "the submission reaches the control center's audit log",
            lambda: t.audit(action="workflow:create", result="success"),
        )
        assert [(r["actor"], r["service"], r["object_id"]) for r in created] == [
            ("admin", "orchestrator", wf_id)
        ]
        assert created[0]["details"]["path"] == "/workflows"
        assert created[0]["details"]["forwarded_by"].startswith("prvng_")
        denied = eventually(
            "the viewer's denial reaches the audit log",
            lambda: t.audit(action="workflow:create", result="denied"),
        )
        assert [(r["actor"], r["service"]) for r in denied] == [("vic", "orchestrator")]

        # A logout ends the token on the orchestrator too (within its cache of 2 s).
        assert o.get("/workflows", headers=viewer).status_code == 200
        assert t.http.post("/auth/logout", headers=viewer).status_code == 200
        eventually(
            "the orchestrator refuses the logged-out token",
            lambda: o.get("/workflows", headers=viewer).status_code == 401,
            timeout=10,
        )
        assert o.get("/workflows", headers=admin).status_code == 200

    verified = t.http.get("/audit/verify", headers=admin).json()["data"]
    assert verified["ok"] is True, verified


def test_audit_events_wait_in_the_outbox_until_a_service_key_is_set(
    topology: Topology,
) -> None:
    t = topology
    admin = bearer(t.admin["access_token"])
    orch = t.orchestrator(service_key=None)
    with httpx.Client(base_url=orch.url, timeout=10.0) as o:
        ids = []
        for _ in range(3):
            resp = o.post("/workflows", headers=admin, json=WORKFLOW)
            assert resp.status_code == 201, resp.text
            ids.append(resp.json()["data"]["id"])
    time.sleep(2.5)  # more than the relay's interval: nothing may arrive without a key
    assert t.audit(action="workflow:create") == []
    assert "no control_center.service_api_key" in orch.log_tail()

    # A key without the audit:write scope is refused, and the events still wait.
    weak = t.http.post(
        "/apikeys", headers=admin, json={"name": "weak", "scopes": ["workflow:read"]}
    ).json()["data"]["key"]
    refused = t.http.post(
        "/audit/ingest",
        headers={"X-API-Key": weak},
        json={
            "events": [
                {
                    "id": "forged-1",
                    "action": "workflow:create",
                    "result": "success",
                    "actor_type": "user",
                    "actor": "mallory",
                    "service": "orchestrator",
                }
            ]
        },
    )
    assert refused.status_code == 403
    # Nor may a person's login forward events in a service's name.
    as_admin = t.http.post(
        "/audit/ingest",
        headers=admin,
        json={
            "events": [
                {
                    "id": "forged-2",
                    "action": "workflow:create",
                    "result": "success",
                    "actor_type": "user",
                    "service": "orchestrator",
                }
            ]
        },
    )
    assert as_admin.status_code == 403

    orch.terminate()
    orch.env["PRVNG_CONTROL_CENTER__SERVICE_API_KEY"] = t.service_key()
    orch.start()
    orch.wait_healthy()

    records = eventually(
        "the waiting events reach the audit log",
        lambda: (r := t.audit(action="workflow:create")) and len(r) >= 3 and r,
    )
    assert sorted(r["object_id"] for r in records) == sorted(ids)
    time.sleep(1.5)  # a second delivery would show up by now
    assert len(t.audit(action="workflow:create")) == 3
    assert t.http.get("/audit/verify", headers=admin).json()["data"]["ok"] is True
