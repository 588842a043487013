"""The audit log's table (SQLAlchemy Core), on its own ``MetaData`` until the control center's
migrations take it over.

``seq`` is assigned by :func:`provisioning.control_center.audit_log.append` (last + 1, under a
lock), not by a database sequence: a sequence leaves gaps on rollback, and a gap is how the
verifier recognises a deleted record.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer, MetaData, String, Table

__all__ = ["audit_metadata", "cc_audit"]

audit_metadata = MetaData()

cc_audit = Table(
    "cc_audit",
    audit_metadata,
    Column(
        "seq",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=False,
    ),
    Column("id", String(36), nullable=False, unique=True),
    Column("ts", DateTime(timezone=True), nullable=False),  # UTC
    Column("actor", String(200), nullable=True),
    Column("actor_type", String(20), nullable=False),  # user | apikey | anonymous | system
    Column("action", String(100), nullable=False),  # <resource>:<verb>, e.g. auth:login
    Column("object_type", String(100), nullable=True),
    Column("object_id", String(200), nullable=True),
    Column("result", String(20), nullable=False),  # success | denied | failure | error
    Column("source", String(100), nullable=True),  # client address
    Column("request_id", String(100), nullable=True),
    Column("service", String(100), nullable=True),
    Column("details", JSON, nullable=False),  # redacted before it is written
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
Index("ix_cc_audit_ts", cc_audit.c.ts)
Index("ix_cc_audit_actor", cc_audit.c.actor)
Index("ix_cc_audit_action", cc_audit.c.action)
Index("ix_cc_audit_object", cc_audit.c.object_type, cc_audit.c.object_id)
