"""The history of the workspaces' Nickel files (SQLAlchemy Core), created by migration
``cc_0002``. Written only by :mod:`provisioning.control_center.workspace_config`.

One row per version of one file: the whole content (Nickel files are small, and a diff or a
restore then needs no chain of patches), who made it and why. ``version`` counts from 0 per
``(workspace, path)``: version 0 is the file as first found on disk.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text

__all__ = ["config_metadata", "config_versions"]

config_metadata = MetaData()

config_versions = Table(
    "cc_config_versions",
    config_metadata,
    Column("workspace", String(100), primary_key=True),  # the workspace id
    Column("path", String(1024), primary_key=True),  # relative, '/'-separated
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("sha256", String(64), nullable=False),
    Column("size", Integer, nullable=False),
    Column("content", Text, nullable=False),
    Column("author", String(200), nullable=False),  # user name, or "on-disk"
    Column("author_type", String(20), nullable=False),  # user | apikey | on-disk
    Column("message", Text, nullable=False),
    Column("restored_from", Integer, nullable=True),  # the version a restore copied
    Column("created_at", DateTime(timezone=True), nullable=False),
)
