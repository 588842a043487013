"""Alembic migrations run programmatically at service start.

Each service owns its tables and its migration folder (``<service>/migrations``) with its own
version table, so services upgrade independently. On PostgreSQL an advisory lock keeps two
workers starting at once from migrating together.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection

from provisioning.core.store.base import Database

__all__ = ["upgrade"]


async def upgrade(db: Database, script_location: Path, version_table: str) -> None:
    """Bring the service's tables to the newest migration.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database refused a migration step.
    """

    from alembic import command  # heavy: imported only when a service starts
    from alembic.config import Config

    def _run(conn: Connection) -> None:
        if db.dialect == "postgresql":
            conn.execute(
                text("SELECT pg_advisory_xact_lock(:k)"), {"k": zlib.crc32(version_table.encode())}
            )
        cfg = Config()
        cfg.set_main_option("script_location", str(script_location))
        cfg.attributes["connection"] = conn
        cfg.attributes["version_table"] = version_table
        command.upgrade(cfg, "head")

    await db.run_write(_run)
