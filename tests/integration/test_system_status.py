"""Monitoring on real parts: a real nats-server, the embedded platform's services (control
center, orchestrator, ops-keeper, ops-controller, audit-mirror) each served by uvicorn on its
own 127.0.0.1 port, so every probe of ``GET /system/status`` is real HTTP. A service is taken
down by stopping its server (connection refused) or by putting a socket that never answers on
its port (a hung service); the document must name it and still answer within the probe bound.
The live stream ``GET /system/events`` is read over real HTTP, disconnected and resumed with
``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from provisioning.control_center.app import ControlCenterService
from provisioning.control_center.client import ControlCenterClient
from provisioning.core.bus.nats import NatsBus
from provisioning.core.errors import Unreachable
from provisioning.core.settings import load_settings
from provisioning.core.sse import EventRing, ServerEvent, iter_events
from provisioning.orchestrator.app import OrchestratorService
from provisioning.platform.embedded import build_services
from provisioning.platform.nats_server import EmbeddedNats
from provisioning.platform.supervisor import Service
from tests.conftest import free_port, wait_workflow
from tests.helpers import until

pytestmark = pytest.mark.timeout(120)

ADMIN = "monitoring admin passphrase"
PASSWORD = "monitoring user passphrase"
PG_PASSWORD = "not-a-real-pg-secret-4711"
SSE = {"Accept": "text/event-stream"}
# A site policy: viewers may not see the system pages (every default role may).
NO_VIEWERS = 'forbid (principal in Role::"viewer", action == Action::"system:read", resource);\n'


def failing(on_failure: str = "fail") -> dict[str, Any]:
    """A workflow whose one task fails at once: ``Failed`` (or ``RolledBack``) soon."""
    task = {
        "name": "boom",
        "command": ["sh", "-c", "exit 3"],
        "retry": {"max_attempts": 1},
        "on_failure": on_failure,
    }
    return {"name": "doomed", "tasks": [task]}


@dataclass
class Platform:
    cc: ControlCenterService
    orch: OrchestratorService
    bus: NatsBus
    services: dict[str, Service]
    http: httpx.AsyncClient  # the control center over real HTTP
    servers: dict[str, tuple[uvicorn.Server, asyncio.Task[None]]] = field(default_factory=dict)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # caller → auth headers
    secrets: list[str] = field(default_factory=list)

    async def serve(self, name: str) -> None:
        svc = self.services[name]
        config = uvicorn.Config(
            svc.app,
            host="127.0.0.1",
            port=svc.port,
            lifespan="off",
            log_level="warning",
            ws="none",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        deadline = time.monotonic() + 10
        while not server.started:
            assert not task.done(), f"{name}: uvicorn exited before it started"
            assert time.monotonic() < deadline, f"{name}: uvicorn did not start in 10 s"
            await asyncio.sleep(0.01)
        self.servers[name] = (server, task)

    async def stop_serving(self, name: str) -> None:
        server, task = self.servers.pop(name)
        server.should_exit = True
        await asyncio.wait_for(task, 15)

    async def status(self, who: str = "admin") -> dict[str, Any]:
        resp = await self.http.get("/system/status", headers=self.headers[who])
        assert resp.status_code == 200, resp.text
        return dict(resp.json()["data"])

    async def submit(self, who: str, spec: dict[str, Any]) -> str:
        orch_url = f"http://127.0.0.1:{self.orch.port}"
        async with httpx.AsyncClient(base_url=orch_url, headers=self.headers[who]) as c:
            resp = await c.post("/workflows", json=spec)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["data"]["id"])


@asynccontextmanager
async def platform(
    tmp_path: Path, state_url: str, *, ops_embedded: bool = True
) -> AsyncIterator[Platform]:
    home = tmp_path / "home"
    (home / "config" / "policies").mkdir(parents=True)
    (home / "config" / "policies" / "no-viewers.cedar").write_text(NO_VIEWERS, encoding="utf-8")
    settings = load_settings(
        home=home,
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
            "nats": {"port": free_port()},
            "orchestrator": {"poll_interval_s": 0.05, "port": free_port()},
            "control_center": {"admin_password": ADMIN, "port": free_port()},
            "ops_keeper": {"port": free_port()},
            "ops_controller": {"port": free_port(), "embedded": ops_embedded},
            "audit_mirror": {"port": free_port(), "embedded": ops_embedded},
        },
    )
    async with AsyncExitStack() as stack:
        nats = EmbeddedNats(settings)
        await nats.start()
        stack.push_async_callback(nats.stop)
        bus = await NatsBus(settings.nats_servers).connect()
        stack.push_async_callback(bus.close)
        await bus.ensure()
        cc, services = build_services(settings, bus=bus)
        orch = next(s for s in services if isinstance(s, OrchestratorService))
        for svc in services:
            await svc.start()
            if svc is orch:
                stack.push_async_callback(orch.stop, kill_running=True)
            else:
                stack.push_async_callback(svc.stop)
        http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=settings.control_center_url, timeout=10)
        )
        p = Platform(cc, orch, bus, {s.name: s for s in services}, http)
        for name in p.services:
            await p.serve(name)

        async def stop_servers() -> None:
            for name in list(p.servers):
                await p.stop_serving(name)

        stack.push_async_callback(stop_servers)
        await _users(p)
        yield p


async def _users(p: Platform) -> None:
    async def login(name: str, password: str) -> None:
        resp = await p.http.post("/auth/login", json={"username": name, "password": password})
        assert resp.status_code == 200, resp.text
        token = resp.json()["data"]["access_token"]
        p.headers[name] = {"Authorization": f"Bearer {token}"}
        p.secrets.append(token)

    await login("admin", ADMIN)
    for name, role in (("dev", "developer"), ("dora", "developer"), ("vic", "viewer")):
        body = {"username": name, "password": PASSWORD, "roles": [role]}
        resp = await p.http.post("/users", headers=p.headers["admin"], json=body)
        assert resp.status_code == 201, resp.text
        await login(name, PASSWORD)
    body = {"name": "reader", "scopes": ["workflow:read"]}
    resp = await p.http.post("/apikeys", headers=p.headers["dev"], json=body)
    assert resp.status_code == 201, resp.text
    key = resp.json()["data"]["key"]
    p.headers["scoped-key"] = {"X-API-Key": key}
    p.secrets += [key, ADMIN, PASSWORD]


def service(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(next(s for s in doc["services"] if s["name"] == name))


def with_password(url: str) -> str:
    """A PostgreSQL URL carrying a password (the loopback server trusts and ignores it)."""
    if not url.startswith("postgresql://"):
        return url
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.split("@", 1)
    return f"{scheme}://{userinfo}:{PG_PASSWORD}@{host}"


@contextlib.contextmanager
def silent_listener(port: int) -> Any:
    """A socket on ``port`` that takes connections and never answers: a hung service."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    try:
        yield sock
    finally:
        sock.close()


