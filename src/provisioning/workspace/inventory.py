"""The servers' inventory in the state store: what each provider made (id, address, status)
and which task services are installed, per workspace and infra. ``prvng extension run`` keeps it
current after each successful operation; ``prvng server list`` and ``GET /servers`` show it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, delete, select, update
from sqlalchemy.engine import Connection

from provisioning.core.clock import as_utc
from provisioning.core.store import Database, upgrade

__all__ = ["Inventory", "servers"]

metadata = MetaData()

servers = Table(
    "ws_servers",
    metadata,
    Column("workspace", String(1024), primary_key=True),  # the workspace's absolute path
    Column("infra", String(63), primary_key=True),
    Column("hostname", String(63), primary_key=True),
    Column("workspace_name", String(63), nullable=False),
    Column("provider", String(63), nullable=False),
    Column("provider_id", String(255), nullable=True),
    Column("address", String(255), nullable=True),
    Column("status", String(20), nullable=False),
    Column("taskservs", JSON, nullable=False),  # names, in install order
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def _doc(row: Any) -> dict[str, Any]:
    return {
        "workspace": row.workspace,
        "workspace_name": row.workspace_name,
        "infra": row.infra,
        "hostname": row.hostname,
        "provider": row.provider,
        "provider_id": row.provider_id,
        "address": row.address,
        "status": row.status,
        "taskservs": list(row.taskservs or []),
        "created_at": as_utc(row.created_at),
        "updated_at": as_utc(row.updated_at),
    }


class Inventory:
    """Reads and writes ``ws_servers`` through a :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def migrate(self) -> None:
        await upgrade(self.db, Path(__file__).parent / "migrations", "alembic_version_workspace")

    async def list(
        self, *, workspace: str | None = None, infra: str | None = None
    ) -> list[dict[str, Any]]:
        def body(conn: Connection) -> list[dict[str, Any]]:
            q = select(servers).order_by(servers.c.workspace, servers.c.infra, servers.c.hostname)
            if workspace is not None:
                q = q.where(servers.c.workspace == workspace)
            if infra is not None:
                q = q.where(servers.c.infra == infra)
            return [_doc(r) for r in conn.execute(q)]

        return await self.db.run_read(body)

    async def get(self, workspace: str, infra: str, hostname: str) -> dict[str, Any] | None:
        def body(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(select(servers).where(*_key(workspace, infra, hostname))).first()
            return None if row is None else _doc(row)

        return await self.db.run_read(body)

    async def record_server(
        self,
        *,
        workspace: str,
        workspace_name: str,
        infra: str,
        hostname: str,
        provider: str,
        provider_id: str | None,
        address: str | None,
        status: str,
    ) -> None:
        """Insert or update a server the provider made (installed task services are kept)."""
        now = datetime.now(UTC)

        def body(conn: Connection) -> None:
            key = _key(workspace, infra, hostname)
            values = {
                "provider": provider,
                "provider_id": provider_id,
                "address": address,
                "status": status,
                "workspace_name": workspace_name,
                "updated_at": now,
            }
            if conn.execute(update(servers).where(*key).values(**values)).rowcount == 0:
                conn.execute(
                    servers.insert().values(
                        workspace=workspace,
                        infra=infra,
                        hostname=hostname,
                        taskservs=[],
                        created_at=now,
                        **values,
                    )
                )

        await self.db.run_write(body)

    async def forget_server(self, workspace: str, infra: str, hostname: str) -> bool:
        def body(conn: Connection) -> bool:
            return bool(
                conn.execute(delete(servers).where(*_key(workspace, infra, hostname))).rowcount
            )

        return await self.db.run_write(body)

    async def set_taskserv(
        self, workspace: str, infra: str, hostname: str, taskserv: str, installed: bool
    ) -> None:
        """Mark a task service installed or removed on a known server (unknown: no-op)."""
        now = datetime.now(UTC)

        def body(conn: Connection) -> None:
            key = _key(workspace, infra, hostname)
            row = conn.execute(select(servers.c.taskservs).where(*key)).first()
            if row is None:
                return
            names = [n for n in (row.taskservs or []) if n != taskserv]
            if installed:
                names.append(taskserv)
            conn.execute(update(servers).where(*key).values(taskservs=names, updated_at=now))

        await self.db.run_write(body)


def _key(workspace: str, infra: str, hostname: str) -> tuple[Any, ...]:
    return (
        servers.c.workspace == workspace,
        servers.c.infra == infra,
        servers.c.hostname == hostname,
    )
