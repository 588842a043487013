"""Prometheus metrics of the orchestrator: tasks by state, queue depth, task durations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram

from provisioning.orchestrator.engine import Engine

__all__ = ["Metrics"]


class Metrics:
    """One registry per service instance (tests run several in one process)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.tasks = Gauge("prvng_tasks", "Tasks by status.", ["status"], registry=self.registry)
        self.workflows = Gauge(
            "prvng_workflows", "Workflows by status.", ["status"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "prvng_queue_depth", "Tasks Ready and waiting for a worker.", registry=self.registry
        )
        self.running = Gauge(
            "prvng_worker_running_tasks", "Attempts this worker runs now.", registry=self.registry
        )
        self.duration = Histogram(
            "prvng_task_duration_seconds",
            "Duration of task attempts run by this worker.",
            ["outcome"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
            registry=self.registry,
        )
        self.loop_errors = Gauge(
            "prvng_scheduler_errors", "Scheduler turns that failed.", registry=self.registry
        )

    async def refresh(self) -> None:
        """Read the store's counts and drain the engine's finished-attempt durations."""
        by_task, by_wf = await self.engine.store.status_counts()
        self.tasks.clear()
        for status, n in by_task.items():
            self.tasks.labels(status=status).set(n)
        self.workflows.clear()
        for status, n in by_wf.items():
            self.workflows.labels(status=status).set(n)
        self.queue_depth.set(by_task.get("Ready", 0))
        self.running.set(self.engine.running_count)
        self.loop_errors.set(self.engine.stats.loop_errors)
        durations, self.engine.stats.durations = self.engine.stats.durations, []
        for outcome, seconds in durations:
            self.duration.labels(outcome=outcome).observe(seconds)
