"""The controller's dispatcher: hands a verified op to the orchestrator's ``POST /ops/dispatch``
(the op token is the credential) and says whether a failure is worth retrying.

* transport errors, timeouts and 5xx → ``DispatchFailed(retry=True)`` (Nak, later again);
* 4xx (the orchestrator refused the op: bad params, unknown op type, token refused) →
  ``DispatchFailed(retry=False)`` (Term);
* 200/201 → the workflow's id (201: made now; 200: made by an earlier delivery).

The client takes an ``httpx`` transport, so a test (or the embedded platform) can wire it
straight to the orchestrator's ASGI app. ``lookup`` finds a workflow by the op's idempotency
key for :meth:`~.controller.OpsController.reconcile`; it needs an API key with
``workflow:read`` (``api_key``), without one it answers None (the redelivered message settles
the record instead).
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from provisioning.core.ops_token import VerifiedOp
from provisioning.ops_controller.controller import DispatchFailed

__all__ = ["HttpDispatcher"]


class HttpDispatcher:
    def __init__(
        self,
        orchestrator_url: str,
        *,
        api_key: str = "",
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self._url = orchestrator_url.rstrip("/")
        self._transport = transport
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._api_key = api_key

    @property
    def _http(self) -> httpx.AsyncClient:
        # Made on first use and again after close(): a restarted controller dispatches anew.
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self._url, transport=self._transport, timeout=self._timeout_s
            )
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def dispatch(self, op: VerifiedOp) -> dict[str, Any]:
        body = json.dumps({"token": op.token, "params": op.params}).encode()
        try:
            resp = await self._http.post(
                "/ops/dispatch", content=body, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise DispatchFailed(
                f"orchestrator not reachable ({type(exc).__name__})", retry=True
            ) from None
        if resp.status_code in (200, 201):
            wf = resp.json()["data"]
            return {"workflow_id": wf["id"], "created": resp.status_code == 201}
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:300]
        raise DispatchFailed(
            f"orchestrator answered {resp.status_code}: {message}", retry=resp.status_code >= 500
        )

    async def ready(self) -> bool:
        """Whether the orchestrator answers ``GET /health`` (the controller holds its
        consumption while it does not)."""
        try:
            resp = await self._http.get("/health", timeout=2.0)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def lookup(self, jti: str) -> dict[str, Any] | None:
        if not self._api_key:
            return None
        try:
            resp = await self._http.get(
                "/workflows",
                params={"idempotency_key": f"op:{jti}"},
                headers={"X-API-Key": self._api_key},
            )
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        found = resp.json()["data"]
        return dict(found[0]) if found else None
