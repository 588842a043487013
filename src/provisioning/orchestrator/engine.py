"""The scheduler: claims ready work from the store, runs it, records how it ended.

One loop per worker. Each turn it (1) records the results of attempts that ended since the last
turn in one transaction, (2) claims as many ready tasks as its limits allow in another, and
(3) starts them. A second loop renews the leases of running tasks, notices cancellations made
by other workers, and recovers tasks whose worker died. Nothing lives only in memory: a killed
worker's tasks are found again from the store (see :meth:`Engine.start`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from provisioning.core.clock import utcnow
from provisioning.core.logging import get_logger
from provisioning.core.settings import OrchestratorSettings
from provisioning.orchestrator.api import WorkflowSpec
from provisioning.orchestrator.dag import validate_dag
from provisioning.orchestrator.runner import AttemptRunner, kill_orphan
from provisioning.orchestrator.store import Claim, Limits, Result, WorkflowStore

__all__ = ["Engine", "EngineStats"]

log = get_logger("orchestrator.engine")


@dataclass
class EngineStats:
    """Counters the metrics endpoint reads."""

    durations: list[tuple[str, float]] = field(default_factory=list)  # (outcome, seconds)
    started: int = 0
    loop_errors: int = 0


class Engine:
    """Runs workflows from a :class:`WorkflowStore` (see module docstring)."""

    def __init__(
        self,
        store: WorkflowStore,
        settings: OrchestratorSettings,
        logs_dir: Path,
        *,
        worker_id: str | None = None,
        task_env: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.logs_dir = logs_dir
        self.worker_id = worker_id or settings.worker_id or _random_worker_id()
        self.stats = EngineStats()
        self._runner = AttemptRunner(
            kill_grace_s=settings.kill_grace_s,
            on_pid=self._note_pid,
            notify_log=self._notify_log,
            base_env=task_env,
        )
        self._wake = asyncio.Event()
        self._results: list[Result] = []
        self._pids: list[tuple[str, int]] = []
        self._running: dict[str, asyncio.Task[None]] = {}
        self._claims: dict[str, Claim] = {}
        self._started_at: dict[str, float] = {}
        self._followers: dict[str, set[asyncio.Event]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self._bg: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, recover_own: bool = True) -> None:
        """Recover what a previous life of this worker left, then start scheduling.

        ``recover_own``: tasks leased to this worker id are taken back at once (a restarted
        worker knows its old self is dead); other workers' tasks wait for their lease to expire.
        """
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        await self._recover(own=recover_own)
        await self.store.settle(await self.store.unsettled())
        self._stopping = False
        self._loops = [
            asyncio.create_task(self._schedule_loop(), name="orchestrator-scheduler"),
            asyncio.create_task(self._lease_loop(), name="orchestrator-leases"),
        ]
        if self.store.notifies:  # other workers say when work is ready (PostgreSQL)
            self._loops.append(
                asyncio.create_task(
                    self.store.listen_for_work(self._heard_of_work), name="orchestrator-listen"
                )
            )
        log.info("engine started", extra={"worker": self.worker_id})

    def loops(self) -> list[asyncio.Task[None]]:
        """The scheduler, lease (and, on PostgreSQL, notification) loops while started (each
        runs until :meth:`stop`)."""
        return list(self._loops)

    async def stop(self, *, kill_running: bool = False) -> None:
        """Stop scheduling. Running attempts are left to finish and be recovered on the next
        start, unless ``kill_running`` (used by tests) terminates them and records the result."""
        self._stopping = True
        self._wake.set()
        for t in self._loops:
            t.cancel()
        for t in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._loops = []
        if kill_running:
            for task_id in list(self._running):
                await self._runner.cancel(task_id)
            if self._running:
                await asyncio.wait(list(self._running.values()), timeout=30)
            with contextlib.suppress(Exception):
                await self._flush()
        else:
            for t in self._running.values():
                t.cancel()

    @property
    def running_count(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------ commands

    async def submit(self, spec: WorkflowSpec, owner: str | None = None) -> tuple[str, bool]:
        """Validate and store a workflow; return ``(id, created)``.

        Raises:
            DagError, LimitExceeded: the workflow is not a valid DAG or is too large.
        """
        topo = validate_dag(spec, self.settings.max_tasks)
        wf_id, created = await self.store.submit(spec, topo, owner)
        if created:
            self.wake()
        return wf_id, created

    async def cancel(self, workflow_id: str) -> None:
        await self.store.cancel(workflow_id)
        for task_id, claim in list(self._claims.items()):
            if claim.workflow_id == workflow_id:
                self._background(self._runner.cancel(task_id))
        self.wake()

    async def pause(self, workflow_id: str) -> None:
        await self.store.pause(workflow_id)

    async def resume(self, workflow_id: str) -> None:
        await self.store.resume(workflow_id)
        self.wake()

    async def retry(self, workflow_id: str) -> int:
        n = await self.store.retry(workflow_id)
        self.wake()
        return n

    async def rollback(self, workflow_id: str) -> None:
        await self.store.rollback(workflow_id)
        self.wake()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        # Signalling a process group may wait out the kill grace: never block the caller.
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def wake(self) -> None:
        """Make the scheduler look for work now."""
        self._wake.set()

    def _heard_of_work(self) -> None:
        # Another worker has ready tasks it cannot take (or a workflow was submitted there):
        # look now rather than at the next poll, unless every slot here is busy anyway.
        if len(self._running) < self.settings.max_parallel:
            self._wake.set()

    # ------------------------------------------------------------------ log following

    def log_listener(self, task_id: str) -> asyncio.Event:
        """An event set whenever the task's log grows (in this process)."""
        ev = asyncio.Event()
        self._followers.setdefault(task_id, set()).add(ev)
        return ev

    def drop_listener(self, task_id: str, ev: asyncio.Event) -> None:
        evs = self._followers.get(task_id)
        if evs is not None:
            evs.discard(ev)
            if not evs:
                self._followers.pop(task_id, None)

    def _notify_log(self, task_id: str) -> None:
        for ev in self._followers.get(task_id, ()):
            ev.set()

    # ------------------------------------------------------------------ loops

    async def _schedule_loop(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                next_at = await self._turn()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats.loop_errors += 1
                log.exception("scheduler turn failed; retrying", extra={"delay_s": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            timeout = self.settings.poll_interval_s
            if next_at is not None:
                timeout = max(0.0, min(timeout, (next_at - utcnow()).total_seconds()))
            if not self._wake.is_set() and timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)

    async def _turn(self) -> datetime | None:
        self._wake.clear()
        results, self._results = self._results, []
        pids, self._pids = self._pids, []
        # The results taken here are recorded before the claim, in the same transaction, so
        # their slots are free; attempts ending meanwhile are still in _running or _results
        # and keep theirs (the store counts them Running until recorded).
        free = self.settings.max_parallel - len(self._running)
        limits = Limits(
            free_slots=free,
            key_limits=self.settings.concurrency_limits,
            default_key_limit=self.settings.default_key_limit,
        )
        try:
            claims, next_at = await self.store.turn(
                results, pids, self.worker_id, limits, self.settings.lease_s, self.logs_dir
            )
        except BaseException:
            self._results[:0] = results
            self._pids[:0] = pids
            raise
        for res in results:
            self._claims.pop(res.task_id, None)
        for claim in claims:
            self._launch(claim)
        return next_at

    async def _flush(self) -> None:
        results, self._results = self._results, []
        pids, self._pids = self._pids, []
        try:
            await self.store.finish(results, self.worker_id, pids)
        except BaseException:
            self._results[:0] = results
            self._pids[:0] = pids
            raise
        for res in results:
            self._claims.pop(res.task_id, None)

    def _launch(self, claim: Claim) -> None:
        self.stats.started += 1
        self._claims[claim.task_id] = claim
        self._started_at[claim.task_id] = time.monotonic()
        task = asyncio.create_task(self._run(claim), name=f"attempt-{claim.task_id}")
        self._running[claim.task_id] = task

    async def _run(self, claim: Claim) -> None:
        try:
            result = await self._runner.run(claim)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("attempt crashed", extra={"task_id": claim.task_id})
            result = Result(
                claim.task_id, claim.attempt, claim.phase, ok=False, error=f"internal: {exc}"
            )
        finally:
            self._running.pop(claim.task_id, None)
        started = self._started_at.pop(claim.task_id, time.monotonic())
        self.stats.durations.append(("ok" if result.ok else "failed", time.monotonic() - started))
        if len(self.stats.durations) > 10000:
            del self.stats.durations[:5000]
        self._results.append(result)
        self._wake.set()

    def _note_pid(self, claim: Claim, pid: int) -> None:
        self._pids.append((claim.attempt_id, pid))

    async def _lease_loop(self) -> None:
        interval = max(0.05, self.settings.lease_s / 3)
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                running = list(self._running)
                await self.store.renew_leases(self.worker_id, running, self.settings.lease_s)
                for task_id in await self.store.cancelling(running):
                    self._background(self._runner.cancel(task_id))
                if await self._recover(own=False):
                    self.wake()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lease upkeep failed; retrying")

    async def _recover(self, *, own: bool) -> bool:
        rows = await self.store.orphaned(self.worker_id, own=own, exclude=self._running)
        if not rows:
            return False
        for r in rows:
            if kill_orphan(r.pid, r.attempt_id):
                log.warning("killed orphaned attempt", extra={"task_id": r.id, "pid": r.pid})
        touched = await self.store.recover(rows)
        log.warning(
            "recovered lost attempts",
            extra={"tasks": len(rows), "workflows": len(touched), "worker": self.worker_id},
        )
        return True


def _random_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
