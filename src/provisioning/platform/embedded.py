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
from provisioning.platform.supervisor import Service

__all__ = ["build_services"]


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
