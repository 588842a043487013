"""The servers this provider has registered: ``<runtime_dir>/servers/<hostname>/server.json``.

A record says how the server was reached when it was registered (connection settings: paths,
never key material). The folder may be shared with other providers' files, so a record counts as
this provider's only when its ``provider`` is ``ssh``, and unregistering removes only the record
(and the folder if that leaves it empty).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from provisioning.workspace.sdk import Failure

__all__ = ["PROVIDER", "Registry"]

PROVIDER = "ssh"
_RECORD = "server.json"


class Registry:
    """Records under ``runtime_dir`` (``None``: no workspace, so nothing is registered)."""

    def __init__(self, runtime_dir: str | None) -> None:
        self.root = Path(runtime_dir) / "servers" if runtime_dir else None

    def path(self, hostname: str) -> Path:
        if self.root is None:
            raise Failure(
                f"{hostname}: the request has no context.runtime_dir (no workspace) to register "
                "the server in"
            )
        return self.root / hostname / _RECORD

    def _load(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise Failure(f"cannot read the server record {path}: {exc}") from None
        if not isinstance(data, dict):
            raise Failure(f"the server record {path} is not a JSON object")
        return data

    def read(self, hostname: str, *, foreign_ok: bool = True) -> dict[str, Any] | None:
        """This provider's record of ``hostname``, or None.

        Raises:
            Failure: the record cannot be read, or (``foreign_ok=False``) belongs to another
                provider.
        """
        if self.root is None:
            return None
        path = self.path(hostname)
        data = self._load(path)
        if data is None:
            return None
        if data.get("provider") != PROVIDER:
            if foreign_ok:
                return None
            owner = data.get("provider")
            raise Failure(
                f"{hostname} already has a server record of "
                f"{f'provider {owner!r}' if owner else 'another provider'} ({path}); "
                "delete it with that provider first"
            )
        return data

    def write(self, hostname: str, record: dict[str, Any]) -> Path:
        """Store ``record`` atomically."""
        path = self.path(hostname)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".server.", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({**record, "provider": PROVIDER}, f, indent=2, sort_keys=True)
                f.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def remove(self, hostname: str) -> bool:
        """Unregister ``hostname``; False when this provider had no record of it."""
        if self.read(hostname) is None:
            return False
        path = self.path(hostname)
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: another provider's files stay
            path.parent.rmdir()
        return True

    def all(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Every record of this provider, by hostname, and the problems with unreadable ones."""
        if self.root is None or not self.root.is_dir():
            return [], []
        records: list[dict[str, Any]] = []
        problems: list[str] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                data = self._load(folder / _RECORD)
            except Failure as exc:
                problems.append(str(exc))
                continue
            if data is not None and data.get("provider") == PROVIDER:
                records.append({**data, "hostname": data.get("hostname") or folder.name})
        return records, problems
