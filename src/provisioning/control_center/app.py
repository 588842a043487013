"""Wiring of the control center service: store, keys, policies, identity, HTTP app."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request

from provisioning import __version__
from provisioning.control_center.audit_consumer import AuditConsumer
from provisioning.control_center.audit_log import AuditEvent
from provisioning.control_center.config_files import parse_workspaces
from provisioning.control_center.config_routes import build_config_router
from provisioning.control_center.monitoring import SystemMonitor
from provisioning.control_center.routes import build_router
from provisioning.control_center.service import IdentityService
from provisioning.control_center.system_routes import build_system_router
from provisioning.control_center.ui import mount_ui
from provisioning.control_center.workspace_config import WorkspaceConfig
from provisioning.core.audit_relay import audit_event
from provisioning.core.auth import Authenticator, Guard, Identity
from provisioning.core.bus import Bus
from provisioning.core.bus.link import BusLink
from provisioning.core.isolated import Limits
from provisioning.core.rbac import Authorizer
from provisioning.core.settings import Settings
from provisioning.core.signing import KeyRing, StaticJwks, TokenVerifier
from provisioning.core.store import Database, open_database
from provisioning.core.web import BodyLimitMiddleware, install_error_handlers

__all__ = ["ControlCenterService"]


class ControlCenterService:
    """The control center as one unit the supervisor (or a test) starts and stops.

    It also owns the platform's identity plumbing: :attr:`guard` is what every other service
    of the embedded platform uses to authenticate and authorize its requests.
    """

    name = "control-center"

    def __init__(
        self, settings: Settings, *, db: Database | None = None, bus: Bus | None = None
    ) -> None:
        self.settings = settings
        # Given (the embedded platform) or, standalone with `nats.url`, its own link: ops.audit.>
        # events join the audit log (AuditConsumer) and /system/status shows the streams.
        self._link: BusLink | None = None
        if bus is None and settings.nats.url.strip():
            bus = self._link = BusLink(settings, name="prvng-control-center")
        self.bus = bus
        self._link_stop = asyncio.Event()
        self._link_task: asyncio.Task[bool] | None = None
        self.audit_consumer: AuditConsumer | None = None
        self._own_db = db is None
        self.db: Database = db or open_database(
            settings.state_url, sqlite_synchronous=settings.state.sqlite_synchronous
        )
        cc = settings.control_center
        self.ring = KeyRing(settings.home / "keys" / "control-center")
        self.authorizer = Authorizer([settings.home / "config" / "policies"])
        self.identity = IdentityService(self.db, cc, self.ring, self.authorizer)
        self.verifier = TokenVerifier(StaticJwks(self.ring), audience=cc.audience, issuer=cc.issuer)
        self.authenticator = Authenticator(self.verifier, self.identity)
        self.guard = Guard(
            self.authenticator, self.authorizer, audit=self.audit_hook("control-center")
        )
        self.admin_password: str | None = None
        self.app = self._build_app()

    @property
    def host(self) -> str:
        return self.settings.control_center.host

    @property
    def port(self) -> int:
        return self.settings.control_center.port

    def audit_hook(self, service: str) -> Any:
        """The denial recorder other services of this process use."""

        async def hook(
            request: Request,
            who: Identity | None,
            action: str,
            result: str,
            details: dict[str, Any],
        ) -> None:
            event = audit_event(request, who, action, result, details, service)
            await self.identity.audit(AuditEvent(**event))

        return hook

    def _build_app(self) -> FastAPI:
        app = FastAPI(
            title="Provisioning control center",
            version=__version__,
            description="Identity (login, tokens, users, API keys), access control (Cedar) "
            "and the audit log. Answers use the `{success, data}` envelope.",
        )
        install_error_handlers(app)
        app.include_router(build_router(self.identity, self.guard, time.monotonic()))
        self.monitor = SystemMonitor(self.settings, db=self.db, bus=self.bus)
        app.include_router(build_system_router(self.monitor, self.guard))
        workspaces = parse_workspaces(self.settings.control_center.workspaces)
        limits = Limits.of(self.settings.control_center)
        self.config = WorkspaceConfig(self.db, workspaces, limits=limits)  # API and UI share it
        app.include_router(build_config_router(self.config, self.guard))
        self.ui = mount_ui(app, self.settings, self.identity, self.guard, monitor=self.monitor)
        self.ui.config = self.config
        app.add_middleware(BodyLimitMiddleware, max_bytes=1024 * 1024)
        return app

    async def start(self) -> None:
        """Migrate, make sure a signing key exists, create the first admin on first run."""
        await self.identity.migrate()
        self.ring.load_or_create()
        self.admin_password = await self.identity.bootstrap_admin(
            self.settings.control_center.admin_password
        )
        if self._link is not None:  # connects in the background; the consumer retries meanwhile
            self._link_stop.clear()
            self._link_task = asyncio.create_task(self._link.wait_connected(self._link_stop))
        if self.bus is not None:
            self.audit_consumer = AuditConsumer(self.bus, self.identity)
            self.audit_consumer.start()

    def background_tasks(self) -> list[asyncio.Task[None]]:
        """The consumer of ``ops.audit.>`` (with a bus), for the supervisor."""
        task = self.audit_consumer.task if self.audit_consumer is not None else None
        return [task] if task is not None else []

    async def stop(self) -> None:
        if self.audit_consumer is not None:
            await self.audit_consumer.stop()
        if self._link is not None:
            self._link_stop.set()
            if self._link_task is not None:
                await self._link_task
            await self._link.close()
        if self._own_db:
            await self.db.close()
