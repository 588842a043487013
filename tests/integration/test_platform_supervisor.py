"""The platform supervisor with fake services: busy ports, crashes, restarts with backoff, stop.

Each fake service serves `/health` on a free port and counts its starts and stops; a "flaky"
one has a background loop that dies right after each start, as a controller loop that raises.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence

import httpx
import pytest
from fastapi import FastAPI

from provisioning.core.errors import ConfigError
from provisioning.platform.supervisor import RestartPolicy, Supervisor, bind_socket
from tests.conftest import free_port


class FakeService:
    host = "127.0.0.1"

    def __init__(self, name: str, *, crash: bool = False, quits: bool = False) -> None:
        self.name = name
        self.port = free_port()
        self.crash = crash
        self.quits = quits  # its loop returns (or is cancelled) instead of raising
        self.starts = 0
        self.stops = 0
        self._task: asyncio.Task[None] | None = None
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok", "service": name})

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/health"

    async def start(self) -> None:
        self.starts += 1
        if self.crash or self.quits:
            self._task = asyncio.create_task(self._loop(), name=f"{self.name}-loop")
            if self.quits and self.starts % 2 == 0:
                self._task.cancel()

    async def _loop(self) -> None:
        await asyncio.sleep(0.01)
        if self.quits:
            return
        raise RuntimeError(f"{self.name} loop died")

    def background_tasks(self) -> Sequence[asyncio.Task[None]]:
        return [self._task] if self._task is not None else []

    async def stop(self) -> None:
        self.stops += 1


async def _until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _started(sup: Supervisor, stop: asyncio.Event) -> asyncio.Task[None]:
    runner = asyncio.create_task(sup.run(stop))
    await asyncio.wait_for(sup.ready.wait(), 10)
    return runner


async def test_a_busy_port_is_named_with_its_setting_and_holder_and_nothing_starts() -> None:
    first, second = FakeService("control-center"), FakeService("ops-keeper")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", second.port))
        squatter.listen()
        with pytest.raises(ConfigError) as err:
            await Supervisor([first, second]).run(asyncio.Event())
    message = str(err.value)
    assert f"port {second.port}" in message
    assert "ops_keeper.port" in message and "PRVNG_OPS_KEEPER__PORT" in message
    assert f"pid {os.getpid()}" in message
    assert (first.starts, second.starts) == (0, 0)
    with socket.socket() as again:  # the first service's port was not left bound
        again.bind(("127.0.0.1", first.port))


async def test_a_service_whose_loop_dies_is_restarted_with_growing_backoff_while_others_serve(
    caplog: pytest.LogCaptureFixture,
) -> None:
    steady, flaky = FakeService("steady"), FakeService("flaky", crash=True)
    policy = RestartPolicy(initial_s=0.02, max_s=0.08, reset_after_s=60)
    sup, stop = Supervisor([steady, flaky], policy=policy), asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="provisioning.platform"):
        runner = await _started(sup, stop)
        async with httpx.AsyncClient() as client:
            while sup.units["flaky"].restarts < 5:
                assert (await client.get(steady.url)).status_code == 200
                await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(runner, 10)
    assert sup.units["flaky"].delays[:5] == [0.02, 0.04, 0.08, 0.08, 0.08]
    assert flaky.starts >= 5 and flaky.stops == flaky.starts
    assert (steady.starts, steady.stops, sup.units["steady"].restarts) == (1, 1, 0)
    crashes = [r for r in caplog.records if r.getMessage() == "service crashed; restarting it"]
    assert crashes and crashes[0].exc_info is not None
    assert "flaky loop died" in str(crashes[0].exc_info[1])


async def test_a_loop_that_returns_or_is_cancelled_is_a_crash_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    quitter = FakeService("quitter", quits=True)
    sup, stop = (
        Supervisor([quitter], policy=RestartPolicy(initial_s=0.01, max_s=0.02)),
        asyncio.Event(),
    )
    with caplog.at_level(logging.ERROR, logger="provisioning.platform"):
        runner = await _started(sup, stop)
        await _until(lambda: sup.units["quitter"].restarts >= 2)
        stop.set()
        await asyncio.wait_for(runner, 10)
    reasons = {
        str(r.exc_info[1])
        for r in caplog.records
        if r.getMessage() == "service crashed; restarting it" and r.exc_info
    }
    assert "its background loop quitter-loop returned unexpectedly" in reasons
    assert "its background loop quitter-loop was cancelled unexpectedly" in reasons
    assert quitter.stops == quitter.starts


async def test_a_service_whose_http_server_ends_is_restarted_on_the_same_port() -> None:
    one, two = FakeService("one"), FakeService("two")
    policy = RestartPolicy(initial_s=0.01, max_s=0.1)
    sup, stop = Supervisor([one, two], policy=policy), asyncio.Event()
    runner = await _started(sup, stop)
    server = sup.units["one"].server
    assert server is not None
    server.should_exit = True  # as if uvicorn's loop ended on its own
    await _until(lambda: sup.units["one"].restarts == 1 and one.starts == 2)
    await _until(lambda: sup.units["one"].server is not None and sup.units["one"].server.started)
    async with httpx.AsyncClient() as client:
        assert (await client.get(one.url)).json()["service"] == "one"
        assert (await client.get(two.url)).json()["service"] == "two"
    stop.set()
    await asyncio.wait_for(runner, 10)
    assert (one.stops, two.stops, two.starts) == (2, 1, 1)


async def test_stop_during_a_restart_backoff_ends_promptly() -> None:
    flaky = FakeService("flaky", crash=True)
    sup = Supervisor([flaky], policy=RestartPolicy(initial_s=60, max_s=60))
    stop = asyncio.Event()
    runner = await _started(sup, stop)
    await _until(lambda: sup.units["flaky"].restarts == 1 and flaky.stops == 1)
    began = time.monotonic()
    stop.set()
    await asyncio.wait_for(runner, 10)
    assert time.monotonic() - began < 3
    assert (flaky.starts, flaky.stops) == (1, 1)  # stopped once, never restarted


async def test_backoff_starts_over_after_a_healthy_period() -> None:
    flaky = FakeService("flaky", crash=True)
    sup = Supervisor([flaky], policy=RestartPolicy(initial_s=0.01, max_s=1, reset_after_s=0))
    stop = asyncio.Event()
    runner = await _started(sup, stop)
    await _until(lambda: sup.units["flaky"].restarts >= 3)
    stop.set()
    await asyncio.wait_for(runner, 10)
    assert set(sup.units["flaky"].delays) == {0.01}


def test_the_listening_socket_lets_asyncio_turn_nagle_off() -> None:
    """asyncio sets TCP_NODELAY on accepted connections only when the listening socket names
    IPPROTO_TCP; without it every kept-alive answer waited ~40 ms for a delayed ACK."""
    sock = bind_socket("127.0.0.1", 0, "probe")
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
