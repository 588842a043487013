"""Fixtures shared by every test: backends (SQLite, PostgreSQL), services, free ports.

PostgreSQL runs on 127.0.0.1:5432 (``scripts/ensure-services.sh`` starts it); each test that
asks for it gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioning.core.auth import Guard
from provisioning.core.rbac import Authorizer
from provisioning.core.settings import Settings, load_settings
from provisioning.orchestrator.app import OrchestratorService

PG_ADMIN_DSN = os.environ.get("PRVNG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TERMINAL = {"Completed", "Failed", "Cancelled", "RolledBack"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


def _pg_admin(sql: str) -> None:
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test (user-facing ``postgresql://`` URL)."""
    name = f"prvng_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store-backed test body runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("pg_url"))


def open_guard() -> Guard:
    """Authentication off: for tests of the engine and API semantics, not of access control."""
    return Guard(None, Authorizer())


def make_settings(home: Path, state_url: str = "", **orchestrator: Any) -> Settings:
    """Settings for tests: fast polling and leases, a free port, no environment."""
    orch = {"poll_interval_s": 0.05, "lease_s": 3.0, "kill_grace_s": 1.0, "port": free_port()}
    orch.update(orchestrator)
    return load_settings(
        home=home,
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
            "orchestrator": orch,
        },
    )


@pytest.fixture
async def make_service(tmp_path: Path, state_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Start an in-process orchestrator on the parametrised backend: ``await make_service(**o)``."""
    started: list[OrchestratorService] = []

    async def factory(worker_id: str = "test-worker", **orchestrator: Any) -> OrchestratorService:
        svc = OrchestratorService(
            make_settings(tmp_path / "home", state_url, **orchestrator),
            worker_id=worker_id,
            guard=open_guard(),
        )
        await svc.start()
        started.append(svc)
        return svc

    yield factory
    for svc in reversed(started):
        await svc.stop(kill_running=True)


async def wait_workflow(
    svc: OrchestratorService, wf_id: str, statuses: set[str] | None = None, timeout: float = 30.0
) -> dict[str, Any]:
    """Poll the store until the workflow reaches one of ``statuses`` (default: any end state)."""
    want = statuses or TERMINAL
    deadline = time.monotonic() + timeout
    while True:
        doc = await svc.store.get_workflow(wf_id)
        if doc["status"] in want:
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"workflow {wf_id} still {doc['status']} after {timeout}s: {doc}")
        await asyncio.sleep(0.02)


def tasks_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in doc["tasks"]}
