"""The ops-keeper's tables (SQLAlchemy Core). Migrations in ``migrations/`` create them."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = ["audit_outbox", "freezes", "metadata", "ops", "ops_audit_outbox"]

metadata = MetaData()


def _ts(name: str, nullable: bool = True) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


ops = Table(
    "keeper_ops",
    metadata,
    Column("id", String(36), primary_key=True),  # also the token's jti and the Nats-Msg-Id
    Column("op_type", String(100), nullable=False),
    Column("target", String(200), nullable=False),
    Column("image", String(300), nullable=True),
    Column("params", JSON, nullable=False),
    Column("params_sha256", String(64), nullable=False),
    Column("reason", Text, nullable=True),  # the requester's
    Column("requester", String(200), nullable=False),  # user id: the owner
    Column("requester_name", String(200), nullable=False),
    Column("state", String(20), nullable=False),
    Column("decision", String(20), nullable=False),  # what the policy (or a freeze) said
    Column("policy", String(200), nullable=True),
    Column("decision_reason", Text, nullable=False),
    Column("frozen_by", String(36), nullable=True),
    Column("approver_role", String(100), nullable=True),
    Column("token_ttl_s", Integer, nullable=True),
    Column("trace", JSON, nullable=False),
    Column("approver", String(200), nullable=True),
    Column("approver_name", String(200), nullable=True),
    Column("approver_reason", Text, nullable=True),
    Column("jti", String(36), nullable=True),
    # The signed token, kept while it waits to be published (the outbox), cleared after.
    Column("token", Text, nullable=True),
    _ts("token_expires_at"),
    _ts("approval_expires_at"),
    _ts("next_attempt_at"),  # when the republish loop may (re)try; claimed by moving it on
    Column("publish_attempts", Integer, nullable=False),
    Column("last_publish_error", Text, nullable=True),
    Column("stream_seq", BigInteger, nullable=True),
    Column("expired_reason", Text, nullable=True),
    _ts("created_at", False),
    _ts("updated_at", False),
    _ts("decided_at"),
    _ts("published_at"),
)
Index("ix_keeper_ops_state_next", ops.c.state, ops.c.next_attempt_at)
Index("ix_keeper_ops_requester_created", ops.c.requester, ops.c.created_at)
Index("ix_keeper_ops_created", ops.c.created_at)

freezes = Table(
    "keeper_freezes",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("scope", String(200), nullable=False),
    _ts("until"),
    Column("created_by", String(200), nullable=False),
    Column("created_by_name", String(200), nullable=False),
    _ts("created_at", False),
    _ts("ended_at"),
    Column("ended_by", String(200), nullable=True),
)
Index("ix_keeper_freezes_ended", freezes.c.ended_at)

# Audit events of a standalone keeper waiting to reach the control center
# (core.audit_relay); empty in the embedded platform, which records them directly.
audit_outbox = Table(
    "keeper_audit_outbox",
    metadata,
    Column("id", String(36), primary_key=True),
    _ts("created_at", False),
    Column("event", JSON, nullable=False),
)
Index("ix_keeper_audit_outbox_created", audit_outbox.c.created_at)

# The keeper's decisions (DESIGN §7 AuditEvent), each written in the transaction of the state
# change it records, waiting to be published on ``ops.audit.<outcome>`` (the publisher loop
# relays them, oldest first, with ``Nats-Msg-Id`` = the event id, and deletes them once acked).
ops_audit_outbox = Table(
    "keeper_ops_audit_outbox",
    metadata,
    # The order events were written in (created_at may tie within a clock tick).
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(36), nullable=False, unique=True),  # the event's id
    Column("subject", String(100), nullable=False),
    Column("event", JSON, nullable=False),
    _ts("created_at", False),
)
