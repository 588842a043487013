"""Wiring of the orchestrator service: store, engine, HTTP app. No logic here."""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI

from provisioning import __version__
from provisioning.core.audit_relay import AuditRelay, HttpAuditSender, outbox_hook
from provisioning.core.auth import AuditHook, Guard, install_mutation_audit
from provisioning.core.identity_client import standalone_guard as shared_standalone_guard
from provisioning.core.logging import get_logger
from provisioning.core.ops_token import ops_verifier
from provisioning.core.rbac import Authorizer
from provisioning.core.settings import Settings
from provisioning.core.signing import TokenVerifier
from provisioning.core.store import Database, open_database
from provisioning.core.web import BodyLimitMiddleware, install_error_handlers
from provisioning.orchestrator.domain_routes import build_domain_router
from provisioning.orchestrator.engine import Engine
from provisioning.orchestrator.metrics import Metrics
from provisioning.orchestrator.ops_routes import build_ops_router
from provisioning.orchestrator.routes import SignedOpsGate, build_router
from provisioning.orchestrator.store import WorkflowStore
from provisioning.orchestrator.tables import audit_outbox

__all__ = ["OrchestratorService", "standalone_guard"]

log = get_logger("orchestrator")


def standalone_guard(settings: Settings, audit: AuditHook | None = None) -> Guard:
    """The shared standalone guard (``core.identity_client``), or none at all when
    ``orchestrator.auth = "disabled"`` (benchmarks, isolated tests)."""
    if settings.orchestrator.auth == "disabled":
        log.warning("authentication is DISABLED: anyone reaching this port can do anything")
        return Guard(None, Authorizer([settings.home / "config" / "policies"]))
    return shared_standalone_guard(settings, audit)


class OrchestratorService:
    """The orchestrator as one unit the platform supervisor (or a test) starts and stops."""

    name = "orchestrator"

    def __init__(
        self,
        settings: Settings,
        *,
        worker_id: str | None = None,
        guard: Guard | None = None,
        db: Database | None = None,
    ) -> None:
        self.settings = settings
        self._ops_verifier: TokenVerifier | None = None
        self._own_db = db is None
        self.db: Database = db or open_database(
            settings.state_url, sqlite_synchronous=settings.state.sqlite_synchronous
        )
        # Standalone (no guard handed in): audit events go to an outbox in this store and a
        # relay carries them to the control center.
        self.audit_relay: AuditRelay | None = None
        if guard is None:
            guard = standalone_guard(settings, outbox_hook(self.db, audit_outbox, "orchestrator"))
            if guard.authenticator is not None:
                key = settings.control_center.service_api_key
                sender = HttpAuditSender(settings.control_center_url, key) if key else None
                self.audit_relay = AuditRelay(self.db, audit_outbox, sender)
        self.guard = guard
        self.store = WorkflowStore(self.db)
        self.engine = Engine(
            self.store,
            settings.orchestrator,
            settings.logs_dir,
            worker_id=worker_id,
            task_env=settings.task_env(),
        )
        self.metrics = Metrics(self.engine)
        self.app = self._build_app()

    def ops_verifier(self) -> TokenVerifier:
        """Verifies operation tokens (``core.ops_token.ops_verifier``), made on first use."""
        if self._ops_verifier is None:
            self._ops_verifier = ops_verifier(self.settings)
        return self._ops_verifier

    @property
    def host(self) -> str:
        return self.settings.orchestrator.host

    @property
    def port(self) -> int:
        return self.settings.orchestrator.port

    def _build_app(self) -> FastAPI:
        app = FastAPI(
            title="Provisioning orchestrator",
            version=__version__,
            description="Durable workflow execution: DAGs of tasks with retries, limits, "
            "checkpoints and rollback. Answers use the `{success, data}` envelope.",
        )
        install_error_handlers(app)
        signed_ops = SignedOpsGate(self.settings.orchestrator.require_signed_ops, self.guard)
        if signed_ops.required:
            log.info("require_signed_ops: workflows are made only from signed operations")
        started = time.monotonic()
        app.include_router(build_router(self.engine, self.metrics, self.guard, started, signed_ops))
        app.include_router(build_domain_router(self.engine, self.guard, signed_ops))
        app.include_router(build_ops_router(self.engine, self.ops_verifier))
        install_mutation_audit(app, self.guard, "orchestrator")
        app.add_middleware(BodyLimitMiddleware, max_bytes=self.settings.orchestrator.max_body_bytes)
        return app

    def background_tasks(self) -> list[asyncio.Task[None]]:
        """The engine's scheduler and lease loops, for the supervisor."""
        return self.engine.loops()

    async def start(self) -> None:
        """Migrate the store, recover, start scheduling."""
        await self.store.migrate()
        await self.engine.start()
        if self.audit_relay is not None:
            if self.audit_relay.sender is None:
                log.warning(
                    "no control_center.service_api_key: audit events are kept in this "
                    "orchestrator's outbox until one is set (see docs/reference/access-control.md)"
                )
            self.audit_relay.start()

    async def stop(self, *, kill_running: bool = False) -> None:
        await self.engine.stop(kill_running=kill_running)
        if self.audit_relay is not None:
            await self.audit_relay.stop()
        if self._own_db:
            await self.db.close()