class EventReader:
    """The events of one live ``/system/events`` answer, read with a deadline each."""

    def __init__(self, resp: httpx.Response) -> None:
        self._events = iter_events(resp.aiter_lines())

    async def next(self, event: str | None = None, timeout_s: float = 15) -> ServerEvent:
        """The next event (of kind ``event``, skipping others)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {event or 'event'} within {timeout_s} s"
            ev = await asyncio.wait_for(anext(self._events), left)
            if event is None or ev.event == event:
                return ev


@asynccontextmanager
async def events(
    p: Platform, who: str = "admin", last_event_id: str | None = None, interval: float = 1
) -> AsyncIterator[EventReader]:
    headers = {**p.headers[who], **SSE}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with p.http.stream(
        "GET", "/system/events", params={"interval": interval}, headers=headers
    ) as resp:
        assert resp.status_code == 200, (await resp.aread()).decode()
        assert resp.headers["content-type"].startswith("text/event-stream")
        yield EventReader(resp)


# ---------------------------------------------------------------------- the document


async def test_with_everything_up_the_document_is_ok_and_every_section_is_filled(
    tmp_path: Path, state_url: str
) -> None:
    async with platform(tmp_path, with_password(state_url)) as p:
        doc = await p.status()
        assert doc["status"] == "ok", doc["reasons"]
        assert doc["reasons"] == []
        names = [s["name"] for s in doc["services"]]
        assert names == [
            "control-center",
            "orchestrator",
            "ops-keeper",
            "ops-controller",
            "audit-mirror",
        ]
        for s in doc["services"]:
            assert s["status"] == "up" and s["expected"], s
            assert s["version"] and s["uptime_s"] is not None and s["latency_ms"] is not None
            assert s["error"] is None and s["url"].startswith("http://127.0.0.1:")

        nats = doc["nats"]
        assert nats["status"] == "connected"
        assert nats["servers"] == p.bus.servers and nats["connected_url"]
        streams = {s["name"]: s for s in nats["streams"]}
        assert set(streams) == {"OPS_PENDING", "OPS_AUDIT", "TASKS", "EVENTS"}
        assert streams["OPS_AUDIT"]["subjects"] == ["ops.audit.>"]
        consumers = {(c["stream"], c["durable"]) for c in nats["consumers"]}
        assert consumers == {
            ("OPS_PENDING", "ops-controller"),
            ("OPS_AUDIT", "audit-mirror"),
            ("OPS_AUDIT", "control-center"),
        }

        store = doc["stores"]["state"]
        assert store["status"] == "up" and store["latency_ms"] is not None
        assert store["kind"] == ("sqlite" if state_url.startswith("sqlite") else "postgresql")
        if store["kind"] == "sqlite":
            assert store["target"] == str(tmp_path / "state.db")
        else:
            assert store["target"].startswith("127.0.0.1:5432/prvng_test_")

        host = doc["host"]
        assert 0 <= host["cpu_percent"] <= 100 * host["cpu_count"]
        assert len(host["load_average"]) == 3
        assert 0 < host["memory"]["used"] < host["memory"]["total"]
        assert 0 < host["disk"]["used"] < host["disk"]["total"]

        orch = doc["orchestrator"]
        assert orch["error"] is None and orch["recent_failures_error"] is None
        assert orch["queue_depth"] == 0 and orch["running_tasks"] == 0
        assert orch["recent_failures"] == []

        # Nothing secret: no password of the store URL, no API key, token or password.
        text = json.dumps(doc)
        for secret in [*p.secrets, PG_PASSWORD]:
            assert secret not in text

        # The typed client reads the same document.
        token = p.headers["admin"]["Authorization"].split()[1]
        async with ControlCenterClient(str(p.http.base_url), token=token) as c:
            again = await c.system_status()
        assert again["services"][0]["name"] == "control-center"


async def test_a_hung_or_stopped_service_degrades_the_document_which_still_answers_fast(
    tmp_path: Path,
) -> None:
    async with platform(tmp_path, f"sqlite:///{tmp_path / 'state.db'}") as p:
        mirror_port = p.services["audit-mirror"].port
        await p.stop_serving("audit-mirror")
        with silent_listener(mirror_port):
            started = time.monotonic()
            doc = await p.status()
            took = time.monotonic() - started
        assert took < 1.5, f"the status took {took:.2f} s with a hung service"
        assert doc["status"] == "degraded"
        mirror = service(doc, "audit-mirror")
        assert mirror["status"] == "down" and "no answer within 1 s" in mirror["error"]
        assert any(r.startswith("audit-mirror is down") for r in doc["reasons"]), doc["reasons"]
        assert service(doc, "orchestrator")["status"] == "up"

        # Refused outright, the orchestrator makes the platform down (nothing can run).
        await p.stop_serving("orchestrator")
        await asyncio.sleep(1.1)  # the shared sample is reused for up to 1 s
        doc = await p.status()
        assert doc["status"] == "down"
        orch = service(doc, "orchestrator")
        assert orch["status"] == "down" and orch["error"], orch
        assert doc["orchestrator"]["error"] and doc["orchestrator"]["queue_depth"] is None
        assert doc["orchestrator"]["recent_failures_error"]


async def test_consumer_lag_shows_the_messages_nobody_took(tmp_path: Path) -> None:
    # No controller and no mirror consume: what is published waits on their durables.
    async with platform(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", ops_embedded=False) as p:
        for n in range(2):
            await p.bus.publish(f"ops.pending.test.{n}", b"{}", msg_id=f"lag-{n}")
        consumer = await p.bus.consumer("OPS_PENDING", "ops-controller")
        got = await consumer.fetch(2, timeout_s=2)
        assert len(got) == 2
        await got[0].nak(0)
        again = await consumer.fetch(1, timeout_s=2)
        assert again and again[0].num_delivered == 2
        for n in range(2, 5):  # never fetched: the lag
            await p.bus.publish(f"ops.pending.test.{n}", b"{}", msg_id=f"lag-{n}")

        async def lagging() -> dict[str, Any] | None:
            doc = await p.status()
            c = next(c for c in doc["nats"]["consumers"] if c["durable"] == "ops-controller")
            return doc if (c["num_pending"], c["num_ack_pending"]) == (3, 2) else None

        doc = await until("the lag shows", lagging)
        pending = next(c for c in doc["nats"]["consumers"] if c["durable"] == "ops-controller")
        assert pending["num_redelivered"] == 1 and pending["delivered_seq"] >= 2
        stream = next(s for s in doc["nats"]["streams"] if s["name"] == "OPS_PENDING")
        assert stream["messages"] == 5 and stream["last_seq"] == 5 and stream["bytes"] > 0

        # The services that would consume are expected (NATS is configured) and down.
        assert doc["status"] == "degraded"
        for name in ("ops-controller", "audit-mirror"):
            assert service(doc, name)["status"] == "down"
            assert any(r.startswith(f"{name} is down") for r in doc["reasons"])
        for d in [*got[1:], *again]:
            await d.ack()


async def test_failed_workflows_show_in_recent_failures_to_those_who_may_read_them(
    tmp_path: Path,
) -> None:
    async with platform(tmp_path, f"sqlite:///{tmp_path / 'state.db'}") as p:
        failed = await p.submit("dev", failing())
        rolled_back = await p.submit("dev", failing("rollback"))
        await wait_workflow(p.orch, failed, {"Failed"})
        await wait_workflow(p.orch, rolled_back, {"RolledBack"})
        await asyncio.sleep(1.1)  # past the shared sample's reuse

        doc = await p.status("admin")
        recent = doc["orchestrator"]["recent_failures"]
        assert {f["id"] for f in recent} == {failed, rolled_back}
        assert {f["status"] for f in recent} == {"Failed", "RolledBack"}
        assert all(f["name"] == "doomed" and f["finished_at"] for f in recent)
        assert doc["orchestrator"]["workflows_by_state"].get("Failed") == 1
        assert doc["status"] == "ok"  # a workflow failing is not the platform failing

        assert {f["id"] for f in (await p.status("dev"))["orchestrator"]["recent_failures"]} == {
            failed,
            rolled_back,
        }
        # Another developer sees none of them: the orchestrator answered with her credentials.
        assert (await p.status("dora"))["orchestrator"]["recent_failures"] == []


# ---------------------------------------------------------------------- the live stream


async def test_the_stream_sends_status_then_changes_and_a_resumed_stream_gets_what_it_missed(
    tmp_path: Path,
) -> None:
    async with platform(tmp_path, f"sqlite:///{tmp_path / 'state.db'}") as p:
        async with events(p, interval=1) as stream:
            first = await stream.next()
            assert first.event == "status" and first.id
            assert first.json()["status"] == "ok"

            await p.stop_serving("ops-controller")
            down = await stream.next("service")
            assert down.json()["service"] == "ops-controller"
            assert (down.json()["status"], down.json()["previous"]) == ("down", "up")

            failed = await p.submit("admin", failing())
            failure = await stream.next("failure")
            assert failure.json()["workflow"]["id"] == failed
            last_id = failure.id
            assert last_id is not None
            status = await stream.next("status")
            assert status.json()["status"] == "degraded"

        # While nobody listens, another service goes down; a status request notices.
        await p.stop_serving("audit-mirror")
        await asyncio.sleep(1.1)
        assert service(await p.status(), "audit-mirror")["status"] == "down"

        async with events(p, last_event_id=last_id) as resumed:
            missed = await resumed.next()
            assert missed.event == "service" and missed.json()["service"] == "audit-mirror"
            assert (await resumed.next()).event == "status"

        # An id this process never gave out (too old, or another run's): a fresh status first.
        async with events(p, last_event_id="0a0b0c0d.1") as fresh:
            assert (await fresh.next()).event == "status"

        # From the start of the ring: the admin is told about the failure, the developer who
        # does not own the workflow is not.
        start = last_id.rsplit(".", 1)[0] + ".0"
        for who, told in (("admin", ["service", "failure", "service"]), ("dora", ["service"] * 2)):
            async with events(p, who=who, last_event_id=start) as replay:
                kinds = []
                while (ev := await replay.next()).event != "status":
                    kinds.append(ev.event)
                assert kinds == told, who


async def test_streams_are_bounded_and_end_when_the_client_goes(tmp_path: Path) -> None:
    async with platform(tmp_path, f"sqlite:///{tmp_path / 'state.db'}") as p:
        p.cc.monitor.ring.max_subscribers = 1
        async with events(p) as stream:
            assert (await stream.next()).event == "status"
            assert p.cc.monitor.ring.subscribers == 1
            busy = await p.http.get(
                "/system/events", headers={**p.headers["admin"], **SSE}, timeout=5
            )
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "5"
            assert "too many live monitoring streams" in busy.json()["error"]["message"]

        async def released() -> bool:
            return p.cc.monitor.ring.subscribers == 0

        await until("the stream ended with its client", released, timeout_s=10)
        async with events(p) as again:
            assert (await again.next()).event == "status"

        # Without `Accept: text/event-stream` the answer is one status, then it ends.
        once = await p.http.get("/system/events", headers=p.headers["admin"], timeout=10)
        assert once.status_code == 200
        assert [line for line in once.text.splitlines() if line.startswith("event:")] == [
            "event: status"
        ]


async def test_callers_without_system_read_are_refused(tmp_path: Path) -> None:
    async with platform(tmp_path, f"sqlite:///{tmp_path / 'state.db'}") as p:
        for who in ("vic", "scoped-key"):  # a viewer (site policy) and a workflow:read key
            for path in ("/system/status", "/system/events"):
                resp = await p.http.get(path, headers={**p.headers[who], **SSE})
                assert resp.status_code == 403, (who, path, resp.text)
                assert "system:read" in resp.json()["error"]["message"]
        assert (await p.http.get("/system/status")).status_code == 401
        assert (await p.http.get("/system/events", headers=SSE)).status_code == 401
        assert (await p.status("dev"))["status"] == "ok"


async def test_the_event_ring_is_bounded_and_resumes_only_what_it_still_holds() -> None:
    ring = EventRing(size=3, max_subscribers=1, queue_size=2)
    sub = ring.subscribe()
    with pytest.raises(Unreachable, match="too many live streams"):
        ring.subscribe()
    for n in range(5):
        ring.publish("service", {"n": n})
    assert [e.seq for e in ring.since(2) or []] == [3, 4, 5]
    assert ring.since(1) is None  # seq 2 is gone: the client must start over
    assert ring.since(5) == []
    assert ring.parse_id(ring.id_of(4)) == 4
    for bad in (None, "", "4", "other.4", f"{ring.epoch}.x", f"{ring.epoch}.99"):
        assert ring.parse_id(bad) is None
    # A reader that fell behind is marked instead of its queue growing.
    assert sub.overflowed and [e.seq for e in sub.drain()] == [1, 2]
    ring.unsubscribe(sub)
    assert ring.subscribers == 0 and ring.subscribe() is not None


# ---------------------------------------------------------------------- the CLI


async def _prvng(p: Platform, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """`prvng --cc-url <cc> … <args>` in its own process with an admin API key (the servers
    run in this event loop, so the process is awaited, never waited for)."""
    resp = await p.http.post("/apikeys", headers=p.headers["admin"], json={"name": "cli"})
    assert resp.status_code == 201, resp.text
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRVNG_")}
    env |= {"PRVNG_API_KEY": resp.json()["data"]["key"], "XDG_CONFIG_HOME": str(tmp_path / "x")}
    argv = ["-m", "provisioning.cli.main", "--data-dir", str(tmp_path / "cli-home")]
    argv += ["--cc-url", str(p.http.base_url).rstrip("/"), *args]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_prvng_system_status_prints_the_summary_and_fails_when_degraded(
    tmp_path: Path,
) -> None:
    async with platform(tmp_path, f"sqlite:///{tmp_path / 'state.db'}") as p:
        code, out, err = await _prvng(p, tmp_path, "system", "status")
        assert code == 0, out + err
        assert "platform OK" in out
        for name in ("control-center", "orchestrator", "audit-mirror", "OPS_AUDIT"):
            assert name in out

        await p.stop_serving("audit-mirror")
        await asyncio.sleep(1.1)
        code, out, err = await _prvng(p, tmp_path, "--output", "json", "system", "status")
        assert code == 1, out + err
        doc = json.loads(out)  # stdout is the document alone
        assert doc["status"] == "degraded"
        assert "the platform is degraded: audit-mirror is down" in err
        code, _, err = await _prvng(p, tmp_path, "system", "status", "--fail-on", "down")
        assert code == 0, err
