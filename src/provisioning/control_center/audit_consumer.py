"""The control center's durable consumer of ``ops.audit.>``: the ops control plane's audit
events (keeper decisions, controller outcomes) join the hash-chained log, so ``prvng audit
list`` shows them. Each event id is recorded once (redelivery is harmless); an event that is
not valid is terminated with a log line naming what is wrong, never retried forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from pydantic import ValidationError as PydanticValidationError

from provisioning.control_center.api import ForwardedEvent
from provisioning.control_center.service import IdentityService
from provisioning.core.bus import Bus, Delivery
from provisioning.core.logging import get_logger

__all__ = ["AuditConsumer"]

log = get_logger("control_center.audit_consumer")


class AuditConsumer:
    def __init__(self, bus: Bus, identity: IdentityService, *, batch: int = 100) -> None:
        self.bus, self.identity, self.batch = bus, identity, batch
        self.recorded = 0
        self.rejected = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cc-audit-consumer")

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The consuming loop while started."""
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def handle(self, deliveries: list[Delivery]) -> None:
        """Record the valid events of one fetch in one transaction, then answer each."""
        good: list[tuple[Delivery, dict[str, Any]]] = []
        for d in deliveries:
            try:
                event = ForwardedEvent.model_validate(json.loads(d.data)).model_dump()
            except (ValueError, PydanticValidationError) as exc:
                self.rejected += 1
                log.warning(
                    "audit event refused",
                    extra={"subject": d.subject, "seq": d.stream_seq, "error": str(exc)[:300]},
                )
                await d.term()
                continue
            good.append((d, event))
        if good:
            result = await self.identity.ingest([e for _, e in good], "nats:ops.audit")
            self.recorded += result["recorded"]
            for d, _ in good:
                await d.ack()

    async def _run(self) -> None:
        consumer = None
        backoff = 0.5
        while True:
            try:
                if consumer is None:  # a bus still connecting answers Unreachable: retried
                    consumer = await self.bus.consumer("OPS_AUDIT", "control-center")
                deliveries = await consumer.fetch(self.batch, timeout_s=1.0)
                if deliveries:
                    await self.handle(deliveries)
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception:  # the store or NATS hiccuped: unacked events come back
                log.exception("audit consumer failed; retrying")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
