"""The servers' inventory.

Revision ID: ws_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "ws_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ws_servers",
        sa.Column("workspace", sa.String(1024), primary_key=True),
        sa.Column("infra", sa.String(63), primary_key=True),
        sa.Column("hostname", sa.String(63), primary_key=True),
        sa.Column("workspace_name", sa.String(63), nullable=False),
        sa.Column("provider", sa.String(63), nullable=False),
        sa.Column("provider_id", sa.String(255), nullable=True),
        sa.Column("address", sa.String(255), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("taskservs", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ws_servers")
