"""Orchestrator tables: workflows, tasks, task dependencies, attempts.

Revision ID: orch_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "orch_0001"
down_revision = None
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = True) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "orch_workflows",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("draining", sa.String(20), nullable=True),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("parallel_limit", sa.Integer, nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True, unique=True),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        _ts("created_at", False),
        _ts("updated_at", False),
        _ts("started_at"),
        _ts("finished_at"),
    )
    op.create_index("ix_orch_workflows_status", "orch_workflows", ["status"])
    op.create_index("ix_orch_workflows_created", "orch_workflows", ["created_at"])
    op.create_table(
        "orch_tasks",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("workflow_id", sa.String(36), sa.ForeignKey("orch_workflows.id"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("ord", sa.Integer, nullable=False),
        sa.Column("topo", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        _ts("ready_at"),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("depends_on", sa.JSON, nullable=False),
        sa.Column("deps_remaining", sa.Integer, nullable=False),
        sa.Column("blocked", sa.Integer, nullable=False),
        sa.Column("concurrency_key", sa.String(200), nullable=True),
        sa.Column("on_failure", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("attempt_seq", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(100), nullable=True),
        _ts("lease_expires_at"),
        sa.Column("outputs", sa.JSON, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        _ts("created_at", False),
        _ts("started_at"),
        _ts("finished_at"),
        sa.UniqueConstraint("workflow_id", "name", name="uq_orch_tasks_workflow_name"),
    )
    op.create_index("ix_orch_tasks_ready", "orch_tasks", ["status", "ready_at"])
    op.create_index("ix_orch_tasks_workflow_status", "orch_tasks", ["workflow_id", "status"])
    op.create_table(
        "orch_task_deps",
        sa.Column("task_id", sa.String(36), sa.ForeignKey("orch_tasks.id"), primary_key=True),
        sa.Column("dep_id", sa.String(36), sa.ForeignKey("orch_tasks.id"), primary_key=True),
        sa.Column("kind", sa.String(10), nullable=False),
    )
    op.create_index("ix_orch_task_deps_dep", "orch_task_deps", ["dep_id"])
    op.create_table(
        "orch_attempts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("task_id", sa.String(36), sa.ForeignKey("orch_tasks.id"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("phase", sa.String(10), nullable=False),
        sa.Column("worker", sa.String(100), nullable=True),
        sa.Column("pid", sa.Integer, nullable=True),
        _ts("started_at", False),
        _ts("ended_at"),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("log_path", sa.Text, nullable=True),
    )
    op.create_index("ix_orch_attempts_task", "orch_attempts", ["task_id", "number"])


def downgrade() -> None:
    for table in ("orch_attempts", "orch_task_deps", "orch_tasks", "orch_workflows"):
        op.drop_table(table)
