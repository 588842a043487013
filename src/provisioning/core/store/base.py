"""The state store seam.

A :class:`Database` is one SQLAlchemy 2 Core async engine plus the two transaction shapes every
service uses. Contract (checked by ``tests/contract/test_store_contract.py`` against SQLite and
PostgreSQL):

* ``write()`` yields a connection inside a transaction that is committed when the block ends and
  rolled back when it raises; writes inside one ``write()`` are atomic and durable once it returns.
  Concurrent ``write()`` blocks never see each other's uncommitted rows.
* ``read()`` yields a connection that sees every write committed before it began.
* ``dialect`` is ``"sqlite"`` or ``"postgresql"``, for the few queries that differ
  (``FOR UPDATE SKIP LOCKED`` exists only on PostgreSQL).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["Database", "open_database"]


@runtime_checkable
class Database(Protocol):
    """A relational state store (see the module docstring for the contract)."""

    url: str
    dialect: str
    engine: AsyncEngine

    def write(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A write transaction: committed on exit, rolled back on error."""
        ...

    def read(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A read-only connection."""
        ...

    async def close(self) -> None:
        """Release every connection."""
        ...


def open_database(url: str, *, sqlite_synchronous: str = "FULL") -> Database:
    """Open the store for an async SQLAlchemy URL (``sqlite+aiosqlite`` or ``postgresql+asyncpg``).

    Raises:
        ConfigError: the URL names no supported backend.
    """
    from provisioning.core.errors import ConfigError

    if url.startswith("sqlite+aiosqlite://"):
        from provisioning.core.store.sqlite import SqliteDatabase

        return SqliteDatabase(url, synchronous=sqlite_synchronous)
    if url.startswith("postgresql+asyncpg://"):
        from provisioning.core.store.postgres import PostgresDatabase

        return PostgresDatabase(url)
    raise ConfigError(
        f"state.url {url!r} is not supported: use sqlite:///<path> or postgresql://<host>/<db>"
    )
