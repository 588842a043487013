"""Wiring of the ops-keeper service: store, keys, policy, bus, HTTP app. No logic here."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from fastapi import FastAPI

from provisioning import __version__
from provisioning.core.audit_relay import AuditRelay, HttpAuditSender, outbox_hook
from provisioning.core.auth import Guard, install_mutation_audit
from provisioning.core.bus import Bus
from provisioning.core.identity_client import standalone_guard
from provisioning.core.logging import get_logger
from provisioning.core.settings import Settings
from provisioning.core.signing import KeyRing
from provisioning.core.store import Database, open_database
from provisioning.core.web import BodyLimitMiddleware, install_error_handlers
from provisioning.ops_keeper.metrics import Metrics
from provisioning.ops_keeper.policy import PolicyFile, watch
from provisioning.ops_keeper.routes import build_router
from provisioning.ops_keeper.service import KeeperService
from provisioning.ops_keeper.store import KeeperStore
from provisioning.ops_keeper.tables import audit_outbox

__all__ = ["OpsKeeperService", "policy_path"]

log = get_logger("ops_keeper")

#: Params are at most 64 KiB of JSON; the rest of a request is small.
MAX_BODY_BYTES = 256 * 1024


def policy_path(settings: Settings) -> Path:
    """Where the keeper's policy file is: ``ops_keeper.policy_file`` (relative to the data
    dir), or ``<home>/config/keeper_policy.ncl``."""
    return settings.data_path(settings.ops_keeper.policy_file, "config/keeper_policy.ncl")


def _decision_route(method: str, path: str) -> bool:
    """Routes whose success is audited as a decision on ``ops.audit`` (service.py)."""
    if method == "POST":
        return path == "/ops" or path == "/ops/freeze" or path.endswith(("/approve", "/reject"))
    return method == "DELETE" and path.startswith("/ops/freeze/")


class OpsKeeperService:
    """The ops-keeper as one unit the platform supervisor (or a test) starts and stops.

    ``guard``: the embedded platform's (the control center's identity); without one, a
    standalone guard whose audit events go through an outbox to the control center. ``db``: a
    shared store (not closed on stop). ``bus``: a connected bus (not closed on stop); without
    one, the keeper connects to ``nats`` itself, retrying in the background while it is down.
    """

    name = "ops-keeper"

    def __init__(
        self,
        settings: Settings,
        *,
        guard: Guard | None = None,
        db: Database | None = None,
        bus: Bus | None = None,
        retry_interval_s: float = 2.0,
    ) -> None:
        self.settings = settings
        self._own_db = db is None
        self.db: Database = db or open_database(
            settings.state_url, sqlite_synchronous=settings.state.sqlite_synchronous
        )
        self.audit_relay: AuditRelay | None = None
        if guard is None:
            # Cannot be disabled: the keeper signs operations.
            guard = standalone_guard(settings, outbox_hook(self.db, audit_outbox, self.name))
            key = settings.control_center.service_api_key
            sender = HttpAuditSender(settings.control_center_url, key) if key else None
            self.audit_relay = AuditRelay(self.db, audit_outbox, sender)
        self.guard = guard
        self.ring = KeyRing(settings.home / "keys" / "ops-keeper")
        self.store = KeeperStore(self.db)
        self._own_bus = bus is None
        self.service = KeeperService(
            self.store,
            self.ring,
            settings.ops_keeper,
            bus=bus,
            connect_bus=self._connect_bus,
            retry_interval_s=retry_interval_s,
        )
        self.metrics = Metrics(self.service)
        self.policy_path = policy_path(settings)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.app = self._build_app()

    @property
    def host(self) -> str:
        return self.settings.ops_keeper.host

    @property
    def port(self) -> int:
        return self.settings.ops_keeper.port

    def _build_app(self) -> FastAPI:
        app = FastAPI(
            title="Provisioning ops-keeper",
            version=__version__,
            description="The policy gate of operations: decisions by policy and change "
            "freezes, manual approvals, signed operation tokens published to NATS, and the "
            "JWKS that verifies them. Answers use the `{success, data}` envelope.",
        )
        install_error_handlers(app)
        app.include_router(build_router(self.service, self.metrics, self.guard, time.monotonic()))
        install_mutation_audit(app, self.guard, self.name, self_audited=_decision_route)
        app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
        return app

    async def _connect_bus(self, timeout_s: float = 5.0) -> Bus:
        from provisioning.core.bus.nats import connect_bus

        return await connect_bus(self.settings, name="prvng-ops-keeper", timeout_s=timeout_s)

    def background_tasks(self) -> list[asyncio.Task[None]]:
        """The policy watch and the publisher, for the supervisor."""
        return list(self._tasks)

    async def start(self) -> None:
        """Migrate, load or create the signing key, load (or write) the policy, connect NATS
        (or keep trying in the background), start the policy watch and the publisher.

        Raises:
            ConfigError: the key directory or a key file is unsafe or corrupt.
            NickelError, ValidationError: the policy file is broken (no last good one yet).
        """
        await self.store.migrate()
        await asyncio.to_thread(self.ring.load_or_create)
        policy = await asyncio.to_thread(PolicyFile.with_default, self.policy_path)
        self.service.policy_file = policy
        self._warn_short_overlap(policy)
        if self._own_bus:
            try:  # briefly: the publisher keeps trying in the background
                self.service.bus = await self._connect_bus(timeout_s=1.0)
            except Exception as exc:  # NATS down: decisions go on; publishing waits for it
                log.warning(
                    "NATS not reachable; approved operations wait until it is",
                    extra={"error": str(exc)},
                )
        self._stop.clear()
        interval = self.settings.ops_keeper.reload_interval_s
        self._tasks = [
            asyncio.create_task(watch(policy, interval, self._stop), name="keeper-policy-watch"),
            asyncio.create_task(self.service.run_publisher(self._stop), name="keeper-publisher"),
        ]
        if self.audit_relay is not None:
            self.audit_relay.start()

    def _warn_short_overlap(self, policy: PolicyFile) -> None:
        longest = max((p.token_ttl_s for p in policy.current.policies), default=0)
        overlap = self.settings.ops_keeper.key_overlap_s
        if overlap < longest:
            log.warning(
                "ops_keeper.key_overlap_s is shorter than the longest token_ttl_s of the "
                "policy: tokens signed just before a key rotation may fail to verify",
                extra={"key_overlap_s": overlap, "token_ttl_s": longest},
            )

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            # A turn stuck on an unreachable NATS is cancelled: its rows stay approved.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, timeout=3)
        self._tasks = []
        if self.audit_relay is not None:
            await self.audit_relay.stop()
        if self._own_bus and self.service.bus is not None:
            bus, self.service.bus = self.service.bus, None
            await bus.close()
        if self._own_db:
            await self.db.close()
