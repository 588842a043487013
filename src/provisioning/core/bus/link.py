"""A service's link to the bus: the platform's connected bus handed in (never closed here), or
its own connection made in the background and retried while NATS is down — so a service
starts, and answers ``/health``, before NATS does.

:class:`BusLink` is itself a :class:`~provisioning.core.bus.Bus`: code built before the
connection exists (a controller, a consumer) holds the link and uses it once connected; used
before, it raises :class:`~provisioning.core.errors.Unreachable`.
"""

from __future__ import annotations

import asyncio
import contextlib

from provisioning.core.bus import Bus, Consumer, ConsumerInfo, Published, StreamInfo
from provisioning.core.errors import Unreachable
from provisioning.core.logging import get_logger
from provisioning.core.settings import Settings

__all__ = ["BusLink", "bus_connected"]

log = get_logger("bus")


def bus_connected(bus: object) -> bool:
    """Whether ``bus`` (a NatsBus, a BusLink, or None) has a live connection. A bus without
    a NATS client (a test double) counts as connected."""
    target = getattr(bus, "bus", bus) if isinstance(bus, BusLink) else bus
    if target is None:
        return False
    nc = getattr(target, "nc", None)
    return nc is None or bool(getattr(nc, "is_connected", True))


class BusLink:
    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        bus: Bus | None = None,
        retry_interval_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.name = name
        self.bus: Bus | None = bus
        self._own = bus is None
        self.retry_interval_s = retry_interval_s
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return bus_connected(self.bus)

    async def wait_connected(self, stop: asyncio.Event) -> bool:
        """Connect (when not handed a bus), retrying every ``retry_interval_s`` until it
        works or ``stop`` is set; answers whether it is connected."""
        from provisioning.core.bus.nats import connect_bus

        while self.bus is None and not stop.is_set():
            try:
                self.bus = await connect_bus(self.settings, name=self.name, timeout_s=2.0)
                self.last_error = None
            except Exception as exc:
                self.last_error = f"NATS: {exc}"
                log.warning("NATS not reachable; retrying", extra={"client": self.name})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.retry_interval_s)
        return self.bus is not None

    def _bus(self) -> Bus:
        if self.bus is None:
            raise Unreachable(f"{self.name} is not connected to NATS yet")
        return self.bus

    async def ensure(self) -> None:
        await self._bus().ensure()

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Published:
        return await self._bus().publish(subject, payload, msg_id=msg_id, headers=headers)

    async def consumer(self, stream: str, durable: str) -> Consumer:
        return await self._bus().consumer(stream, durable)

    async def stream_info(self) -> list[StreamInfo]:
        return await self._bus().stream_info()

    async def consumer_info(self) -> list[ConsumerInfo]:
        return await self._bus().consumer_info()

    async def close(self) -> None:
        """Close the connection this link made (a bus handed in stays open)."""
        if self._own and self.bus is not None:
            bus, self.bus = self.bus, None
            await bus.close()
