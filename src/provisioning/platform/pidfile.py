"""The platform's pid file: which process runs the platform of a data dir, and its URL."""

from __future__ import annotations

import contextlib
import os
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

    def url(self, index: int = 0) -> str | None:
        """A service URL a live platform recorded at start (see :meth:`claim`), or None:
        ``index`` 0 is the orchestrator, 1 the control center, 2 the ops-keeper."""
        if self.read() is None:
            return None
        try:
            parts = self.path.read_text(encoding="utf-8").split()
        except OSError:
            return None
        return parts[1 + index] if len(parts) > 1 + index else None

    def claim(self, *urls: str) -> None:
        """Write our pid and the service URLs so clients of this data dir find them.

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
        self.path.write_text(" ".join([str(os.getpid()), *urls]) + "\n", encoding="utf-8")

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if self.read() in (None, os.getpid()):
                self.path.unlink()
