"""The embedded platform: every service in one process, sharing one store and one identity.

The control center starts first (migrations, signing key, the first ``admin``); the other
services authenticate with its in-process identity provider, so a revocation reaches them on
the next request, and record their denials in its audit log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from provisioning.control_center.app import ControlCenterService
from provisioning.core.auth import Guard
from provisioning.core.settings import Settings
from provisioning.orchestrator.app import OrchestratorService
from provisioning.platform.supervisor import Background, Service

if TYPE_CHECKING:
    from provisioning.core.bus.nats import NatsBus
    from provisioning.core.store.base import Database

__all__ = ["BusConnection", "SharedDatabase", "build_platform", "build_services", "make_bus"]


def build_services(
    settings: Settings, *, bus: NatsBus | None = None, db: Database | None = None
) -> tuple[ControlCenterService, list[Service]]:
    """The control center and every service, in start order (``bus``: connected by the time
    they start; without it the platform runs without NATS). ``db``: the store they share,
    closed by the caller; without it the control center opens it and closes it at its stop."""
    cc = ControlCenterService(settings, bus=bus, db=db)
    guard = Guard(cc.authenticator, cc.authorizer, audit=cc.audit_hook("orchestrator"))
    orchestrator = OrchestratorService(
        settings,
        worker_id=settings.orchestrator.worker_id or "embedded",
        guard=guard,
        db=cc.db,
    )
    services: list[Service] = [cc, orchestrator]
    if bus is not None:  # the ops control plane lives on NATS
        services.extend(_ops_services(settings, cc, orchestrator, bus))
    return cc, services


def _ops_services(
    settings: Settings, cc: ControlCenterService, orchestrator: OrchestratorService, bus: NatsBus
) -> list[Service]:
    """The keeper, the controller (dispatching to the orchestrator's app in this process, and
    reconciling by reading its store) and the audit-mirror, all on the platform's bus."""
    import httpx

    from provisioning.audit_mirror.app import AuditMirrorService
    from provisioning.ops_controller.app import OpsControllerService
    from provisioning.ops_keeper.app import OpsKeeperService

    keeper_guard = Guard(cc.authenticator, cc.authorizer, audit=cc.audit_hook("ops-keeper"))

    async def lookup(jti: str) -> dict[str, Any] | None:
        found = await orchestrator.store.find_by_idempotency_key(f"op:{jti}")
        return {"id": found} if found else None

    shared_db = cc.db if settings.ops_controller.idempotency == "state" else None
    services: list[Service] = [OpsKeeperService(settings, guard=keeper_guard, db=cc.db, bus=bus)]
    if settings.ops_controller.embedded:
        services.append(
            OpsControllerService(
                settings,
                db=shared_db,
                bus=bus,
                transport=httpx.ASGITransport(app=orchestrator.app),
                lookup=lookup,
            )
        )
    if settings.audit_mirror.embedded:
        services.append(AuditMirrorService(settings, bus=bus))
    return services


def make_bus(settings: Settings) -> NatsBus:
    """An unconnected bus on the platform's NATS (embedded or ``nats.url``)."""
    from provisioning.core.bus.nats import bus_for

    return bus_for(settings, name="prvng-platform")


class BusConnection:
    """Connects the platform's bus once NATS is up and makes the DESIGN §4 streams and durable
    consumers; closes it after the services stopped."""

    name = "nats-bus"

    def __init__(self, bus: NatsBus) -> None:
        self.bus = bus

    async def start(self) -> None:
        await self.bus.connect()
        await self.bus.ensure()

    async def stop(self) -> None:
        await self.bus.close()


class SharedDatabase:
    """The store every service of the platform shares, closed after they all stopped: owned
    by the platform, not by the control center, so restarting a crashed control center does
    not close it under the others."""

    name = "state-store"

    def __init__(self, db: Database) -> None:
        self.db = db

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self.db.close()


def build_platform(
    settings: Settings,
) -> tuple[ControlCenterService, list[Service], list[Background]]:
    """``prvng platform start``: the embedded nats-server (unless ``nats.url`` names one) and
    the bus first, then every service wired to them."""
    from provisioning.core.store.base import open_database
    from provisioning.platform.nats_server import EmbeddedNats

    bus = make_bus(settings)
    db = open_database(settings.state_url, sqlite_synchronous=settings.state.sqlite_synchronous)
    background: list[Background] = [SharedDatabase(db)]
    if not settings.nats.url.strip():
        background.append(EmbeddedNats(settings))
    background.append(BusConnection(bus))
    cc, services = build_services(settings, bus=bus, db=db)
    return cc, services, background
