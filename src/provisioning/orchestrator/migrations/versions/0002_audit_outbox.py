"""The audit outbox of a standalone orchestrator.

Revision ID: orch_0002
Revises: orch_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "orch_0002"
down_revision = "orch_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orch_audit_outbox",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.JSON, nullable=False),
    )
    op.create_index("ix_orch_audit_outbox_created", "orch_audit_outbox", ["created_at"])


def downgrade() -> None:
    op.drop_table("orch_audit_outbox")
