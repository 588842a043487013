"""Typed async HTTP client of the ops-keeper API (used by the CLI and other services).

It takes an optional httpx transport so a test can wire it straight to an ASGI app. Errors come
back as the same typed errors the server raised; a connection failure is :class:`Unreachable`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import httpx

from provisioning.core.errors import ProvisioningError, Unreachable, error_from_wire
from provisioning.ops_keeper.api import FreezeIn, OpRequestIn

__all__ = ["OpsKeeperClient"]


class OpsKeeperClient:
    """``async with OpsKeeperClient(url, token=...) as c: await c.request_op("server.delete",
    "prod/web-01")``."""

    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        token: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        """``token``: called once before the first request for the bearer credential (an
        access token or an API key); None sends no credentials."""
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            transport=transport,
            timeout=timeout,
            headers=dict(headers or {}),
        )

    async def __aenter__(self) -> OpsKeeperClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _authorize(self) -> None:
        if self._token is not None:
            provider, self._token = self._token, None
            bearer = await provider()
            if bearer:
                self._http.headers["Authorization"] = f"Bearer {bearer}"

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        await self._authorize()
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(
                f"ops-keeper at {self.base_url} is not reachable ({exc.__class__.__name__}); "
                "is the platform running? (`prvng platform status`)"
            ) from None

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return _unwrap(await self._send(method, path, **kwargs))

    async def health(self) -> dict[str, Any]:
        return dict(await self._call("GET", "/health"))

    async def request_op(
        self,
        op_type: str,
        target: str,
        *,
        image: str | None = None,
        params: Mapping[str, Any] | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Request an operation; the answer is the recorded operation with its ``state``
        (``published``, ``pending_approval``, ``rejected``, or ``approved`` while publishing
        is retried) and the ``decision_reason``."""
        body = _request_body(op_type, target, image, params, reason)
        return dict(await self._call("POST", "/ops", json=body))

    async def evaluate(
        self,
        op_type: str,
        target: str,
        *,
        image: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """What the keeper would decide, with the trace of the policies it compared."""
        body = _request_body(op_type, target, image, params, None)
        return dict(await self._call("POST", "/ops/evaluate", json=body))

    async def list_ops(
        self, *, state: str | None = None, limit: int | None = None, offset: int | None = None
    ) -> list[dict[str, Any]]:
        query = {"state": state, "limit": limit, "offset": offset}
        params = {k: v for k, v in query.items() if v is not None}
        return list(await self._call("GET", "/ops", params=params))

    async def get_op(self, op_id: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"/ops/{op_id}"))

    async def approve(self, op_id: str, reason: str) -> dict[str, Any]:
        return dict(await self._call("POST", f"/ops/{op_id}/approve", json={"reason": reason}))

    async def reject(self, op_id: str, reason: str) -> dict[str, Any]:
        return dict(await self._call("POST", f"/ops/{op_id}/reject", json={"reason": reason}))

    async def freeze(
        self, reason: str, *, scope: str = "*", until: datetime | None = None
    ) -> dict[str, Any]:
        body = FreezeIn.model_construct(reason=reason, scope=scope, until=until)
        return dict(await self._call("POST", "/ops/freeze", json=body.model_dump(mode="json")))

    async def unfreeze(self, freeze_id: str) -> dict[str, Any]:
        return dict(await self._call("DELETE", f"/ops/freeze/{freeze_id}"))

    async def list_freezes(self, state: str = "active") -> list[dict[str, Any]]:
        return list(await self._call("GET", "/ops/freezes", params={"state": state}))

    async def policy(self) -> dict[str, Any]:
        return dict(await self._call("GET", "/ops/policy"))

    async def jwks(self) -> dict[str, Any]:
        """The keeper's public keys (a JWK Set, not wrapped in the envelope)."""
        resp = await self._send("GET", "/.well-known/jwks.json")
        if resp.status_code != 200:
            _unwrap(resp)
        doc = resp.json()
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ProvisioningError(f"{resp.request.url} did not answer a JWK Set")
        return doc

    async def rotate_keys(self) -> dict[str, Any]:
        return dict(await self._call("POST", "/keys/rotate"))


def _request_body(
    op_type: str,
    target: str,
    image: str | None,
    params: Mapping[str, Any] | None,
    reason: str | None,
) -> dict[str, Any]:
    body = OpRequestIn.model_construct(
        op_type=op_type, target=target, image=image, params=dict(params or {}), reason=reason
    )
    return body.model_dump(mode="json", exclude_none=True)


def _unwrap(resp: httpx.Response) -> Any:
    try:
        doc = resp.json()
    except ValueError:
        raise ProvisioningError(
            f"unexpected answer from {resp.request.url} "
            f"(HTTP {resp.status_code}): {resp.text[:200]}"
        ) from None
    if resp.is_success and isinstance(doc, dict) and doc.get("success"):
        return doc.get("data")
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        raise error_from_wire(err, resp.status_code)
    raise ProvisioningError(f"HTTP {resp.status_code} from {resp.request.url}")
