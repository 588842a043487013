"""The control center's identity tables (SQLAlchemy Core). The audit table is in
``tables_audit.py``; migrations in ``migrations/`` create both."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

users = Table(
    "cc_users",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("password_hash", Text, nullable=False),
    Column("roles", JSON, nullable=False),
    Column("disabled", Boolean, nullable=False),
    Column("mfa_secret", String(64), nullable=True),
    Column("mfa_last_step", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Bumped on disable, password change and "log out everywhere": tokens issued before it die.
    Column("sessions_valid_after", DateTime(timezone=True), nullable=False),
)

refresh_tokens = Table(
    "cc_refresh_tokens",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("family_id", String(36), nullable=False),
    Column("user_id", String(36), ForeignKey("cc_users.id"), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("mfa", Boolean, nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("family_started_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("source", String(100), nullable=True),
)
Index("ix_cc_refresh_family", refresh_tokens.c.family_id)
Index("ix_cc_refresh_user", refresh_tokens.c.user_id)

api_keys = Table(
    "cc_api_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # the public part of prvng_<id>_<secret>
    Column("user_id", String(36), ForeignKey("cc_users.id"), nullable=False),
    Column("name", String(100), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("scopes", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)
Index("ix_cc_api_keys_user", api_keys.c.user_id)
