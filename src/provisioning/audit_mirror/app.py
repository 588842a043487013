"""The audit-mirror service: a durable pull consumer (``audit-mirror``) on ``ops.audit.>`` that
commits each fetched batch with :class:`~provisioning.audit_mirror.mirror.GitMirror`, acks only
after :meth:`~GitMirror.mirror` returned (the commits are on disk), then pushes to the
configured remotes. Health and metrics on port 8086.

* An event that can never be mirrored (not JSON, no usable ``id``/``ts``) is terminated with a
  log line naming what is wrong; the rest of its batch is committed.
* Writing failed (disk full, git broken): nothing of the batch is acked; it is redelivered after
  a growing delay, and the index makes the retry skip what did reach the ref.
* A push that fails is logged and retried after the next batch (or every ``publish_retry_s``
  while idle); local commits stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from provisioning import __version__
from provisioning.audit_mirror.mirror import ALREADY_MIRRORED, GitMirror, check_event
from provisioning.core.aio import reraise_if_cancelling
from provisioning.core.bus import Bus, Delivery
from provisioning.core.bus.link import BusLink
from provisioning.core.errors import ProvisioningError
from provisioning.core.logging import get_logger
from provisioning.core.settings import Settings
from provisioning.core.web import health_app

__all__ = ["AuditMirrorService", "mirror_paths"]

log = get_logger("audit_mirror")


def mirror_paths(settings: Settings) -> tuple[Path, Path]:
    """The repository and the state dir ``audit_mirror`` settings name."""
    a = settings.audit_mirror
    return (
        settings.data_path(a.repo, "audit-mirror/repo.git"),
        settings.data_path(a.state_dir, "audit-mirror/state"),
    )


class AuditMirrorService:
    """The audit-mirror as one unit the platform supervisor (or a test) starts and stops.

    ``bus``: a connected bus (not closed on stop); without one the service connects to
    ``nats`` itself, retrying while it is down.
    """

    name = "audit-mirror"

    def __init__(
        self,
        settings: Settings,
        *,
        bus: Bus | None = None,
        retry_interval_s: float = 1.0,
        publish_retry_s: float = 30.0,
    ) -> None:
        self.settings = settings
        repo, state_dir = mirror_paths(settings)
        self.mirror = GitMirror(repo, state_dir, remotes=settings.audit_mirror.remotes)
        self.link = BusLink(
            settings, name="prvng-audit-mirror", bus=bus, retry_interval_s=retry_interval_s
        )
        self.retry_interval_s = retry_interval_s
        self.publish_retry_s = publish_retry_s
        self.committed = 0
        self.duplicates = 0
        self.rejected = 0
        self.failures = 0
        self.batches = 0
        self.last_commit_at: float | None = None
        self.error: str | None = None
        self.publish_state: dict[str, dict[str, Any]] = {}
        self._publish_due = False
        self._last_publish = 0.0
        self._started = time.monotonic()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.metrics = _Metrics(self)
        self.app = self._build_app()

    @property
    def host(self) -> str:
        return self.settings.audit_mirror.host

    @property
    def port(self) -> int:
        return self.settings.audit_mirror.port

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def last_error(self) -> str | None:
        return self.error or self.link.last_error

    def _build_app(self) -> FastAPI:
        return health_app(
            title="Provisioning audit-mirror",
            version=__version__,
            description="Commits every ops audit event to a git repository, one SSH-signed "
            "commit each, and pushes it to the configured remotes. Only health and metrics "
            "are served here; `prvng audit verify --repo` checks the repository.",
            status=self.status,
            metrics=self._metrics_text,
            health_summary="Liveness, NATS, repository head, remotes",
        )

    async def _metrics_text(self) -> bytes:
        self.metrics.refresh()
        return generate_latest(self.metrics.registry)

    def status(self) -> dict[str, Any]:
        m = self.mirror
        return {
            "status": "ok",
            "service": self.name,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "nats": "connected" if self.connected else "not connected",
            "repo": str(m.repo),
            "head": m.head,
            "events": m.count,
            "committed_since_start": self.committed,
            "rejected_since_start": self.rejected,
            "remotes": self.publish_state,
            "last_error": self.last_error,
        }

    def background_tasks(self) -> list[asyncio.Task[None]]:
        """The consumer loop, for the supervisor (one ending with an exception is a crash)."""
        return [self._task] if self._task is not None else []

    async def start(self) -> None:
        """Open the repository (initialising what is missing, reconciling the index) and start
        consuming.

        Raises:
            ConfigError, OperationFailed: the key or repository is unusable, another mirror
                holds the state dir, or the history no longer matches the checkpoint.
        """
        await asyncio.to_thread(self.mirror.open)
        self._stop.clear()
        self._started = time.monotonic()
        self._publish_due = bool(self.mirror.remotes)
        self._task = asyncio.create_task(self._run(), name="audit-mirror")

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _run(self) -> None:
        if not await self.link.wait_connected(self._stop):
            return
        backoff = self.retry_interval_s
        consumer = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = await self.link.consumer("OPS_AUDIT", "audit-mirror")
                deliveries = await consumer.fetch(self.settings.audit_mirror.batch, timeout_s=1.0)
                if deliveries:
                    await self.handle(deliveries)
                await self._maybe_publish()
                backoff, self.error = self.retry_interval_s, None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS, git or the disk: unacked events come back
                self.failures += 1
                self.error = str(exc)[:500]
                log.warning("audit-mirror batch failed; retrying", extra={"error": str(exc)})
                await self._wait(backoff)
                backoff = min(backoff * 2, 30.0)

    async def handle(self, deliveries: list[Delivery]) -> None:
        """Commit the valid events of one fetch (one pack, one ref update), then ack each.

        Raises:
            OperationFailed: the commit failed; nothing was acked.
        """
        good: list[tuple[Delivery, dict[str, Any]]] = []
        for d in deliveries:
            try:
                event = json.loads(d.data)
                check_event(event)
            except (ValueError, ProvisioningError) as exc:
                self.rejected += 1
                log.warning(
                    "audit event cannot be mirrored; terminated",
                    extra={"subject": d.subject, "seq": d.stream_seq, "error": str(exc)[:300]},
                )
                await d.term()
                continue
            good.append((d, event))
        if not good:
            return
        if not self.mirror.is_open:
            await asyncio.to_thread(self.mirror.open)  # closed itself after a failed recovery
        results = await asyncio.to_thread(self.mirror.mirror, [e for _, e in good])
        new = sum(1 for r in results if r != ALREADY_MIRRORED)
        self.committed += new
        self.duplicates += len(results) - new
        self.batches += 1
        if new:
            self.last_commit_at = time.time()
            self._publish_due = bool(self.mirror.remotes)
        for d, _ in good:
            await d.ack()

    async def _maybe_publish(self) -> None:
        if not self.mirror.remotes:
            return
        idle_retry = time.monotonic() - self._last_publish >= self.publish_retry_s
        failing = any(not s["ok"] for s in self.publish_state.values())
        if not (self._publish_due or (failing and idle_retry)):
            return
        self._publish_due = False
        self._last_publish = time.monotonic()
        for result in await asyncio.to_thread(self.mirror.publish):
            self.publish_state[result.remote] = {
                "ok": result.ok,
                "skipped": result.skipped,
                "at": time.time(),
                "message": result.message[-300:],
            }

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=30)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            except asyncio.CancelledError:  # the loop had been cancelled: stopping goes on
                reraise_if_cancelling()
            self._task = None
        await asyncio.to_thread(self.mirror.close)
        await self.link.close()


class _Metrics:
    def __init__(self, service: AuditMirrorService) -> None:
        self.service = service
        self.registry = r = CollectorRegistry()
        self.events = Gauge("prvng_audit_mirror_events", "Events in the repository.", registry=r)
        self.committed = Gauge(
            "prvng_audit_mirror_committed", "Events committed since start.", registry=r
        )
        self.rejected = Gauge(
            "prvng_audit_mirror_rejected", "Events terminated as unmirrorable.", registry=r
        )
        self.failures = Gauge(
            "prvng_audit_mirror_failures", "Batches that failed and were retried.", registry=r
        )
        self.last_commit = Gauge(
            "prvng_audit_mirror_last_commit_timestamp",
            "Unix time of the last commit (0: none since start).",
            registry=r,
        )
        self.remote_ok = Gauge(
            "prvng_audit_mirror_remote_ok",
            "1 when the last push to the remote succeeded.",
            ["remote"],
            registry=r,
        )
        self.connected = Gauge(
            "prvng_audit_mirror_nats_connected", "1 while connected to NATS.", registry=r
        )

    def refresh(self) -> None:
        svc = self.service
        self.events.set(svc.mirror.count)
        self.committed.set(svc.committed)
        self.rejected.set(svc.rejected)
        self.failures.set(svc.failures)
        self.last_commit.set(svc.last_commit_at or 0)
        for remote, state in svc.publish_state.items():
            self.remote_ok.labels(remote=remote).set(1 if state["ok"] else 0)
        self.connected.set(1 if svc.connected else 0)
