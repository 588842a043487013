"""The state store seam.

A :class:`Database` runs *transaction functions*: plain synchronous functions that take a
SQLAlchemy 2 Core :class:`~sqlalchemy.engine.Connection` and do all of one transaction's
statements. Callers stay async (``await db.run_write(fn)``); each implementation decides how the
function reaches its driver. A whole transaction costs one hop off the event loop instead of one
per statement, which is what keeps the orchestrator's hot path fast (docs/architecture.md).

Contract (checked by ``tests/contract/test_database_contract.py`` on SQLite and PostgreSQL):

* ``run_write(fn)`` runs ``fn`` inside one transaction, committed when ``fn`` returns and rolled
  back when it raises (the exception propagates). Once it returns, the writes are durable.
  Two ``run_write`` calls never interleave their uncommitted writes.
* ``run_read(fn)`` runs ``fn`` on a connection that sees every write committed before it began.
* ``dialect`` is ``"sqlite"`` or ``"postgresql"``, for the few statements that differ
  (``FOR UPDATE SKIP LOCKED`` and advisory locks exist only on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar, runtime_checkable

from sqlalchemy.engine import Connection

from provisioning.core.settings import to_async_url

__all__ = ["Database", "open_database"]

T = TypeVar("T")


@runtime_checkable
class Database(Protocol):
    """A relational state store (see the module docstring for the contract)."""

    url: str
    dialect: str

    async def run_write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one write transaction and return its result."""
        ...

    async def run_read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` on a read connection and return its result."""
        ...

    async def close(self) -> None:
        """Release every connection and thread."""
        ...


def open_database(url: str, *, sqlite_synchronous: str = "FULL") -> Database:
    """Open the store for a database URL: ``sqlite:///<path>``, ``postgresql://…`` or their
    async SQLAlchemy forms (``sqlite+aiosqlite``, ``postgresql+asyncpg``).

    Raises:
        ConfigError: the URL names no supported backend.
    """
    from provisioning.core.errors import ConfigError

    url = to_async_url(url)

    if url.startswith(("sqlite+aiosqlite://", "sqlite://")):
        from provisioning.core.store.sqlite import SqliteDatabase

        return SqliteDatabase(url, synchronous=sqlite_synchronous)
    if url.startswith("postgresql+asyncpg://"):
        from provisioning.core.store.postgres import PostgresDatabase

        return PostgresDatabase(url)
    raise ConfigError(
        f"state.url {url!r} is not supported: use sqlite:///<path> or postgresql://<host>/<db>"
    )
