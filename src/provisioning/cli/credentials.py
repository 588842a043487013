"""The CLI's login: ``~/.config/provisioning/credentials`` (mode 0600), per control center.

It holds the refresh token of ``prvng login`` and the current access token; an access token
about to expire is refreshed (and the rotated refresh token stored) before a command uses it,
so a user never sees an expiry. ``PRVNG_API_KEY`` wins over the file, for scripts.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from provisioning.control_center.client import ControlCenterClient
from provisioning.core.errors import Unauthorized

__all__ = ["Credentials", "credentials_path"]

_MARGIN_S = 30.0


def credentials_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "provisioning" / "credentials"


class Credentials:
    """Read, refresh and write the stored login for one control center URL."""

    def __init__(self, cc_url: str, path: Path | None = None) -> None:
        self.cc_url = cc_url.rstrip("/")
        self.path = path or credentials_path()

    def _load(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _save(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def store(self, login: dict[str, Any]) -> None:
        doc = self._load()
        doc[self.cc_url] = {
            "username": (login.get("user") or {}).get("username")
            or doc.get(self.cc_url, {}).get("username"),
            "access_token": login["access_token"],
            "access_expires_at": time.time() + float(login["expires_in"]),
            "refresh_token": login["refresh_token"],
        }
        self._save(doc)

    def forget(self) -> dict[str, Any] | None:
        doc = self._load()
        entry = doc.pop(self.cc_url, None)
        if entry is not None:
            self._save(doc)
        return entry if isinstance(entry, dict) else None

    def entry(self) -> dict[str, Any] | None:
        entry = self._load().get(self.cc_url)
        return entry if isinstance(entry, dict) else None

    async def access_token(self) -> str | None:
        """A valid access token, refreshed when needed; None when not logged in."""
        entry = self.entry()
        if entry is None:
            return None
        if float(entry.get("access_expires_at", 0)) - _MARGIN_S > time.time():
            return str(entry["access_token"])
        async with ControlCenterClient(self.cc_url) as cc:
            try:
                fresh = await cc.refresh(str(entry["refresh_token"]))
            except Unauthorized:
                self.forget()
                raise Unauthorized(
                    "your login has expired or was revoked; log in again with `prvng login`"
                ) from None
        fresh.setdefault("user", {"username": entry.get("username")})
        self.store(fresh)
        return str(fresh["access_token"])

    def bearer(self) -> str | None:
        """``PRVNG_API_KEY``, else the (refreshed) access token of the stored login."""
        key = os.environ.get("PRVNG_API_KEY")
        if key:
            return key
        return asyncio.run(self.access_token())

    async def bearer_async(self) -> str | None:
        """:meth:`bearer` inside a running event loop."""
        return os.environ.get("PRVNG_API_KEY") or await self.access_token()
