"""Runs the platform's services in one asyncio loop, one uvicorn server per service port.

Every port is bound before anything starts, so a busy port is one clear error (the setting, the
port, the process holding it) and nothing is left half-started. Each service is then watched:
when its HTTP server ends, or one of its background tasks dies with an exception, while the
platform is not stopping, that is a *crash*. The crash is logged with its exception and that
service alone is stopped and started again after a backoff (doubling from
``RestartPolicy.initial_s`` up to ``max_s``, back to ``initial_s`` once it stayed up
``reset_after_s``); the others keep serving, and its port stays bound meanwhile.

SIGTERM/SIGINT stop every server gracefully, then the services in reverse order, then the
background units: running task attempts are left to the next start's recovery, never killed
silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil
import uvicorn
from fastapi import FastAPI

from provisioning.core.aio import reraise_if_cancelling
from provisioning.core.errors import ConfigError
from provisioning.core.logging import get_logger

__all__ = [
    "Background",
    "RestartPolicy",
    "Service",
    "Supervisor",
    "bind_socket",
    "check_port",
    "run_services",
]

log = get_logger("platform")


class Service(Protocol):
    """A unit the supervisor runs: an HTTP app plus its own start/stop.

    ``stop`` then ``start`` again must work (that is how a crashed service is restarted). A
    service may also offer ``background_tasks() -> Sequence[asyncio.Task]``: the loops it runs
    besides its HTTP app, each meant to run until ``stop``; one that ends before (with an
    exception, cancelled, or returning) is a crash.
    """

    name: str
    app: FastAPI

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Background(Protocol):
    """Something the services need running first and stopped last (the embedded nats-server).

    One that has ``host`` and ``port`` has its port checked with the services' before start.
    """

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class RestartPolicy:
    """How a crashed service is restarted: after ``initial_s``, doubling at each crash up to
    ``max_s``; a service that stayed up ``reset_after_s`` starts again from ``initial_s``."""

    initial_s: float = 1.0
    max_s: float = 60.0
    reset_after_s: float = 120.0


class _Server(uvicorn.Server):
    # The supervisor owns the signals, not each server.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _holder(port: int) -> str:
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid:
                    try:
                        p = psutil.Process(conn.pid)
                        command = " ".join(" ".join(p.cmdline()[:4]).split())[:120]
                        return f"pid {conn.pid} ({p.name()}: {command})"
                    except psutil.Error:
                        return f"pid {conn.pid}"
                return "another process (not visible to this user)"
    return "another process"


def _setting(service: str) -> str:
    return service.replace("-", "_") + ".port"


def bind_socket(host: str, port: int, service: str, setting: str | None = None) -> socket.socket:
    """Bind the service's listening socket now, so a busy port is a clear error at start.

    ``setting`` names the setting of the port (default ``<service>.port``).

    Raises:
        ConfigError: the port is taken; the message names the setting, the port and what
            holds it.
    """
    setting = setting or _setting(service)
    env = "PRVNG_" + setting.upper().replace(".", "__")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY on accepted connections only
    # when the listening socket says so; without it every kept-alive answer waited ~40 ms
    # for the client's delayed ACK (uvicorn writes headers and body apart).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{service}: port {port} on {host} ({setting}) is already in use by "
                f"{_holder(port)}; stop it or choose another port ({setting} in platform.ncl, "
                f"or {env})"
            ) from None
        raise ConfigError(
            f"{service}: cannot bind {host}:{port} ({setting}): {exc.strerror}"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def check_port(host: str, port: int, service: str, setting: str | None = None) -> None:
    """Raise the :func:`bind_socket` error now if ``host:port`` cannot be bound.

    Raises:
        ConfigError: the port is taken or cannot be bound.
    """
    bind_socket(host, port, service, setting).close()


def _service_tasks(svc: Service) -> list[asyncio.Future[object]]:
    offered = getattr(svc, "background_tasks", None)
    return list(offered()) if callable(offered) else []


@dataclass
class Unit:
    """One supervised service: its bound socket, its current server and its crash record."""

    service: Service
    sock: socket.socket
    server: _Server | None = None
    serve_task: asyncio.Task[None] | None = None
    running: bool = False
    restarts: int = 0
    delays: list[float] = field(default_factory=list)
    started_at: float = 0.0
    backoff: float = 0.0

    @property
    def name(self) -> str:
        return self.service.name


class ServerEnded(RuntimeError):
    """A service's HTTP server ended while the platform was not stopping."""


