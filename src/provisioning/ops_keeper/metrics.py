"""Prometheus metrics of the ops-keeper: operations by state, decisions, publishing, audit."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from provisioning.ops_keeper.service import KeeperService

__all__ = ["Metrics"]


class Metrics:
    """One registry per service instance (tests run several in one process)."""

    def __init__(self, service: KeeperService) -> None:
        self.service = service
        self.registry = r = CollectorRegistry()
        self.ops = Gauge("prvng_keeper_ops", "Operations by state.", ["state"], registry=r)
        self.decisions = Gauge(
            "prvng_keeper_decisions", "Decisions since start, by kind.", ["decision"], registry=r
        )
        self.published = Gauge(
            "prvng_keeper_published", "Operations published since start.", registry=r
        )
        self.duplicates = Gauge(
            "prvng_keeper_publish_duplicates",
            "Publications JetStream dropped as duplicates since start.",
            registry=r,
        )
        self.failures = Gauge(
            "prvng_keeper_publish_failures", "Failed publication tries since start.", registry=r
        )
        self.expired = Gauge("prvng_keeper_expired", "Operations expired since start.", registry=r)
        self.audit_outbox = Gauge(
            "prvng_keeper_audit_outbox",
            "Audit events waiting to be published on ops.audit.> (grows while NATS is down).",
            registry=r,
        )
        self.audit_published = Gauge(
            "prvng_keeper_audit_published",
            "Audit events published on ops.audit.> since start.",
            registry=r,
        )
        self.audit_failures = Gauge(
            "prvng_keeper_audit_failures",
            "Failed tries to relay the audit outbox since start.",
            registry=r,
        )
        self.policy_broken = Gauge(
            "prvng_keeper_policy_file_broken",
            "1 while the policy file on disk does not load (the last good policy is in force).",
            registry=r,
        )

    async def refresh(self) -> None:
        svc, stats = self.service, self.service.stats
        self.ops.clear()
        for state, n in (await svc.store.state_counts()).items():
            self.ops.labels(state=state).set(n)
        for decision, n in stats.decisions.items():
            self.decisions.labels(decision=decision).set(n)
        self.published.set(stats.published)
        self.duplicates.set(stats.duplicates)
        self.failures.set(stats.publish_failures)
        self.expired.set(stats.expired)
        self.audit_outbox.set(await svc.store.audit_backlog())
        self.audit_published.set(stats.audit_published)
        self.audit_failures.set(stats.audit_failures)
        broken = svc.policy_file is not None and svc.policy_file.last_error is not None
        self.policy_broken.set(1 if broken else 0)
