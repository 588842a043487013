"""The ops-controller's idempotency records and audit outbox.

Revision ID: ctl_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "ctl_0001"
down_revision = None
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = True) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "ctl_idempotency",
        sa.Column("jti", sa.String(255), primary_key=True),
        sa.Column("op_type", sa.String(100), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("workflow_id", sa.String(200), nullable=True),
        sa.Column("outcome", sa.JSON, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        _ts("received_at", False),
        _ts("updated_at", False),
        _ts("dispatched_at"),
        _ts("finished_at"),
    )
    op.create_index("ix_ctl_idempotency_state", "ctl_idempotency", ["state", "updated_at"])
    op.create_table(
        "ctl_outbox",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("jti", sa.String(255), nullable=False),
        _ts("created_at", False),
        sa.Column("event", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ctl_outbox")
    op.drop_table("ctl_idempotency")
