"""Audit events of a service that runs apart from the control center (``prvng serve <service>``).

The control center keeps the one hash-chained audit log. A service in the same process records
straight into it (``ControlCenterService.audit_hook``); a service in another process cannot, so
it writes each event into an **outbox** table in its own store (:func:`outbox_hook`) and an
:class:`AuditRelay` delivers the outbox to the control center (``POST /audit/ingest``,
authenticated with the service API key ``control_center.service_api_key``, which needs the
``audit:write`` action) and deletes what was accepted. Nothing is lost while the control center
is down or the key is missing: events wait in the outbox. Each event carries an id the control
center records once, so a batch delivered twice (the relay died between the answer and the
delete) is not recorded twice.

:func:`audit_event` is the one place that turns a request, its caller and an outcome into an
event, for both paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import Request
from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy.engine import Connection

from provisioning.core.auth import AuditHook, Identity
from provisioning.core.logging import get_logger
from provisioning.core.store import Database

__all__ = ["AuditRelay", "HttpAuditSender", "audit_event", "outbox_hook"]

log = get_logger("audit_relay")

Sender = Callable[[Sequence[dict[str, Any]]], Awaitable[None]]


def audit_event(
    request: Request,
    who: Identity | None,
    action: str,
    result: str,
    details: dict[str, Any],
    service: str,
) -> dict[str, Any]:
    """The audit event of ``request`` as the fields of an ``AuditEvent`` (JSON-ready).

    ``details`` may carry ``object_type`` and ``object`` (taken out into their own fields).
    """
    details = dict(details)
    return {
        "action": action,
        "result": result,
        "actor": who.username if who else None,
        "actor_type": who.kind if who else "anonymous",
        "object_type": details.pop("object_type", None),
        "object_id": details.pop("object", None),
        "source": request.client.host if request.client else None,
        "request_id": request.headers.get("x-request-id"),
        "service": service,
        "details": {"method": request.method, "path": request.url.path, **details},
    }


def outbox_hook(db: Database, outbox: Table, service: str) -> AuditHook:
    """An audit hook that writes each event into ``outbox`` (columns ``id``, ``created_at``,
    ``event``) for an :class:`AuditRelay` to deliver."""

    async def hook(
        request: Request, who: Identity | None, action: str, result: str, details: dict[str, Any]
    ) -> None:
        event = audit_event(request, who, action, result, details, service)
        now = datetime.now(UTC)
        event["details"]["occurred_at"] = now.isoformat()
        row = {"id": str(uuid.uuid4()), "created_at": now, "event": event}
        await db.run_write(lambda c: c.execute(insert(outbox).values(row)))

    return hook


class HttpAuditSender:
    """Delivers a batch to the control center's ``POST /audit/ingest``.

    Raises (from ``__call__``):
        RuntimeError: the control center did not take the batch (unreachable, 4xx, 5xx); the
            message says which, never the key.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/audit/ingest"
        self._headers = {"X-API-Key": api_key}
        self._transport = transport
        self._timeout = timeout_s

    async def __call__(self, events: Sequence[dict[str, Any]]) -> None:
        async with httpx.AsyncClient(transport=self._transport, timeout=self._timeout) as client:
            try:
                resp = await client.post(
                    self.url, json={"events": list(events)}, headers=self._headers
                )
            except httpx.HTTPError as exc:
                raise RuntimeError(f"{self.url} not reachable: {type(exc).__name__}") from None
        if resp.status_code != 200:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:200]
            raise RuntimeError(f"{self.url} answered HTTP {resp.status_code}: {message}")


class AuditRelay:
    """Moves the outbox to the control center: oldest first, ``batch`` at a time, every
    ``interval_s`` while there is nothing to send and at once while there is; after a failure
    it waits longer each time (up to ``max_backoff_s``)."""

    def __init__(
        self,
        db: Database,
        outbox: Table,
        sender: Sender | None,
        *,
        batch: int = 200,
        interval_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.db, self.outbox, self.sender = db, outbox, sender
        self.batch, self.interval_s, self.max_backoff_s = batch, interval_s, max_backoff_s
        self.delivered = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def pending(self) -> int:
        """Events waiting in the outbox."""
        return int(
            await self.db.run_read(
                lambda c: c.execute(select(func.count()).select_from(self.outbox)).scalar_one()
            )
        )

    async def deliver_once(self) -> int:
        """Send one batch; answer how many events were delivered (0: the outbox is empty).

        Raises:
            RuntimeError: no sender is configured, or the control center refused the batch.
        """
        if self.sender is None:
            raise RuntimeError(
                "no service API key: set control_center.service_api_key "
                "(PRVNG_CONTROL_CENTER__SERVICE_API_KEY) to a key with the audit:write scope"
            )
        o = self.outbox

        def take(conn: Connection) -> list[tuple[str, dict[str, Any]]]:
            q = select(o.c.id, o.c.event).order_by(o.c.created_at, o.c.id).limit(self.batch)
            return [(r.id, dict(r.event)) for r in conn.execute(q)]

        rows = await self.db.run_read(take)
        if not rows:
            return 0
        await self.sender([{**event, "id": event_id} for event_id, event in rows])
        ids = [event_id for event_id, _ in rows]
        await self.db.run_write(lambda c: c.execute(delete(o).where(o.c.id.in_(ids))))
        self.delivered += len(rows)
        return len(rows)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-relay")

    async def stop(self) -> None:
        """Stop the loop after one last batch, unless the control center was failing (what is
        left stays in the outbox for the next start)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self.last_error is None:
            with contextlib.suppress(Exception):
                await self.deliver_once()

    async def _run(self) -> None:
        backoff = self.interval_s
        while True:
            try:
                sent = await self.deliver_once()
            except Exception as exc:  # the loop must outlive any one failure
                error = str(exc)
                if error != self.last_error:
                    log.warning("audit events wait in the outbox", extra={"error": error})
                self.last_error = error
                backoff = min(backoff * 2, self.max_backoff_s)
                await asyncio.sleep(backoff)
                continue
            if self.last_error is not None:
                log.info("audit relay delivering again")
                self.last_error = None
            backoff = self.interval_s
            if sent < self.batch:
                await asyncio.sleep(self.interval_s)
