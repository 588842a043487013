"""The control center ingests `ops.audit.>` from a real nats-server into its hash-chained log:
each event id once, malformed events refused without blocking the others."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from provisioning.control_center.app import ControlCenterService
from provisioning.core.bus.nats import NatsBus
from provisioning.core.settings import load_settings
from provisioning.platform.nats_server import EmbeddedNats
from tests.conftest import free_port


@pytest.fixture
async def world(
    tmp_path: Path, state_url: str
) -> AsyncIterator[tuple[ControlCenterService, NatsBus]]:
    settings = load_settings(
        home=tmp_path / "home",
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
            "nats": {"port": free_port()},
            "control_center": {"admin_password": "consumer admin pass", "port": free_port()},
        },
    )
    server = EmbeddedNats(settings)
    await server.start()
    bus = NatsBus(settings.nats_servers, ack_wait_s=2)
    await bus.connect()
    await bus.ensure()
    cc = ControlCenterService(settings, bus=bus)
    await cc.start()
    try:
        yield cc, bus
    finally:
        await cc.stop()
        await bus.close()
        await server.stop()


def event(n: int, **kw: Any) -> dict[str, Any]:
    return {
        "id": f"ops-evt-{n}",
        "action": "ops:dispatch",
        "result": "success",
        "actor": "ops-controller",
        "actor_type": "system",
        "object_type": "Operation",
        "object_id": f"op-{n}",
        "service": "ops-controller",
        "details": {"jti": f"jti-{n}"},
        **kw,
    }


async def records(cc: ControlCenterService, want: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = await cc.identity.audit_query(service="ops-controller", limit=1000)
        if len(rows) >= want:
            break
        await asyncio.sleep(0.1)
    return rows


async def test_ops_audit_events_join_the_log_once_each(
    world: tuple[ControlCenterService, NatsBus],
) -> None:
    cc, bus = world
    for n in range(20):
        await bus.publish("ops.audit.completed", json.dumps(event(n)).encode(), msg_id=f"m{n}")
    # The same event again under another message id (a re-emitted outbox row): recorded once.
    await bus.publish("ops.audit.completed", json.dumps(event(3)).encode(), msg_id="again-3")
    await bus.publish("ops.audit.failed", b"not json", msg_id="bad-1")
    await bus.publish(
        "ops.audit.failed", json.dumps(event(99, result="maybe")).encode(), msg_id="bad-2"
    )
    await bus.publish("ops.audit.failed", json.dumps(event(20)).encode(), msg_id="m20")

    rows = await records(cc, 21)
    assert sorted(r["id"] for r in rows) == sorted(f"ops-evt-{n}" for n in range(21))
    assert all(r["details"]["forwarded_by"] == "nats:ops.audit" for r in rows)
    deadline = time.monotonic() + 10
    while cc.audit_consumer is not None and cc.audit_consumer.rejected < 2:
        assert time.monotonic() < deadline, "malformed events were not refused"
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.5)  # past ack_wait: nothing comes back to be recorded twice
    assert len(await cc.identity.audit_query(service="ops-controller", limit=1000)) == 21
    assert (await cc.identity.audit_verify()).ok


async def test_a_standalone_control_center_with_nats_url_consumes_once_nats_is_up(
    tmp_path: Path,
) -> None:
    port = free_port()
    settings = load_settings(
        home=tmp_path / "home",
        env={},
        overrides={
            "nats": {"port": port, "url": f"nats://127.0.0.1:{port}"},
            "control_center": {"admin_password": "consumer admin pass", "port": free_port()},
        },
    )
    cc = ControlCenterService(settings)  # no bus handed in: `prvng serve control-center`
    await cc.start()  # NATS is not up yet: the control center starts anyway
    server = EmbeddedNats(settings)
    try:
        await server.start()
        bus = await NatsBus(settings.nats_servers, ack_wait_s=2).connect()
        try:
            await bus.ensure()
            await bus.publish("ops.audit.completed", json.dumps(event(1)).encode(), msg_id="e1")
            assert [r["object_id"] for r in await records(cc, 1)] == ["op-1"]
        finally:
            await bus.close()
    finally:
        await cc.stop()
        await server.stop()
