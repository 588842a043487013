"""Control center tables: users, refresh tokens, API keys, audit log.

Revision ID: cc_0001
Revises:

The first revision creates the tables from their definitions in ``tables.py`` and
``tables_audit.py``; later revisions must use explicit operations, never the live definitions.
"""

from alembic import op

from provisioning.control_center.tables import metadata
from provisioning.control_center.tables_audit import audit_metadata

revision = "cc_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    metadata.create_all(bind)
    audit_metadata.create_all(bind)


def downgrade() -> None:
    bind = op.get_bind()
    audit_metadata.drop_all(bind)
    metadata.drop_all(bind)
