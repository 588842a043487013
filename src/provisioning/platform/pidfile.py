"""The platform's pid file: which process runs the platform of a data dir, and its URLs.

Format (text): the first line is ``<pid> <orchestrator URL> <control center URL> <keeper URL>``
(what :meth:`PidFile.url` reads by index); each further line is ``<service> <URL>`` for every
service the platform runs, nats-server included (what :meth:`PidFile.services` reads).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import psutil

from provisioning.core.errors import ConfigError

__all__ = ["PidFile"]


class PidFile:
    """``<home>/run/platform.pid``: which process runs the platform of this data dir."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "platform.pid"

    def read(self) -> int | None:
        """The pid of a live platform process, or None (a stale file is ignored)."""
        try:
            pid = int(self.path.read_text(encoding="utf-8").split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if not psutil.pid_exists(pid):
            return None
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return None
        return pid

    def _lines(self) -> list[str]:
        if self.read() is None:
            return []
        try:
            return self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []

    def url(self, index: int = 0) -> str | None:
        """A service URL a live platform recorded at start (see :meth:`claim`), or None:
        ``index`` 0 is the orchestrator, 1 the control center, 2 the ops-keeper."""
        lines = self._lines()
        parts = lines[0].split() if lines else []
        return parts[1 + index] if len(parts) > 1 + index else None

    def services(self) -> dict[str, str]:
        """Every service a live platform recorded at start, name → URL, in start order
        (empty when it does not run or recorded none)."""
        found: dict[str, str] = {}
        for line in self._lines()[1:]:
            name, _, url = line.partition(" ")
            if name and url.strip():
                found[name] = url.strip()
        return found

    def claim(self, *urls: str, services: Mapping[str, str] | None = None) -> None:
        """Write our pid, the orchestrator/control center/keeper ``urls`` and every service's
        URL (``services``, name → URL) so clients of this data dir find them.

        Raises:
            ConfigError: another live process already runs the platform of this data dir.
        """
        other = self.read()
        if other is not None and other != os.getpid():
            raise ConfigError(
                f"the platform of this data dir already runs as pid {other}; "
                "`prvng platform stop` stops it"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [" ".join([str(os.getpid()), *urls])]
        lines += [f"{name} {url}" for name, url in (services or {}).items()]
        self.path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if self.read() in (None, os.getpid()):
                self.path.unlink()
