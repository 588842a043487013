"""Alembic environment: runs on the connection handed over by ``core.store.migrate``."""

from alembic import context

_config = context.config
context.configure(
    connection=_config.attributes["connection"],
    target_metadata=None,
    version_table=_config.attributes["version_table"],
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
