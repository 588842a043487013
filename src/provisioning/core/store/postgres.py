"""PostgreSQL implementation of the state store (asyncpg), for the distributed mode.

Transaction functions run through SQLAlchemy's async engine (``run_sync``: statements are
awaited on the event loop, no thread). Several processes share one database; row claims use
``FOR UPDATE SKIP LOCKED`` in the services' own statements, and short critical sections use
transaction-scoped advisory locks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from provisioning.core.logging import get_logger

__all__ = ["PostgresDatabase"]

T = TypeVar("T")
log = get_logger("store.postgres")
_LISTEN_CHECK_S = 30.0  # a listening connection is checked this often


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

    async def listen(self, channel: str, on_payload: Callable[[str], None]) -> None:
        """Call ``on_payload`` with the payload of each ``NOTIFY`` on ``channel``, until
        cancelled (it never returns otherwise).

        LISTEN holds a connection of its own, outside the pool. Lost or unreachable, it is
        opened again after 0.5, 1, 2, 4, then every 5 s; a quiet one is checked every 30 s.
        Notifications sent while it was away are lost: a listener must also poll.
        """
        import asyncpg

        url = make_url(self.url)
        # The URL's query holds the engine's connect arguments, not server settings: asyncpg
        # would send those it does not know to the server, which refuses them.
        query = dict(url.query)
        ssl = query.get("ssl") or query.get("sslmode")
        extra: dict[str, Any] = {"ssl": ssl} if isinstance(ssl, str) else {}
        dsn = url.set(drivername="postgresql", query={}).render_as_string(hide_password=False)
        delay, failures = 0.5, 0
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(
                    dsn,
                    timeout=5,
                    server_settings={"application_name": f"prvng-listen {channel}"},
                    **extra,
                )
                lost = asyncio.Event()

                def deliver(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
                    on_payload(payload)

                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(channel, deliver)
                delay, failures = 0.5, 0  # listening
                while not lost.is_set():
                    # asyncio.wait, not wait_for: a cancel is never swallowed here.
                    waiter = asyncio.ensure_future(lost.wait())
                    try:
                        await asyncio.wait({waiter}, timeout=_LISTEN_CHECK_S)
                    finally:
                        waiter.cancel()
                    if not lost.is_set():
                        await conn.execute("SELECT 1", timeout=5)
            except Exception as exc:  # down, refused, in recovery, connection broke: again
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning(
                        "cannot listen for notifications; retrying",
                        extra={"channel": channel, "error": str(exc), "failures": failures},
                    )
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 5)
            await asyncio.sleep(delay)  # never a spin, whatever keeps failing
            delay = min(delay * 2, 5.0)
