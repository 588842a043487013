"""The ops-keeper's operations, change freezes and audit outbox.

Revision ID: keeper_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "keeper_0001"
down_revision = None
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = True) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "keeper_ops",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("op_type", sa.String(100), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("image", sa.String(300), nullable=True),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("params_sha256", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("requester", sa.String(200), nullable=False),
        sa.Column("requester_name", sa.String(200), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("decision", sa.String(20), nullable=False),
        sa.Column("policy", sa.String(200), nullable=True),
        sa.Column("decision_reason", sa.Text, nullable=False),
        sa.Column("frozen_by", sa.String(36), nullable=True),
        sa.Column("approver_role", sa.String(100), nullable=True),
        sa.Column("token_ttl_s", sa.Integer, nullable=True),
        sa.Column("trace", sa.JSON, nullable=False),
        sa.Column("approver", sa.String(200), nullable=True),
        sa.Column("approver_name", sa.String(200), nullable=True),
        sa.Column("approver_reason", sa.Text, nullable=True),
        sa.Column("jti", sa.String(36), nullable=True),
        sa.Column("token", sa.Text, nullable=True),
        _ts("token_expires_at"),
        _ts("approval_expires_at"),
        _ts("next_attempt_at"),
        sa.Column("publish_attempts", sa.Integer, nullable=False),
        sa.Column("last_publish_error", sa.Text, nullable=True),
        sa.Column("stream_seq", sa.BigInteger, nullable=True),
        sa.Column("expired_reason", sa.Text, nullable=True),
        _ts("created_at", False),
        _ts("updated_at", False),
        _ts("decided_at"),
        _ts("published_at"),
    )
    op.create_index("ix_keeper_ops_state_next", "keeper_ops", ["state", "next_attempt_at"])
    op.create_index("ix_keeper_ops_requester_created", "keeper_ops", ["requester", "created_at"])
    op.create_index("ix_keeper_ops_created", "keeper_ops", ["created_at"])
    op.create_table(
        "keeper_freezes",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("scope", sa.String(200), nullable=False),
        _ts("until"),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_by_name", sa.String(200), nullable=False),
        _ts("created_at", False),
        _ts("ended_at"),
        sa.Column("ended_by", sa.String(200), nullable=True),
    )
    op.create_index("ix_keeper_freezes_ended", "keeper_freezes", ["ended_at"])
    op.create_table(
        "keeper_audit_outbox",
        sa.Column("id", sa.String(36), primary_key=True),
        _ts("created_at", False),
        sa.Column("event", sa.JSON, nullable=False),
    )
    op.create_index("ix_keeper_audit_outbox_created", "keeper_audit_outbox", ["created_at"])


def downgrade() -> None:
    op.drop_table("keeper_audit_outbox")
    op.drop_table("keeper_freezes")
    op.drop_table("keeper_ops")
