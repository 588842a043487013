"""The outbox of the keeper's decisions on their way to ``ops.audit.<outcome>``.

Revision ID: keeper_0002
Revises: keeper_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "keeper_0002"
down_revision = "keeper_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "keeper_ops_audit_outbox",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("subject", sa.String(100), nullable=False),
        sa.Column("event", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("keeper_ops_audit_outbox")
