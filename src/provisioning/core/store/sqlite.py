"""SQLite implementation of the state store: WAL mode, one writer thread.

Transaction functions run on SQLAlchemy's synchronous pysqlite driver in dedicated threads: all
writes on one thread (SQLite has one writer anyway; ``BEGIN IMMEDIATE`` so a read-then-write
transaction never fails to upgrade its lock), reads on a small pool of others. Other processes
on the same file wait up to ``busy_timeout``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import QueuePool

__all__ = ["SqliteDatabase"]

T = TypeVar("T")


class SqliteDatabase:
    """The state store on one SQLite file (see :mod:`provisioning.core.store.base`)."""

    dialect = "sqlite"

    def __init__(self, url: str, *, synchronous: str = "FULL") -> None:
        self.url = url
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(
            f"sqlite:///{path}",
            poolclass=QueuePool,
            pool_size=4,
            max_overflow=4,
            connect_args={"check_same_thread": False},
        )
        # Made on first use, and again after close(): a service restarted by the supervisor
        # (stop, then start) uses its store again.
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        sync = synchronous

        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi: Any, _record: Any) -> None:
            dbapi.isolation_level = None
            cur = dbapi.cursor()
            # busy_timeout first: switching to WAL needs a lock another connection may hold.
            cur.execute("PRAGMA busy_timeout=10000")
            _set_wal(cur)
            cur.execute(f"PRAGMA synchronous={sync}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        local = self._local

        @event.listens_for(self.engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if getattr(local, "write", False) else "BEGIN")

    def _write(self, fn: Callable[[Connection], T]) -> T:
        self._local.write = True
        try:
            with self.engine.begin() as conn:
                return fn(conn)
        finally:
            self._local.write = False

    def _read(self, fn: Callable[[Connection], T]) -> T:
        with self.engine.begin() as conn:
            return fn(conn)

    def _writer_pool(self) -> ThreadPoolExecutor:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-write")
        return self._writer

    def _reader_pool(self) -> ThreadPoolExecutor:
        if self._readers is None:
            self._readers = ThreadPoolExecutor(3, thread_name_prefix="sqlite-read")
        return self._readers

    async def run_write(self, fn: Callable[[Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer_pool(), self._write, fn)

    async def run_read(self, fn: Callable[[Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader_pool(), self._read, fn)

    async def close(self) -> None:
        """Finish what is queued, close the connections; a later call opens them again."""
        pools = [p for p in (self._writer, self._readers) if p is not None]
        self._writer = self._readers = None
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown, pools)

    def _shutdown(self, pools: list[ThreadPoolExecutor]) -> None:
        for pool in pools:
            pool.shutdown(wait=True)
        self.engine.dispose()


def _set_wal(cur: Any) -> None:
    """Switch to WAL. Two connections opening a new file at once can get "database is locked"
    here without the busy handler being called (the mode change takes an exclusive lock), so
    retry for up to 10 s."""
    import sqlite3
    import time

    deadline = time.monotonic() + 10.0
    for _ in range(1000):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    cur.execute("PRAGMA journal_mode=WAL")
