"""PostgreSQL implementation of the state store (asyncpg), for the distributed mode.

Transaction functions run through SQLAlchemy's async engine (``run_sync``: statements are
awaited on the event loop, no thread). Several processes share one database; row claims use
``FOR UPDATE SKIP LOCKED`` in the services' own statements, and short critical sections use
transaction-scoped advisory locks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = ["PostgresDatabase"]

T = TypeVar("T")


class PostgresDatabase:
    """The state store on PostgreSQL (see :mod:`provisioning.core.store.base`)."""

    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine = create_async_engine(
            url, pool_size=8, max_overflow=8, pool_pre_ping=True
        )

    async def run_write(self, fn: Callable[[Connection], T]) -> T:
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn)

    async def run_read(self, fn: Callable[[Connection], T]) -> T:
        async with self.engine.connect() as conn:
            return await conn.run_sync(fn)

    async def close(self) -> None:
        await self.engine.dispose()
