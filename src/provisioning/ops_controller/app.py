"""Wiring of the ops-controller service: idempotency store, verifier, dispatcher, bus, the
consumer loop and a small HTTP app (``/health``, ``/metrics``). The decisions are in
``controller.py``.

Start order: open the idempotency store, connect NATS (or keep trying in the background), then
reconcile the records a crash left ``dispatched`` and consume ``ops.pending.>``. The loop never
gives up: NATS or the store failing makes it wait and retry; what was not acked is redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from provisioning import __version__
from provisioning.core.aio import reraise_if_cancelling
from provisioning.core.bus import Bus
from provisioning.core.bus.link import BusLink
from provisioning.core.logging import get_logger
from provisioning.core.ops_token import ops_verifier
from provisioning.core.settings import Settings
from provisioning.core.store import Database
from provisioning.core.web import health_app
from provisioning.ops_controller.controller import OpsController
from provisioning.ops_controller.dispatch import HttpDispatcher
from provisioning.ops_controller.idempotency import IdempotencyStore

__all__ = ["OpsControllerService", "idempotency_store"]

log = get_logger("ops_controller")

Lookup = Callable[[str], Awaitable[dict[str, Any] | None]]


def idempotency_store(settings: Settings, db: Database | None) -> IdempotencyStore:
    """The store ``ops_controller.idempotency`` names: the platform's SQL store (``db``, or
    one opened on ``state.url``) or embedded SurrealDB (one controller process per file)."""
    c = settings.ops_controller
    if c.idempotency == "surrealdb":
        from provisioning.ops_controller.idempotency_surreal import SurrealIdempotencyStore

        path = settings.data_path(c.surreal_path, "state/ops-idempotency.surreal")
        return SurrealIdempotencyStore(path)
    from provisioning.ops_controller.idempotency_sql import SqlIdempotencyStore

    if db is not None:
        return SqlIdempotencyStore(db)
    return SqlIdempotencyStore.from_url(
        settings.state_url, sqlite_synchronous=settings.state.sqlite_synchronous
    )


class OpsControllerService:
    """The ops-controller as one unit the platform supervisor (or a test) starts and stops.

    ``db``: a shared store (not closed on stop). ``bus``: a connected bus (not closed on
    stop); without one the service connects to ``nats`` itself, retrying while it is down.
    ``transport``: how to reach the orchestrator (the embedded platform hands its ASGI app);
    default HTTP to ``orchestrator.url``. ``lookup``: finds a workflow by the op's jti for the
    reconciliation at start; default the orchestrator's API with ``ops_controller.api_key``.
    """

    name = "ops-controller"

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database | None = None,
        bus: Bus | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        lookup: Lookup | None = None,
        retry_interval_s: float = 1.0,
    ) -> None:
        self.settings = settings
        c = settings.ops_controller
        self.store = idempotency_store(settings, db)
        self.dispatcher = HttpDispatcher(
            settings.orchestrator_url, api_key=c.api_key, transport=transport
        )
        self._lookup: Lookup = lookup or self.dispatcher.lookup
        self.link = BusLink(
            settings, name="prvng-ops-controller", bus=bus, retry_interval_s=retry_interval_s
        )
        self.controller = OpsController(
            ops_verifier(settings),
            self.store,
            self.dispatcher,
            self.link,
            max_deliver=settings.nats.max_deliver,
            max_delay_s=c.max_delay_s,
            heartbeat_s=c.heartbeat_s,
        )
        self.retry_interval_s = retry_interval_s
        self.reconciled: int | None = None
        self.error: str | None = None
        self._started = time.monotonic()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.metrics = _Metrics(self)
        self.app = self._build_app()

    @property
    def host(self) -> str:
        return self.settings.ops_controller.host

    @property
    def port(self) -> int:
        return self.settings.ops_controller.port

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def last_error(self) -> str | None:
        return self.error or self.link.last_error

    def _build_app(self) -> FastAPI:
        return health_app(
            title="Provisioning ops-controller",
            version=__version__,
            description="Consumes signed operations from NATS and dispatches each once to the "
            "orchestrator. Only health and metrics are served here.",
            status=self.status,
            metrics=self._metrics_text,
            health_summary="Liveness, NATS connection, outcomes",
        )

    def status(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "service": self.name,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "nats": "connected" if self.connected else "not connected",
            "idempotency": self.settings.ops_controller.idempotency,
            "orchestrator": self.settings.orchestrator_url,
            "reconciled": self.reconciled,
            # Seconds the consumption has been held for an orchestrator that does not answer.
            "holding_s": (
                None
                if self.controller.held_since is None
                else round(time.monotonic() - self.controller.held_since, 1)
            ),
            "outcomes": dict(self.controller.counts),
            "last_error": self.last_error,
        }

    async def _metrics_text(self) -> bytes:
        await self.metrics.refresh()
        return generate_latest(self.metrics.registry)

    def background_tasks(self) -> list[asyncio.Task[None]]:
        """The consumer loop, for the supervisor (one ending with an exception is a crash)."""
        return [self._task] if self._task is not None else []

    async def start(self) -> None:
        """Open the store and start the loop (which connects NATS and reconciles first)."""
        await self.store.open()
        self._stop.clear()
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="ops-controller")

    async def _run(self) -> None:
        if not await self.link.wait_connected(self._stop):
            return
        try:
            self.reconciled = await self.controller.reconcile(self._lookup)
            if self.reconciled:
                log.info("settled ops left dispatched", extra={"count": self.reconciled})
        except Exception as exc:  # the redelivered messages settle them instead
            self.error = f"reconcile: {exc}"
            log.warning("reconciliation failed", extra={"error": str(exc)})
        backoff = self.retry_interval_s
        while not self._stop.is_set():
            try:
                await self.controller.run(self._stop, batch=self.settings.ops_controller.batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. the consumer could not be bound yet
                self.error = str(exc)
                log.warning("controller loop stopped; restarting", extra={"error": str(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, 30.0)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except TimeoutError:  # a dispatch that does not end: unacked, it comes back
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            except asyncio.CancelledError:  # the loop had been cancelled: stopping goes on
                reraise_if_cancelling()
            self._task = None
        await self.dispatcher.close()
        await self.store.close()
        await self.link.close()


class _Metrics:
    """One registry per service instance (tests run several in one process)."""

    def __init__(self, service: OpsControllerService) -> None:
        self.service = service
        self.registry = r = CollectorRegistry()
        self.outcomes = Gauge(
            "prvng_controller_outcomes",
            "Messages answered since start, by answer (ack, nak, term).",
            ["outcome"],
            registry=r,
        )
        self.dispatched = Gauge(
            "prvng_controller_dispatched",
            "Ops dispatched whose outcome is not recorded yet (at most 1000 counted).",
            registry=r,
        )
        self.outbox = Gauge(
            "prvng_controller_audit_outbox",
            "Audit events not yet published to ops.audit (at most 1000 counted).",
            registry=r,
        )
        self.connected = Gauge(
            "prvng_controller_nats_connected", "1 while connected to NATS.", registry=r
        )

    async def refresh(self) -> None:
        svc = self.service
        for outcome in ("ack", "nak", "term"):
            self.outcomes.labels(outcome=outcome).set(svc.controller.counts.get(outcome, 0))
        self.dispatched.set(len(await svc.store.in_state("dispatched", limit=1000)))
        self.outbox.set(len(await svc.store.outbox_pending(1000)))
        self.connected.set(1 if svc.connected else 0)
