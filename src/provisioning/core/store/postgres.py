"""PostgreSQL implementation of the state store (asyncpg), for the distributed mode.

Several processes share one database; row claims use ``FOR UPDATE SKIP LOCKED`` in the services'
own queries, and short critical sections use transaction-scoped advisory locks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

__all__ = ["PostgresDatabase"]


class PostgresDatabase:
    """The state store on PostgreSQL (see :mod:`provisioning.core.store.base`)."""

    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine = create_async_engine(
            url, pool_size=8, max_overflow=8, pool_pre_ping=True
        )

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    async def close(self) -> None:
        await self.engine.dispose()