class LoopEnded(RuntimeError):
    """One of a service's background loops ended while the platform was not stopping."""


class Supervisor:
    """Starts, watches and stops a set of services (see the module docstring)."""

    def __init__(
        self,
        services: Sequence[Service],
        *,
        background: Sequence[Background] = (),
        policy: RestartPolicy | None = None,
        on_ready: Callable[[Sequence[Service]], None] | None = None,
    ) -> None:
        self.services = list(services)
        self.background = list(background)
        self.policy = policy or RestartPolicy()
        self.on_ready = on_ready
        self.units: dict[str, Unit] = {}
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()

    def check_ports(self) -> list[socket.socket]:
        """Bind every service's port and check every background unit's, before any start.

        Raises:
            ConfigError: one is taken (the first found, named); nothing stays bound.
        """
        sockets: list[socket.socket] = []
        try:
            for bg in self.background:
                host, port = getattr(bg, "host", None), getattr(bg, "port", None)
                if isinstance(host, str) and isinstance(port, int):
                    check_port(host, port, bg.name)
            for svc in self.services:
                sockets.append(bind_socket(svc.host, svc.port, svc.name))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return sockets

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or SIGTERM/SIGINT), then stop everything.

        Raises:
            ConfigError: a port is taken; nothing was started.
            Exception: whatever a service or background unit raised at the first start
                (the units already started are stopped).
        """
        stop = stop or asyncio.Event()
        sockets = self.check_ports()
        self.units = {
            svc.name: Unit(svc, sock) for svc, sock in zip(self.services, sockets, strict=True)
        }
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        started_bg: list[Background] = []
        keepers: list[asyncio.Task[None]] = []
        try:
            for bg in self.background:
                await bg.start()
                started_bg.append(bg)
            for unit in self.units.values():
                await unit.service.start()
                unit.running = True
            for unit in self.units.values():
                self._serve(unit)
            await self._wait_started(stop)
            if self.on_ready is not None:
                self.on_ready(self.services)
            self.ready.set()
            keepers = [
                asyncio.create_task(self._keep(u), name=f"keep-{u.name}")
                for u in self.units.values()
            ]
            await stop.wait()
        finally:
            self.stopping.set()
            # Each keeper returns once it sees `stopping` (a restart in progress finishes first).
            if keepers:
                _done, late = await asyncio.wait(keepers, timeout=30)
                for task in late:
                    task.cancel()
                await asyncio.gather(*keepers, return_exceptions=True)
            await self._shutdown(started_bg)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _serve(self, unit: Unit) -> None:
        cfg = uvicorn.Config(
            unit.service.app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        unit.server = _Server(cfg)
        # A duplicate: uvicorn closes what it is given, the supervisor keeps the port bound.
        unit.serve_task = asyncio.create_task(
            unit.server.serve(sockets=[unit.sock.dup()]), name=f"serve-{unit.name}"
        )
        unit.started_at = time.monotonic()

    async def _wait_started(self, stop: asyncio.Event) -> None:
        for unit in self.units.values():
            while unit.server is not None and not unit.server.started and not stop.is_set():
                if unit.serve_task is None or unit.serve_task.done():
                    break
                await asyncio.sleep(0.01)

    async def _watch(self, unit: Unit) -> BaseException | None:
        """Wait until the unit crashes (the crash, as an exception to log) or the platform
        stops (None)."""
        assert unit.serve_task is not None
        serve = unit.serve_task
        stopper: asyncio.Future[object] = asyncio.ensure_future(self.stopping.wait())
        pending: set[asyncio.Future[Any]] = {*_service_tasks(unit.service), serve, stopper}
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    return None
                for task in done:
                    exc = None if task.cancelled() else task.exception()
                    if task is serve:
                        return exc or ServerEnded("its HTTP server ended unexpectedly")
                    if exc is not None:
                        return exc
                    # Cancelled or returned: the loop is gone all the same.
                    how = "was cancelled" if task.cancelled() else "returned"
                    name = task.get_name() if isinstance(task, asyncio.Task) else "a loop"
                    return LoopEnded(f"its background loop {name} {how} unexpectedly")
        finally:
            stopper.cancel()

    async def _keep(self, unit: Unit) -> None:
        """Restart ``unit`` after each crash, with backoff, until the platform stops."""
        while not self.stopping.is_set():
            crash = await self._watch(unit)
            if crash is None or self.stopping.is_set():
                return
            if time.monotonic() - unit.started_at >= self.policy.reset_after_s:
                unit.backoff = 0.0
            unit.backoff = (
                self.policy.initial_s
                if unit.backoff == 0.0
                else min(unit.backoff * 2, self.policy.max_s)
            )
            unit.restarts += 1
            unit.delays.append(unit.backoff)
            log.error(
                "service crashed; restarting it",
                exc_info=(type(crash), crash, crash.__traceback__),
                extra={"service": unit.name, "restart": unit.restarts, "delay_s": unit.backoff},
            )
            await self._halt(unit)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), unit.backoff)
            if self.stopping.is_set():
                return
            while not await self._relaunch(unit):
                if self.stopping.is_set():
                    return

    async def _relaunch(self, unit: Unit) -> bool:
        try:
            await unit.service.start()
        except Exception:
            unit.running = True  # half-started: stopped before the next try
            unit.backoff = min(unit.backoff * 2, self.policy.max_s)
            unit.restarts += 1
            unit.delays.append(unit.backoff)
            log.exception(
                "service did not restart; trying again",
                extra={"service": unit.name, "restart": unit.restarts, "delay_s": unit.backoff},
            )
            await self._halt(unit)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), unit.backoff)
            return False
        unit.running = True
        self._serve(unit)
        log.info("service restarted", extra={"service": unit.name, "restart": unit.restarts})
        return True

    async def _halt(self, unit: Unit) -> None:
        """Stop the unit's server, then the service itself (errors logged, not raised)."""
        if unit.server is not None:
            unit.server.should_exit = True
        if unit.serve_task is not None:
            await asyncio.gather(unit.serve_task, return_exceptions=True)
        unit.server = unit.serve_task = None
        if unit.running:
            unit.running = False
            try:
                await unit.service.stop()
            except Exception:
                log.exception("service did not stop cleanly", extra={"service": unit.name})
            except asyncio.CancelledError:
                # A stop() that awaited its own cancelled loop: not the supervisor being
                # cancelled (then it goes on up), and the restart must not die of it.
                reraise_if_cancelling()
                log.warning("service stop ended cancelled", extra={"service": unit.name})

    async def _shutdown(self, started_bg: list[Background]) -> None:
        units = list(self.units.values())
        for unit in units:
            if unit.server is not None:
                unit.server.should_exit = True
        await asyncio.gather(
            *(u.serve_task for u in units if u.serve_task is not None), return_exceptions=True
        )
        for unit in units:
            unit.server = unit.serve_task = None
        for unit in reversed(units):
            await self._halt(unit)
        for bg in reversed(started_bg):
            try:
                await bg.stop()
            except Exception:
                log.exception("service did not stop cleanly", extra={"service": bg.name})
        for unit in units:
            unit.sock.close()


async def run_services(
    services: Sequence[Service],
    *,
    on_ready: Callable[[Sequence[Service]], None] | None = None,
    stop_event: asyncio.Event | None = None,
    background: Sequence[Background] = (),
    policy: RestartPolicy | None = None,
) -> None:
    """Check every port, start ``background``, then every service; serve (restarting a
    crashed service) until SIGTERM/SIGINT (or ``stop_event``); stop the services, then
    ``background``, in reverse order.

    Raises:
        ConfigError: a port is taken (named with its setting and holder); nothing started.
    """
    sup = Supervisor(services, background=background, policy=policy, on_ready=on_ready)
    await sup.run(stop_event)
