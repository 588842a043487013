"""Runs the platform's services in one asyncio loop, one uvicorn server per service port.

Today the platform is the orchestrator; later services implement :class:`Service` and join the
same list. SIGTERM/SIGINT stop every server gracefully: running task attempts are left to the
next start's recovery, never killed silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
from collections.abc import Callable, Generator, Sequence
from typing import Protocol

import psutil
import uvicorn
from fastapi import FastAPI

from provisioning.core.errors import ConfigError
from provisioning.core.logging import get_logger

__all__ = ["Background", "Service", "bind_socket", "run_services"]

log = get_logger("platform")


class Service(Protocol):
    """A unit the supervisor runs: an HTTP app plus its own start/stop."""

    name: str
    app: FastAPI

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


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
                    with contextlib.suppress(psutil.Error):
                        p = psutil.Process(conn.pid)
                        return f"process {conn.pid} ({' '.join(p.cmdline()[:4])})"
                return "another process"
    return "another process"


def bind_socket(host: str, port: int, service: str) -> socket.socket:
    """Bind the service's listening socket now, so a busy port is a clear error at start.

    Raises:
        ConfigError: the port is taken; the message names the port and what holds it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{service}: port {port} on {host} is already in use by {_holder(port)}; "
                f"stop it or choose another port (--port / PRVNG_{service.upper()}__PORT)"
            ) from None
        raise ConfigError(f"{service}: cannot bind {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Background(Protocol):
    """Something the services need running first and stopped last (the embedded nats-server)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run_services(
    services: Sequence[Service],
    *,
    on_ready: Callable[[Sequence[Service]], None] | None = None,
    stop_event: asyncio.Event | None = None,
    background: Sequence[Background] = (),
) -> None:
    """Start ``background``, then every service; serve until SIGTERM/SIGINT (or
    ``stop_event``); stop the services, then ``background`` in reverse order."""
    sockets = [bind_socket(s.host, s.port, s.name) for s in services]
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started: list[Service | Background] = []
    servers: list[_Server] = []
    try:
        for bg in background:
            await bg.start()
            started.append(bg)
        for svc in services:
            await svc.start()
            started.append(svc)
        serve_tasks = []
        for svc, sock in zip(services, sockets, strict=True):
            cfg = uvicorn.Config(
                svc.app,
                log_level="warning",
                lifespan="off",
                access_log=False,
                timeout_graceful_shutdown=5,
            )
            server = _Server(cfg)
            servers.append(server)
            serve_tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
        for server in servers:
            while not server.started and not stop.is_set():
                if any(t.done() for t in serve_tasks):
                    break
                await asyncio.sleep(0.01)
        if on_ready is not None:
            on_ready(services)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([stopper, *serve_tasks], return_when=asyncio.FIRST_COMPLETED)
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*serve_tasks, return_exceptions=True)
        stopper.cancel()
    finally:
        for unit in reversed(started):
            try:
                await unit.stop()
            except Exception:
                log.exception("service did not stop cleanly", extra={"service": unit.name})
        for sock in sockets:
            sock.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
