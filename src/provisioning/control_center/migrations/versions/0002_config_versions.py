"""The history of the workspaces' Nickel files (config management).

Revision ID: cc_0002
Revises: cc_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "cc_0002"
down_revision = "cc_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cc_config_versions",
        sa.Column("workspace", sa.String(100), primary_key=True),
        sa.Column("path", sa.String(1024), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("author_type", sa.String(20), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("restored_from", sa.Integer, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cc_config_versions")
