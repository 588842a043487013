"""Typed async HTTP client of the control center API (CLI, other services, tests)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from provisioning.core.errors import ProvisioningError, Unreachable, error_from_wire

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
