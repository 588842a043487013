"""The ops-controller's consume loop on a real nats-server and a real idempotency store (SQLite
and PostgreSQL), with a recording dispatcher standing in for the orchestrator: exactly-once
dispatch under replay, Term for hostile messages with an audit event each, Nak with growing
delays then Term after max_deliver, 4xx refusals, heartbeats for slow dispatches, and
reconciliation of records a crash left `dispatched`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from provisioning.core.bus.nats import NatsBus
from provisioning.core.ops_token import VerifiedOp, canonical_params
from provisioning.core.settings import load_settings
from provisioning.core.signing import KeyRing, StaticJwks, TokenVerifier
from provisioning.core.store import open_database
from provisioning.ops_controller.controller import DispatchFailed, Nak, OpsController, Term
from provisioning.ops_controller.idempotency_sql import SqlIdempotencyStore
from provisioning.platform.nats_server import EmbeddedNats
from tests.conftest import free_port

AUD, ISS = "prvng-ops", "prvng-ops-keeper"


@dataclass
class Recorder:
    """Answers like the orchestrator: the same workflow for the same idempotency key."""

    fail_with: DispatchFailed | None = None
    slow_s: float = 0.0
    calls: list[str] = field(default_factory=list)

    async def dispatch(self, op: VerifiedOp) -> dict[str, Any]:
        self.calls.append(op.jti)
        if self.slow_s:
            await asyncio.sleep(self.slow_s)
        if self.fail_with is not None:
            raise self.fail_with
        return {"workflow_id": f"wf-{op.jti}"}


@dataclass
class World:
    bus: NatsBus
    ring: KeyRing
    ctl: OpsController
    recorder: Recorder
    stop: asyncio.Event
    loop: asyncio.Task[None] | None = None

    def token(self, **claims: Any) -> tuple[str, dict[str, Any]]:
        params = claims.pop("params", {"workspace": "/ws", "infra": "demo"})
        body = {
            "sub": "u-alice",
            "jti": str(uuid.uuid4()),
            "op_type": "server.create",
            "target": "demo/web-01",
            "params_sha256": hashlib.sha256(canonical_params(params)).hexdigest(),
            **claims,
        }
        return self.ring.sign(body, audience=AUD, ttl_s=300, issuer=ISS), params

    async def send(self, token: str, params: dict[str, Any], msg_id: str | None = None) -> None:
        data = json.dumps({"token": token, "params": params}).encode()
        await self.bus.publish(
            "ops.pending.server.create", data, msg_id=msg_id or str(uuid.uuid4())
        )

    def start(self) -> None:
        self.loop = asyncio.create_task(self.ctl.run(self.stop, batch=64))

    async def audit(
        self, subject_filter: str, want: int, timeout: float = 15
    ) -> list[dict[str, Any]]:
        sub = await self.bus.js.subscribe(subject_filter, ordered_consumer=True)
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        try:
            while len(found) < want and time.monotonic() < deadline:
                try:
                    msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
                except Exception:
                    break
                found.append(json.loads(msg.data))
        finally:
            await sub.unsubscribe()
        return found


@pytest.fixture
async def world(tmp_path: Path, state_url: str) -> AsyncIterator[World]:
    settings = load_settings(
        home=tmp_path / "home", env={}, overrides={"nats": {"port": free_port()}}
    )
    server = EmbeddedNats(settings)
    await server.start()
    bus = NatsBus(settings.nats_servers, max_deliver=4, ack_wait_s=2)
    await bus.connect()
    await bus.ensure()
    ring = KeyRing(tmp_path / "keeper-keys")
    ring.load_or_create()
    db = open_database(state_url, sqlite_synchronous="NORMAL")
    store = SqlIdempotencyStore(db)
    await store.open()
    recorder = Recorder()
    ctl = OpsController(
        TokenVerifier(StaticJwks(ring), audience=AUD, issuer=ISS),
        store,
        recorder,
        bus,
        max_deliver=4,
        max_delay_s=4.0,
        heartbeat_s=0.5,
    )
    w = World(bus, ring, ctl, recorder, asyncio.Event())
    try:
        yield w
    finally:
        w.stop.set()
        if w.loop is not None:
            await asyncio.wait_for(w.loop, 10)
        await store.close()
        await db.close()
        await bus.close()
        await server.stop()


async def wait_for(what: str, probe: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_the_same_valid_token_replayed_a_thousand_times_dispatches_once(world: World) -> None:
    token, params = world.token()
    jti = json.loads(__import__("base64").urlsafe_b64decode(token.split(".")[1] + "=="))["jti"]
    await asyncio.gather(*(world.send(token, params) for _ in range(1000)))
    world.start()
    await wait_for("all 1000 answered", lambda: world.ctl.counts.get("ack", 0) >= 1000, 60)

    assert world.recorder.calls == [jti]
    record = await world.ctl.store.get(jti)
    assert record is not None and record.state == "completed"
    events = await world.audit("ops.audit.completed", 1)
    assert [(e["object_id"], e["result"]) for e in events] == [(jti, "success")]
    assert events[0]["details"]["outcome"] == {"workflow_id": f"wf-{jti}"}


async def test_hostile_messages_are_terminated_and_audited_without_a_dispatch(world: World) -> None:
    token, params = world.token()
    # A token of a key ring whose clock is 10 minutes behind: expired for the controller.
    past = KeyRing(Path(world.ring.directory), clock=lambda: time.time() - 600)
    expired = past.sign(
        {"jti": str(uuid.uuid4()), "sub": "u", "op_type": "server.create", "target": "t",
         "params_sha256": hashlib.sha256(canonical_params(params)).hexdigest()},
        audience=AUD, ttl_s=60, issuer=ISS,
    )  # fmt: skip
    other = KeyRing(Path(world.ring.directory).parent / "other-keys")
    other.load_or_create()
    forged = other.sign(
        {"jti": str(uuid.uuid4()), "op_type": "server.create"}, audience=AUD, ttl_s=60, issuer=ISS
    )
    await world.send(token, {**params, "infra": "prod"})  # params swapped beside a valid token
    await world.send(expired, params)
    await world.send(forged, params)
    await world.bus.publish("ops.pending.server.create", b"garbage", msg_id="g")
    world.start()
    await wait_for("four terminated", lambda: world.ctl.counts.get("term", 0) >= 4, 30)

    assert world.recorder.calls == []
    events = await world.audit("ops.audit.rejected", 4)
    assert sorted(e["details"]["reason"] for e in events) == sorted(
        ["params_mismatch", "expired", "unknown_kid", "malformed"]
    )


async def test_an_unreachable_orchestrator_is_retried_with_growing_delays_then_given_up(
    world: World,
) -> None:
    world.recorder.fail_with = DispatchFailed("orchestrator answered 503", retry=True)
    token, params = world.token()
    outcomes: list[Any] = []
    real = world.ctl.answer

    async def spy(delivery: Any, outcome: Any) -> None:
        outcomes.append(outcome)
        await real(delivery, outcome)

    world.ctl.answer = spy  # type: ignore[method-assign]
    await world.send(token, params)
    world.start()
    await wait_for("given up", lambda: any(isinstance(o, Term) for o in outcomes), 30)

    naks = [o for o in outcomes if isinstance(o, Nak)]
    assert [n.delay_s for n in naks] == [1.0, 2.0, 4.0]  # growing, capped by max_delay_s
    assert len(world.recorder.calls) == 4  # max_deliver
    assert "gave up after 4 deliveries" in outcomes[-1].reason
    events = await world.audit("ops.audit.failed", 1)
    assert "gave up" in events[0]["details"]["reason"]


@dataclass
class Outage(Recorder):
    """An orchestrator that does not answer (dispatch fails, ``ready()`` False) until ``up``."""

    up: bool = False
    probes: int = 0

    async def dispatch(self, op: VerifiedOp) -> dict[str, Any]:
        self.calls.append(op.jti)
        if not self.up:
            raise DispatchFailed("orchestrator not reachable (ConnectError)", retry=True)
        return {"workflow_id": f"wf-{op.jti}"}

    async def ready(self) -> bool:
        self.probes += 1
        return self.up


async def test_a_long_outage_holds_the_ops_instead_of_failing_them(world: World) -> None:
    """max_deliver is 4 with delays of 1, 2, 4 s: without the hold, an outage of ~8 s fails the
    op. Held, the op meets the outage once, waits, and runs when the orchestrator is back."""
    outage = Outage()
    world.ctl.dispatcher = outage
    first, p1 = world.token()
    await world.send(first, p1)
    world.start()
    await wait_for("the first dispatch met the outage", lambda: len(outage.calls) == 1)
    await wait_for("the controller holds", lambda: world.ctl.held_since is not None)
    second, p2 = world.token()
    await world.send(second, p2)  # arrives during the outage: not even tried
    await asyncio.sleep(9)  # longer than max_deliver's delays would allow
    assert outage.calls == [outage.calls[0]]
    assert outage.probes >= 3
    assert world.ctl.counts.get("term", 0) == 0

    outage.up = True
    await wait_for("both ran", lambda: world.ctl.counts.get("ack", 0) >= 2, 30)
    assert world.ctl.held_since is None
    assert world.ctl.counts.get("term", 0) == 0
    assert sorted(set(outage.calls)) == sorted(
        {json.loads(_payload(first))["jti"], json.loads(_payload(second))["jti"]}
    )
    done = await world.audit("ops.audit.completed", 2)
    assert len(done) == 2


def _payload(token: str) -> bytes:
    body = token.split(".")[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


async def test_a_refusal_is_final_and_a_slow_dispatch_is_not_redelivered(world: World) -> None:
    world.recorder.fail_with = DispatchFailed(
        "orchestrator answered 422: unknown infra", retry=False
    )
    token, params = world.token()
    await world.send(token, params)
    world.start()
    await wait_for("terminated", lambda: world.ctl.counts.get("term", 0) >= 1)
    assert len(world.recorder.calls) == 1

    world.recorder.fail_with = None
    world.recorder.slow_s = 3.0  # longer than ack_wait (2 s): heartbeats keep it ours
    slow, p2 = world.token()
    await world.send(slow, p2)
    await wait_for("slow one done", lambda: world.ctl.counts.get("ack", 0) >= 1, 30)
    await asyncio.sleep(2.5)
    assert len(world.recorder.calls) == 2


async def test_records_left_dispatched_by_a_crash_are_reconciled(world: World) -> None:
    store = world.ctl.store
    now = world.ctl.clock()
    await store.claim("jti-crashed-1", "server.create", now=now)
    await store.mark_dispatched("jti-crashed-1", now=now)
    await store.claim("jti-crashed-2", "server.create", now=now)
    await store.mark_dispatched("jti-crashed-2", now=now)
    known = {"jti-crashed-1": {"id": "wf-1"}}

    async def lookup(jti: str) -> dict[str, Any] | None:
        return known.get(jti)

    assert await world.ctl.reconcile(lookup) == 1
    r1, r2 = await store.get("jti-crashed-1"), await store.get("jti-crashed-2")
    assert r1 is not None and r1.state == "completed"
    assert (
        r2 is not None and r2.state == "dispatched"
    )  # its message comes back; re-dispatch is idempotent
