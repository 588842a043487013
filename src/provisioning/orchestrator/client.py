"""Typed async HTTP client of the orchestrator API (used by the CLI and other services).

It takes an optional httpx transport so a test can wire it straight to an ASGI app. Errors come
back as the same typed errors the server raised; a connection failure is :class:`Unreachable`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Literal

import httpx

from provisioning.core.errors import ProvisioningError, Unreachable, error_from_wire
from provisioning.core.sse import iter_events
from provisioning.orchestrator.api import WorkflowSpec
from provisioning.orchestrator.workflow_file import load_workflow_file, parse_workflow_text

# The workflow-file readers are offered with the client: whoever submits (the CLI, the web UI)
# reads and checks a workflow file before sending it.
__all__ = ["OrchestratorClient", "load_workflow_file", "parse_workflow_text"]


class OrchestratorClient:
    """``async with OrchestratorClient(url) as c: await c.submit(spec)``."""

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

    async def __aenter__(self) -> OrchestratorClient:
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

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        await self._authorize()
        try:
            resp = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(
                f"orchestrator at {self.base_url} is not reachable ({exc.__class__.__name__}); "
                "is the platform running? (`prvng platform status`)"
            ) from None
        return _unwrap(resp)

    async def health(self) -> dict[str, Any]:
        return dict(await self._call("GET", "/health"))

    async def submit(self, spec: WorkflowSpec | Mapping[str, Any]) -> dict[str, Any]:
        """Submit a workflow; with a known idempotency key the existing workflow comes back."""
        body = (
            spec.model_dump(mode="json", exclude_none=True)
            if isinstance(spec, WorkflowSpec)
            else spec
        )
        return dict(await self._call("POST", "/workflows", json=body))

    async def provision(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A workspace request (``/workflows/servers/create`` …): the workflow it submitted, or
        ``{"check": true, "plan": …}`` when ``body["check"]``."""
        return dict(await self._call("POST", path, json=dict(body)))

    async def list_servers(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        return list(await self._call("GET", "/servers", params=params))

    async def list_workflows(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        return list(await self._call("GET", "/workflows", params=params))

    async def count_workflows(self, **filters: Any) -> dict[str, Any]:
        """``{"total": n, "by_status": {status: n}}`` over every workflow the filters
        (``kind``, ``owner``, ``since``) select and the caller may see."""
        params = {k: v for k, v in filters.items() if v is not None}
        return dict(await self._call("GET", "/workflows/counts", params=params))

    async def find_workflow(self, idempotency_key: str) -> dict[str, Any] | None:
        """The workflow submitted with this idempotency key (``op:<op id>`` for one made from
        a signed operation), without its tasks; None when there is none (or not yours)."""
        found = await self._call("GET", "/workflows", params={"idempotency_key": idempotency_key})
        return dict(found[0]) if found else None

    async def get_workflow(
        self, workflow_id: str, *, tasks: Literal["full", "brief", "none"] = "full"
    ) -> dict[str, Any]:
        """The workflow and its tasks. ``tasks="brief"``: without attempts, outputs and command
        (``attempt_count`` instead), much lighter for a big workflow; ``"none"``: no tasks."""
        params = None if tasks == "full" else {"tasks": tasks}
        return dict(await self._call("GET", f"/workflows/{workflow_id}", params=params))

    async def action(self, workflow_id: str, action: str) -> dict[str, Any]:
        """cancel | pause | resume | retry | rollback."""
        return dict(await self._call("POST", f"/workflows/{workflow_id}/{action}"))

    async def list_tasks(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        return list(await self._call("GET", "/tasks", params=params))

    async def get_task(self, task_id: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"/tasks/{task_id}"))

    async def task_logs(self, task_id: str, **params: Any) -> list[dict[str, Any]]:
        data = await self._call(
            "GET", f"/tasks/{task_id}/logs", params={k: v for k, v in params.items() if v}
        )
        return list(data["lines"])

    async def task_log_text(self, task_id: str) -> str:
        """The task's log as plain text (``[attempt:n] stream: line``), as downloaded."""
        await self._authorize()
        try:
            resp = await self._http.get(f"/tasks/{task_id}/logs", params={"format": "text"})
        except httpx.TransportError as exc:
            raise Unreachable(
                f"orchestrator at {self.base_url} is not reachable ({exc.__class__.__name__})"
            ) from None
        if not resp.is_success:
            _unwrap(resp)
        return resp.text

    async def follow_logs(
        self, task_id: str, last_event_id: str | None = None
    ) -> AsyncIterator[tuple[str, str, dict[str, Any]]]:
        """Yield ``(event, id, data)`` from the SSE stream until the task ends."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        await self._authorize()
        try:
            async with self._http.stream(
                "GET",
                f"/tasks/{task_id}/logs",
                params={"follow": "1"},
                headers=headers,
                timeout=httpx.Timeout(30.0, read=None),
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    _unwrap(resp)
                async for ev in iter_events(resp.aiter_lines()):
                    yield ev.event, ev.id or "", ev.json()
        except httpx.TransportError as exc:
            raise Unreachable(
                f"orchestrator at {self.base_url} is not reachable ({exc.__class__.__name__})"
            ) from None


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
