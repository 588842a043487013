"""Workers on one PostgreSQL database tell each other when work is ready (LISTEN/NOTIFY), so
a second worker helps at once instead of at its next poll; and the listening connection comes
back after PostgreSQL drops it. PostgreSQL only: SQLite has one worker per file, which polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from provisioning.core.store.postgres import PostgresDatabase
from provisioning.orchestrator.api import WorkflowSpec
from provisioning.orchestrator.app import OrchestratorService
from tests.conftest import make_settings, open_guard, tasks_by_name, wait_workflow
from tests.helpers import until

pytestmark = pytest.mark.timeout(60)

POLL_S = 30.0  # far longer than any wait below: a worker that only polled would fail them
WAIT_FOR_GATE = 'i=0; while [ ! -f "$GATE" ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done'


@pytest.fixture
async def workers(tmp_path: Path, pg_url: str) -> AsyncIterator[Callable[..., Any]]:
    started: list[OrchestratorService] = []

    async def start(worker_id: str, **orchestrator: Any) -> OrchestratorService:
        settings = make_settings(
            tmp_path / worker_id, pg_url, poll_interval_s=POLL_S, **orchestrator
        )
        svc = OrchestratorService(settings, worker_id=worker_id, guard=open_guard())
        await svc.start()
        started.append(svc)
        return svc

    yield start
    for svc in reversed(started):
        await svc.stop(kill_running=True)


async def test_a_workflow_submitted_to_one_worker_is_taken_up_by_the_other_at_once(
    workers: Callable[..., Any], tmp_path: Path
) -> None:
    a = await workers("worker-a", max_parallel=1)
    await workers("worker-b", max_parallel=1)
    gate = tmp_path / "gate"
    spec = WorkflowSpec.model_validate(
        {
            "name": "two-at-once",
            "tasks": [
                {"name": n, "command": ["sh", "-c", WAIT_FOR_GATE], "env": {"GATE": str(gate)}}
                for n in ("one", "two")
            ],
        }
    )
    # Both workers made their first turn at start and found nothing; the next poll is 30 s
    # away. Worker a takes one task; b only learns of the other by a's notification.
    await asyncio.sleep(0.5)
    wf_id, _ = await a.engine.submit(spec)

    async def both_running() -> bool:
        doc = await a.store.get_workflow(wf_id)
        return all(t["status"] == "Running" for t in tasks_by_name(doc).values())

    await until("both tasks running, one on each worker", both_running, 15)
    doc = await a.store.get_workflow(wf_id)
    ran_on = {t["attempts"][0]["worker"] for t in tasks_by_name(doc).values()}
    assert ran_on == {"worker-a", "worker-b"}
    gate.touch()
    assert (await wait_workflow(a, wf_id))["status"] == "Completed"


async def test_the_listening_connection_comes_back_after_postgresql_drops_it(pg_url: str) -> None:
    db = PostgresDatabase(pg_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    heard: list[str] = []
    listening = asyncio.create_task(db.listen("prvng_test_channel", heard.append))
    admin = await asyncpg.connect(pg_url)
    try:

        async def notify_until_heard(payload: str) -> bool:
            await admin.execute("SELECT pg_notify('prvng_test_channel', $1)", payload)
            await asyncio.sleep(0.05)
            return payload in heard

        await until("the first notification", lambda: notify_until_heard("first"), 15)
        dropped = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'prvng-listen prvng_test_channel'"
        )
        assert dropped == 1
        await until("a notification after the drop", lambda: notify_until_heard("after"), 15)
        assert not listening.done()  # it reconnected; it never ends on its own
    finally:
        listening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listening
        await admin.close()
        await db.close()
