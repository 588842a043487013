"""The Database seam's contract, one body run on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select, update
from sqlalchemy.engine import Connection

from provisioning.core.store import Database, open_database, to_async_url
from provisioning.orchestrator.store import WorkflowStore

meta = MetaData()
counter = Table(
    "contract_counter",
    meta,
    Column("id", Integer, primary_key=True),
    Column("n", Integer, nullable=False),
    Column("note", String(50)),
)


@pytest.fixture
async def db(state_url: str) -> AsyncIterator[Database]:
    database = open_database(to_async_url(state_url), sqlite_synchronous="FULL")
    await database.run_write(lambda c: meta.create_all(c))
    await database.run_write(lambda c: c.execute(counter.insert().values(id=1, n=0)))
    yield database
    await database.close()


def _read_n(conn: Connection) -> int:
    return int(conn.execute(select(counter.c.n).where(counter.c.id == 1)).scalar_one())


async def test_a_committed_write_is_seen_by_later_reads(db: Database) -> None:
    await db.run_write(lambda c: c.execute(update(counter).values(n=5)))
    assert await db.run_read(_read_n) == 5


async def test_a_failing_transaction_leaves_nothing_behind_and_raises(db: Database) -> None:
    def boom(conn: Connection) -> None:
        conn.execute(update(counter).values(n=99, note="half-done"))
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        await db.run_write(boom)
    assert await db.run_read(_read_n) == 0


async def test_concurrent_read_modify_write_transactions_do_not_lose_updates(db: Database) -> None:
    def increment(conn: Connection) -> None:
        if db.dialect == "postgresql":
            conn.execute(select(counter).where(counter.c.id == 1).with_for_update())
        n = _read_n(conn)
        conn.execute(update(counter).values(n=n + 1))

    await asyncio.gather(*(db.run_write(increment) for _ in range(40)))
    assert await db.run_read(_read_n) == 40


async def test_writes_survive_closing_and_reopening_the_store(state_url: str) -> None:
    first = open_database(to_async_url(state_url))
    await first.run_write(lambda c: meta.create_all(c))
    await first.run_write(lambda c: c.execute(counter.insert().values(id=7, n=3)))
    await first.close()
    second = open_database(to_async_url(state_url))
    try:
        n = await second.run_read(
            lambda c: c.execute(select(counter.c.n).where(counter.c.id == 7)).scalar_one()
        )
    finally:
        await second.close()
    assert n == 3


async def test_a_closed_store_works_again_when_used(db: Database) -> None:
    """A service restarted by the supervisor (stop, then start) uses the store it closed."""
    await db.run_write(lambda c: c.execute(update(counter).values(n=1)))
    await db.close()
    await db.run_write(lambda c: c.execute(update(counter).values(n=2)))
    assert await db.run_read(_read_n) == 2
    await db.close()
    await db.close()  # twice in a row: harmless
    assert await db.run_read(_read_n) == 2


async def test_the_dialect_names_the_backend(db: Database, state_url: str) -> None:
    assert db.dialect == ("sqlite" if state_url.startswith("sqlite") else "postgresql")


async def test_migrations_are_idempotent_and_concurrent_starts_are_safe(state_url: str) -> None:
    dbs = [open_database(to_async_url(state_url)) for _ in range(2)]
    try:
        await asyncio.gather(*(WorkflowStore(d).migrate() for d in dbs))
        await WorkflowStore(dbs[0]).migrate()
        assert await WorkflowStore(dbs[1]).list_workflows() == []
    finally:
        for d in dbs:
            await d.close()
