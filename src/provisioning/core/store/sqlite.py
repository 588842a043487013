"""SQLite implementation of the state store: WAL mode, one writer at a time.

Writes take an in-process lock and ``BEGIN IMMEDIATE`` so a read-then-write transaction never
fails to upgrade its lock; other processes wait up to ``busy_timeout``.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

__all__ = ["SqliteDatabase"]

_WRITE = contextvars.ContextVar("prvng_sqlite_write", default=False)


class SqliteDatabase:
    """The state store on one SQLite file (see :mod:`provisioning.core.store.base`)."""

    dialect = "sqlite"

    def __init__(self, url: str, *, synchronous: str = "FULL") -> None:
        self.url = url
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(
            url, poolclass=AsyncAdaptedQueuePool, pool_size=4, max_overflow=4
        )
        self._lock = asyncio.Lock()
        sync = synchronous

        @event.listens_for(self.engine.sync_engine, "connect")
        def _on_connect(dbapi: Any, _record: Any) -> None:
            dbapi.isolation_level = None
            cur = dbapi.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sync}")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(self.engine.sync_engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if _WRITE.get() else "BEGIN")

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        async with self._lock:
            token: contextvars.Token[bool] | None = _WRITE.set(True)
            try:
                async with self.engine.begin() as conn:
                    assert token is not None
                    _WRITE.reset(token)
                    token = None
                    yield conn
            finally:
                if token is not None:
                    _WRITE.reset(token)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    async def close(self) -> None:
        await self.engine.dispose()
