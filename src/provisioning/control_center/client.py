"""Typed async HTTP client of the control center API (CLI, other services, tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from provisioning.core.errors import ProvisioningError, Unreachable, error_from_wire
from provisioning.core.sse import ServerEvent, iter_events

__all__ = ["ControlCenterClient"]


class ControlCenterClient:
    """``async with ControlCenterClient(url, token=...) as c: await c.whoami()``."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url, transport=transport, timeout=timeout, headers=headers
        )

    async def __aenter__(self) -> ControlCenterClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(
                f"control center at {self.base_url} is not reachable ({exc.__class__.__name__}); "
                "is the platform running? (`prvng platform status`)"
            ) from None
        if resp.headers.get("content-type", "").startswith("application/x-ndjson"):
            if resp.is_success:
                return resp.text
        try:
            doc = resp.json()
        except ValueError:
            raise ProvisioningError(
                f"unexpected answer from {resp.request.url} (HTTP {resp.status_code})"
            ) from None
        if resp.is_success and isinstance(doc, dict) and doc.get("success"):
            return doc.get("data")
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            raise error_from_wire(err, resp.status_code)
        raise ProvisioningError(f"HTTP {resp.status_code} from {resp.request.url}")

    async def login(self, username: str, password: str, mfa_code: str | None = None) -> Any:
        body = {"username": username, "password": password, "mfa_code": mfa_code}
        return await self.call("POST", "/auth/login", json=body)

    async def refresh(self, refresh_token: str) -> Any:
        return await self.call("POST", "/auth/refresh", json={"refresh_token": refresh_token})

    async def logout(self, refresh_token: str | None) -> Any:
        return await self.call("POST", "/auth/logout", json={"refresh_token": refresh_token})

    async def whoami(self) -> Any:
        return await self.call("GET", "/auth/whoami")

    async def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        return await self.call("GET", path, params=clean)

    async def post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        return await self.call("POST", path, json=dict(body or {}))

    async def patch(self, path: str, body: Mapping[str, Any]) -> Any:
        return await self.call("PATCH", path, json=dict(body))

    async def delete(self, path: str) -> Any:
        return await self.call("DELETE", path)

    async def put(self, path: str, body: Mapping[str, Any]) -> Any:
        return await self.call("PUT", path, json=dict(body))

    # ------------------------------------------------------------------ configuration

    @staticmethod
    def _config_file(ws: str, path: str, suffix: str = "") -> str:
        return f"/config/workspaces/{quote(ws, safe='')}/files/{quote(path, safe='/')}{suffix}"

    async def config_workspaces(self) -> Any:
        """The workspaces whose configuration the control center manages."""
        return await self.get("/config/workspaces")

    async def config_files(self, ws: str) -> Any:
        """The Nickel files of workspace ``ws`` (path, size, sha256, mtime, version)."""
        return await self.get(f"/config/workspaces/{quote(ws, safe='')}/files")

    async def config_read(self, ws: str, path: str) -> Any:
        """A file's content, sha256 and current version."""
        return await self.get(self._config_file(ws, path))

    async def config_validate(
        self, ws: str, path: str | None = None, content: str | None = None
    ) -> Any:
        """Diagnostics of the workspace with ``path`` holding ``content`` (nothing written)."""
        body = {"path": path, "content": content} if path is not None else {}
        return await self.post(f"/config/workspaces/{quote(ws, safe='')}/validate", body)

    async def config_write(
        self, ws: str, path: str, content: str, *, expected_sha256: str | None, message: str
    ) -> Any:
        """Validate and write a file; ``expected_sha256`` None creates it.

        Raises:
            ValidationError: the content brings problems (``details["diagnostics"]``).
            Conflict: the file changed since it was read (both hashes in ``details``).
        """
        body = {"content": content, "expected_sha256": expected_sha256, "message": message}
        return await self.put(self._config_file(ws, path), body)

    async def config_history(self, ws: str, path: str) -> Any:
        return await self.get(self._config_file(ws, path, "/history"))

    async def config_version(self, ws: str, path: str, version: int) -> Any:
        return await self.get(self._config_file(ws, path, f"/versions/{int(version)}"))

    async def config_diff(
        self, ws: str, path: str, start: int | None = None, end: int | None = None
    ) -> Any:
        """Unified diff from version ``start`` (default: the one before ``end``) to ``end``
        (default: current)."""
        return await self.get(self._config_file(ws, path, "/diff"), {"from": start, "to": end})

    async def config_restore(
        self,
        ws: str,
        path: str,
        version: int,
        *,
        expected_sha256: str | None,
        message: str = "",
    ) -> Any:
        """Write version ``version`` back as a new version (same checks as a write)."""
        body = {"version": version, "expected_sha256": expected_sha256, "message": message}
        return await self.post(self._config_file(ws, path, "/restore"), body)

    async def system_status(self) -> dict[str, Any]:
        """The monitoring document of ``GET /system/status``."""
        return dict(await self.call("GET", "/system/status"))

    async def system_events(
        self, *, interval_s: float | None = None, last_event_id: str | None = None
    ) -> AsyncIterator[ServerEvent]:
        """Follow ``GET /system/events`` until the server ends it (or the caller stops).

        Raises:
            Unreachable: the control center is not reachable (or has too many streams open).
            Unauthorized: the credentials are not valid or may not ``system:read``.
        """
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        params = {"interval": interval_s} if interval_s is not None else {}
        try:
            async with self._http.stream(
                "GET",
                "/system/events",
                params=params,
                headers=headers,
                timeout=httpx.Timeout(30.0, read=None),
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    try:
                        doc = resp.json()
                    except ValueError:
                        doc = None
                    err = doc.get("error") if isinstance(doc, dict) else None
                    if isinstance(err, dict):
                        raise error_from_wire(err, resp.status_code)
                    raise ProvisioningError(f"HTTP {resp.status_code} from {resp.request.url}")
                async for event in iter_events(resp.aiter_lines()):
                    yield event
        except httpx.TransportError as exc:
            raise Unreachable(
                f"control center at {self.base_url} is not reachable ({exc.__class__.__name__})"
            ) from None
