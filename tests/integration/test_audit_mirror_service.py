"""The audit-mirror service on a real nats-server and real git: events published on
``ops.audit.>`` become one signed commit each, duplicates (same Nats-Msg-Id or the same event id
sent again) make no second commit, an unmirrorable event is set aside without blocking its
batch, the repository is pushed to a configured remote, and a restart redelivers nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.audit_mirror import verify_repo
from provisioning.audit_mirror.app import AuditMirrorService
from provisioning.core.bus.nats import NatsBus, connect_bus
from provisioning.core.settings import Settings, load_settings
from provisioning.platform.nats_server import EmbeddedNats
from tests.conftest import free_port
from tests.helpers import until
from tests.integration.test_audit_mirror import make_events


@pytest.fixture
async def settings(tmp_path: Path) -> AsyncIterator[Settings]:
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    s = load_settings(
        home=tmp_path / "home",
        env={},
        overrides={
            "nats": {"port": free_port(), "ack_wait_s": 5},
            "audit_mirror": {"port": free_port(), "remotes": [str(remote)], "batch": 50},
        },
    )
    srv = EmbeddedNats(s)
    await srv.start()
    try:
        yield s
    finally:
        await srv.stop()


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[NatsBus]:
    b = await connect_bus(settings, name="test-publisher")
    try:
        yield b
    finally:
        await b.close()


async def publish(bus: NatsBus, events: list[dict[str, Any]], *, msg_ids: bool = True) -> None:
    for e in events:
        await bus.publish(
            "ops.audit.completed",
            json.dumps(e).encode(),
            msg_id=str(e["id"]) if msg_ids else None,
        )


def remote_head(settings: Settings) -> str:
    remote = settings.audit_mirror.remotes[0]
    return subprocess.run(
        ["git", f"--git-dir={remote}", "rev-parse", "--verify", "-q", "refs/heads/main"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


async def test_each_event_becomes_one_verified_commit_and_reaches_the_remote(
    settings: Settings, bus: NatsBus
) -> None:
    svc = AuditMirrorService(settings)
    await svc.start()
    try:
        events = make_events(120)
        await publish(bus, events[:60])
        # A malformed event and one without `ts` sit between good ones: set aside, not blocking.
        await bus.publish("ops.audit.completed", b"{not json", msg_id="broken-1")
        await bus.publish("ops.audit.failed", json.dumps({"id": "no-ts", "action": "x:y"}).encode())
        await publish(bus, events[60:])
        await publish(bus, events[:10], msg_ids=False)  # the same events again, new messages
        await until("every event mirrored", lambda: svc.mirror.count == 120)
        await until("the bad events set aside", lambda: svc.rejected == 2)
        await until("the last batch pushed", lambda: remote_head(settings) == svc.mirror.head)

        report = verify_repo(
            svc.mirror.repo, svc.mirror.allowed_signers_path, svc.mirror.checkpoint_path
        )
        assert report.ok, report
        assert report.total == report.checked == 120
        transport = httpx.ASGITransport(app=svc.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://m") as http:
            health = (await http.get("/health")).json()["data"]
            metrics = (await http.get("/metrics")).text
        assert health["events"] == 120 and health["nats"] == "connected"
        assert health["remotes"][settings.audit_mirror.remotes[0]]["ok"] is True
        assert "prvng_audit_mirror_events 120.0" in metrics
        assert "prvng_audit_mirror_rejected 2.0" in metrics
    finally:
        await svc.stop()


async def test_a_restart_commits_what_came_meanwhile_and_nothing_twice(
    settings: Settings, bus: NatsBus
) -> None:
    events = make_events(80)
    first = AuditMirrorService(settings)
    await first.start()
    try:
        await publish(bus, events[:40])
        await until("the first half mirrored", lambda: first.mirror.count == 40)
    finally:
        await first.stop()
    head_before = first.mirror.head
    await publish(bus, events[40:])
    await publish(bus, events[:40], msg_ids=False)  # e.g. a producer that retried
    second = AuditMirrorService(settings)
    await second.start()
    try:
        await until("the second half mirrored", lambda: second.mirror.count == 80)
        await asyncio.sleep(1.5)  # the duplicates are delivered too; none may add a commit
        assert second.mirror.count == 80
        assert second.duplicates >= 40
        log = subprocess.run(
            ["git", f"--git-dir={second.mirror.git_dir}", "rev-list", "refs/heads/main"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert len(log) == 80 and head_before in log
    finally:
        await second.stop()


async def test_it_waits_for_nats_and_starts_consuming_once_it_is_up(tmp_path: Path) -> None:
    s = load_settings(
        home=tmp_path / "home",
        env={},
        overrides={"nats": {"port": free_port()}, "audit_mirror": {"port": free_port()}},
    )
    svc = AuditMirrorService(s, retry_interval_s=0.2)
    await svc.start()  # NATS is not running yet: the service starts anyway
    srv = EmbeddedNats(s)
    try:
        await until("it says NATS is missing", lambda: "NATS" in (svc.last_error or ""))
        assert not svc.connected
        await srv.start()
        b = await connect_bus(s, name="late-publisher")
        try:
            await publish(b, make_events(5))
            await until("mirrored once NATS came", lambda: svc.mirror.count == 5)
        finally:
            await b.close()
    finally:
        await svc.stop()
        await srv.stop()
