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

    def url(self) -> str | None:
        """The orchestrator URL a live platform recorded at start (see :meth:`claim`), or None."""
        if self.read() is None:
            return None
        try:
            parts = self.path.read_text(encoding="utf-8").split()
        except OSError:
            return None
        return parts[1] if len(parts) > 1 else None

    def claim(self, url: str | None = None) -> None:
        """Write our pid, and the orchestrator ``url`` so clients of this data dir find it.

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
        self.path.write_text(f"{os.getpid()} {url or ''}".rstrip() + "\n", encoding="utf-8")

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if self.read() in (None, os.getpid()):
                self.path.unlink()
