"""Crash restarts with the real services: the embedded platform as `prvng platform start` builds
it (control center, orchestrator, ops-keeper, ops-controller, audit-mirror, a supervised
nats-server) under the supervisor, each service served on its own loopback port.

One background loop of every service is cancelled in turn (a loop that is gone, whatever ended
it, is a crash): the supervisor restarts that service, the others keep answering, and afterwards
an operation still goes the whole way — keeper decision, NATS, controller, orchestrator, the
control center's audit log and a signed commit in the audit mirror's repository.

Standalone (`prvng serve`), a service owns its store and bus link: stopped and started again in
place, as the supervisor restarts it, it must work on fresh ones, not on the closed ones.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.audit_mirror.app import mirror_paths
from provisioning.core.settings import Settings, load_settings, service_url
from provisioning.platform.embedded import build_platform
from provisioning.platform.supervisor import RestartPolicy, Supervisor
from tests.conftest import free_port
from tests.helpers import until
from tests.integration.test_ops_pipeline import ADMIN, POLICY, SPEC

pytestmark = pytest.mark.timeout(180)

SERVICES = ("control-center", "orchestrator", "ops-keeper", "ops-controller", "audit-mirror")


@dataclass
class Running:
    settings: Settings
    sup: Supervisor
    urls: dict[str, str]
    admin: dict[str, str]


@pytest.fixture
async def platform(tmp_path: Path) -> AsyncIterator[Running]:
    home = tmp_path / "home"
    ports = {name: free_port() for name in (*SERVICES, "nats")}
    settings = load_settings(
        home=home,
        env={},
        overrides={
            "state": {"sqlite_synchronous": "NORMAL"},
            "nats": {"port": ports["nats"], "ack_wait_s": 5},
            "orchestrator": {"poll_interval_s": 0.05, "port": ports["orchestrator"]},
            "control_center": {"admin_password": ADMIN, "port": ports["control-center"]},
            "ops_keeper": {"port": ports["ops-keeper"]},
            "ops_controller": {"port": ports["ops-controller"]},
            "audit_mirror": {"port": ports["audit-mirror"]},
        },
    )
    (home / "config").mkdir(parents=True)
    (home / "config" / "keeper_policy.ncl").write_text(POLICY)
    _cc, services, units = build_platform(settings)
    sup = Supervisor(services, background=units, policy=RestartPolicy(initial_s=0.05, max_s=0.2))
    stop = asyncio.Event()
    runner = asyncio.create_task(sup.run(stop))
    try:
        await asyncio.wait_for(sup.ready.wait(), 60)
        urls = {s.name: service_url(s.host, s.port) for s in services}
        async with httpx.AsyncClient(timeout=10) as http:
            login = await http.post(
                f"{urls['control-center']}/auth/login",
                json={"username": "admin", "password": ADMIN},
            )
        assert login.status_code == 200, login.text
        token = login.json()["data"]["access_token"]
        yield Running(settings, sup, urls, {"Authorization": f"Bearer {token}"})
    finally:
        stop.set()
        await asyncio.wait_for(runner, 60)


async def _healthy(http: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await http.get(f"{url}/health")).status_code == 200
    except httpx.HTTPError:
        return False


async def test_each_real_service_is_restarted_and_an_op_still_goes_the_whole_way(
    platform: Running,
) -> None:
    p = platform
    async with httpx.AsyncClient(timeout=10) as http:
        for name in SERVICES:
            unit = p.sup.units[name]
            loops = unit.service.background_tasks()  # type: ignore[attr-defined]
            assert loops, f"{name} offers no background loop to watch"
            before = unit.serve_task
            loops[0].cancel()
            await until(f"{name} was restarted", lambda u=unit, b=before: _restarted(u, b))
            for other in SERVICES:
                assert await until(f"{other} answers", lambda o=other: _healthy(http, p.urls[o]))
        assert {n: p.sup.units[n].restarts for n in SERVICES} == dict.fromkeys(SERVICES, 1)

        resp = await http.post(
            f"{p.urls['ops-keeper']}/ops",
            headers=p.admin,
            json={"op_type": "workflow.submit", "target": "dev/after-restarts", "params": SPEC},
        )
        assert resp.status_code == 201, resp.text
        op_id = resp.json()["data"]["id"]

        async def workflow() -> dict[str, Any] | None:
            found = await http.get(
                f"{p.urls['orchestrator']}/workflows",
                headers=p.admin,
                params={"idempotency_key": f"op:{op_id}"},
            )
            rows = found.json()["data"]
            return rows[0] if rows and rows[0]["status"] == "Completed" else None

        assert await until("the op ran to Completed", workflow)

        async def audited() -> list[Any]:
            got = await http.get(
                f"{p.urls['control-center']}/audit",
                headers=p.admin,
                params={"action": "ops:dispatch", "object_id": op_id},
            )
            return list(got.json()["data"])

        assert await until("the outcome reached the control center's log", audited)

    repo, _state = mirror_paths(p.settings)

    async def mirrored() -> bool:
        log = subprocess.run(
            ["git", "--git-dir", str(repo), "log", "--format=%B", "-n", "50"],
            capture_output=True,
            text=True,
            check=False,
        )
        return op_id in log.stdout

    assert await until("the audit mirror committed the op's events", mirrored)


async def _restarted(unit: Any, before: Any) -> bool:
    """Started again: a new HTTP server task, serving."""
    task = unit.serve_task
    return bool(
        unit.restarts >= 1
        and unit.running
        and task is not None
        and task is not before
        and not task.done()
        and unit.server is not None
        and unit.server.started
    )


async def test_standalone_services_start_again_after_a_stop(tmp_path: Path) -> None:
    """`prvng serve <service>` restarts a crashed service in place (stop, then start): a service
    that owns its store, bus link and HTTP client must work after that, not on closed ones."""
    from datetime import UTC, datetime

    from provisioning.control_center.app import ControlCenterService
    from provisioning.ops_controller.app import OpsControllerService

    settings = load_settings(
        home=tmp_path / "home",
        env={},
        overrides={
            "state": {"sqlite_synchronous": "NORMAL"},
            "nats": {"url": f"nats://127.0.0.1:{free_port()}"},  # nobody there: link retries
            "control_center": {"admin_password": ADMIN, "port": free_port()},
        },
    )
    cc = ControlCenterService(settings)
    await cc.start()
    await cc.stop()
    await cc.start()
    try:
        transport = httpx.ASGITransport(app=cc.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cc") as http:
            login = await http.post("/auth/login", json={"username": "admin", "password": ADMIN})
        assert login.status_code == 200, login.text
    finally:
        await cc.stop()

    ctl = OpsControllerService(settings)
    await ctl.start()
    await ctl.stop()
    await ctl.start()
    try:
        record, new = await ctl.store.claim(
            "jti-after-restart", "server.create", now=datetime.now(UTC)
        )
        assert new and record.state == "received"
    finally:
        await ctl.stop()
