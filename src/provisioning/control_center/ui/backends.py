"""What the UI's pages show, fetched server-side from the platform's services.

The orchestrator and the ops-keeper are called through their typed clients with the access
token of the user's session, so each answer is exactly what that user may see through the API
(their Cedar checks run there). Connections are pooled per service; a test hands in transports
(``httpx.ASGITransport`` of an app) instead of HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from provisioning.core.errors import ProvisioningError
from provisioning.core.settings import Settings, service_url
from provisioning.ops_keeper.client import OpsKeeperClient
from provisioning.orchestrator.client import OrchestratorClient

__all__ = ["Backends", "DashboardData", "ServiceHealth"]

_FAILED = ("Failed", "RolledBack")
_FINISHED = ("Completed", "Failed", "Cancelled", "RolledBack")


@dataclass(frozen=True)
class ServiceHealth:
    name: str
    url: str
    ok: bool
    detail: str = ""
    version: str = ""
    latency_ms: float | None = None
    expected: bool = True  # False: its being down is normal here (no NATS, no ops plane)

    @classmethod
    def of_monitor(cls, row: Mapping[str, Any]) -> ServiceHealth:
        """A row of the system monitor's ``services``."""
        return cls(
            name=str(row.get("name", "?")),
            url=str(row.get("url") or ""),
            ok=row.get("status") == "up",
            detail=str(row.get("error") or ""),
            version=str(row.get("version") or ""),
            latency_ms=row.get("latency_ms"),
            expected=bool(row.get("expected", True)),
        )


@dataclass
class DashboardData:
    running: list[dict[str, Any]] = field(default_factory=list)
    recent: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # by status, last 24 h
    failure_rate: float | None = None  # failed / finished, last 24 h
    pending_ops: list[dict[str, Any]] | None = None  # None: not allowed to see them
    errors: list[str] = field(default_factory=list)


class _Borrowed(httpx.AsyncBaseTransport):
    """A shared transport a short-lived client may use but not close."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        return None


def _base(host: str, port: int, url: str) -> str:
    return service_url(host, port, url)


class Backends:
    """The services behind the pages.

    ``transports`` maps a service name (``orchestrator``, ``ops-keeper``, …) to the transport
    to reach it with; the others are reached over HTTP at their configured URL.
    ``ops_services``: whether the ops control plane (keeper, controller, mirror) runs with
    this control center, so its health is shown.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        ops_services: bool = False,
    ) -> None:
        self.settings = settings
        self.transports: dict[str, httpx.AsyncBaseTransport] = dict(transports or {})
        self.ops_services = ops_services
        self._pools: dict[str, httpx.AsyncHTTPTransport] = {}

    @property
    def urls(self) -> dict[str, str]:
        s = self.settings
        urls = {"orchestrator": s.orchestrator_url}
        if self.ops_services:
            k, c, m = s.ops_keeper, s.ops_controller, s.audit_mirror
            urls["ops-keeper"] = _base(k.host, k.port, k.url)
            urls["ops-controller"] = _base(c.host, c.port, "")
            urls["audit-mirror"] = _base(m.host, m.port, "")
        return urls

    def _transport(self, name: str) -> httpx.AsyncBaseTransport:
        given = self.transports.get(name)
        if given is None:
            given = self._pools.get(name)
            if given is None:
                given = self._pools[name] = httpx.AsyncHTTPTransport(retries=0)
        return _Borrowed(given)

    def orchestrator(self, token: str) -> OrchestratorClient:
        return OrchestratorClient(
            self.urls["orchestrator"],
            transport=self._transport("orchestrator"),
            timeout=10.0,
            headers={"Authorization": f"Bearer {token}"},
        )

    def keeper(self, token: str) -> OpsKeeperClient:
        k = self.settings.ops_keeper
        return OpsKeeperClient(
            self.urls.get("ops-keeper") or _base(k.host, k.port, k.url),
            transport=self._transport("ops-keeper"),
            timeout=5.0,
            headers={"Authorization": f"Bearer {token}"},
        )

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()

    # ------------------------------------------------------------------ health

    async def health(self, own_version: str) -> list[ServiceHealth]:
        """The control center (this process) and every other service's ``/health``."""
        probes = [self._probe(name, url) for name, url in self.urls.items()]
        found = await asyncio.gather(*probes)
        me = ServiceHealth(
            "control-center", self.settings.control_center_url, True, "", own_version
        )
        return [me, *found]

    async def _probe(self, name: str, url: str) -> ServiceHealth:
        started = time.perf_counter()
        try:
            async with httpx.AsyncClient(
                transport=self._transport(name), base_url=url, timeout=2.0
            ) as http:
                resp = await http.get("/health")
            latency = round((time.perf_counter() - started) * 1000, 1)
            doc = resp.json().get("data") or {}
            ok = resp.status_code == 200 and doc.get("status", "ok") in ("ok", "degraded")
            detail = "" if doc.get("status") in (None, "ok") else str(doc.get("status"))
            return ServiceHealth(name, url, ok, detail, str(doc.get("version", "")), latency)
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return ServiceHealth(name, url, False, f"unreachable ({exc.__class__.__name__})")

    # ------------------------------------------------------------------ dashboard

    async def dashboard(self, token: str, *, may_read_ops: bool) -> DashboardData:
        """Running and recent workflows, the last day's outcomes, pending approvals."""
        out = DashboardData()
        since = datetime.now(UTC) - timedelta(days=1)
        async with self.orchestrator(token) as orch:
            results = await asyncio.gather(
                orch.list_workflows(status="Running", limit=10),
                orch.list_workflows(limit=10),
                orch.count_workflows(since=since.isoformat()),
                return_exceptions=True,
            )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ProvisioningError):
                raise result
        running, recent, day = results
        if isinstance(running, ProvisioningError):
            out.errors.append(_say("orchestrator", running))
        elif isinstance(running, list) and isinstance(recent, list):
            out.running, out.recent = running, recent
        if isinstance(day, dict):
            out.counts = dict(day["by_status"])
            finished = sum(out.counts.get(s, 0) for s in _FINISHED)
            failed_n = sum(out.counts.get(s, 0) for s in _FAILED)
            out.failure_rate = failed_n / finished if finished else None
        if may_read_ops:
            try:
                async with self.keeper(token) as keeper:
                    out.pending_ops = await keeper.list_ops(state="pending_approval", limit=20)
            except ProvisioningError as exc:
                out.pending_ops = []
                out.errors.append(_say("ops-keeper", exc))
        return out


def _say(service: str, exc: ProvisioningError) -> str:
    return f"{service}: {exc.message}"
