"""The embedded platform: every service in one process, sharing one store and one identity.

The control center starts first (migrations, signing key, the first ``admin``); the other
services authenticate with its in-process identity provider, so a revocation reaches them on
the next request, and record their denials in its audit log.
"""

from __future__ import annotations

from provisioning.control_center.app import ControlCenterService
from provisioning.core.auth import Guard
from provisioning.core.settings import Settings
from provisioning.orchestrator.app import OrchestratorService
from provisioning.platform.supervisor import Background, Service

__all__ = ["StreamsSetup", "build_background", "build_services"]


def build_services(settings: Settings) -> tuple[ControlCenterService, list[Service]]:
    """The control center and every service, in start order."""
    cc = ControlCenterService(settings)
    guard = Guard(cc.authenticator, cc.authorizer, audit=cc.audit_hook("orchestrator"))
    orchestrator = OrchestratorService(
        settings,
        worker_id=settings.orchestrator.worker_id or "embedded",
        guard=guard,
        db=cc.db,
    )
    return cc, [cc, orchestrator]


class StreamsSetup:
    """Creates the JetStream streams and durable consumers (DESIGN §4) once NATS is up."""

    name = "nats-streams"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def start(self) -> None:
        from provisioning.core.bus.nats import NatsBus

        n = self.settings.nats
        bus = NatsBus(
            self.settings.nats_servers,
            max_deliver=n.max_deliver,
            ack_wait_s=n.ack_wait_s,
            duplicate_window_s=n.duplicate_window_s,
        )
        await bus.connect()
        try:
            await bus.ensure()
        finally:
            await bus.close()

    async def stop(self) -> None:
        return None


def build_background(settings: Settings) -> list[Background]:
    """The embedded nats-server (unless ``nats.url`` names one) and the streams on it."""
    from provisioning.platform.nats_server import EmbeddedNats

    found: list[Background] = []
    if not settings.nats.url.strip():
        found.append(EmbeddedNats(settings))
    found.append(StreamsSetup(settings))
    return found
