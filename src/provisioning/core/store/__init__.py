"""The state store seam: :class:`Database` and its SQLite and PostgreSQL implementations."""

from provisioning.core.settings import to_async_url
from provisioning.core.store.base import Database, open_database
from provisioning.core.store.migrate import upgrade

__all__ = ["Database", "open_database", "to_async_url", "upgrade"]
