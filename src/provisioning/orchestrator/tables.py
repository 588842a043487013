"""The orchestrator's tables (SQLAlchemy Core). Migrations in ``migrations/`` create them."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

workflows = Table(
    "orch_workflows",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("status", String(20), nullable=False),
    # Set while the workflow drains its running tasks before it ends: fail | rollback | cancel.
    Column("draining", String(20), nullable=True),
    Column("priority", Integer, nullable=False),
    Column("parallel_limit", Integer, nullable=True),
    Column("idempotency_key", String(200), nullable=True, unique=True),
    Column("owner", String(200), nullable=True),
    Column("labels", JSON, nullable=False),
    Column("error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)
Index("ix_orch_workflows_status", workflows.c.status)
Index("ix_orch_workflows_created", workflows.c.created_at)

tasks = Table(
    "orch_tasks",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("workflow_id", String(36), ForeignKey("orch_workflows.id"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("ord", Integer, nullable=False),  # submission order: FIFO tie-break
    Column("topo", Integer, nullable=False),  # topological index: rollback runs in reverse
    Column("status", String(20), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("ready_at", DateTime(timezone=True), nullable=True),
    Column("spec", JSON, nullable=False),  # command/action/args/env/cwd/retry/timeout/rollback
    Column("depends_on", JSON, nullable=False),  # [{"task": name, "kind": kind}]
    Column("deps_remaining", Integer, nullable=False),
    Column("blocked", Integer, nullable=False),  # a dependency ended in a way that skips this
    Column("concurrency_key", String(200), nullable=True),
    Column("on_failure", String(20), nullable=False),
    Column("attempts", Integer, nullable=False),  # attempts counted against the retry budget
    Column("attempt_seq", Integer, nullable=False),  # attempts ever made (numbering)
    Column("lease_owner", String(100), nullable=True),
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    Column("outputs", JSON, nullable=False),
    Column("error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("workflow_id", "name", name="uq_orch_tasks_workflow_name"),
)
Index("ix_orch_tasks_ready", tasks.c.status, tasks.c.ready_at)
Index("ix_orch_tasks_workflow_status", tasks.c.workflow_id, tasks.c.status)

task_deps = Table(
    "orch_task_deps",
    metadata,
    Column("task_id", String(36), ForeignKey("orch_tasks.id"), primary_key=True),
    Column("dep_id", String(36), ForeignKey("orch_tasks.id"), primary_key=True),
    Column("kind", String(10), nullable=False),
)
Index("ix_orch_task_deps_dep", task_deps.c.dep_id)

attempts = Table(
    "orch_attempts",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("task_id", String(36), ForeignKey("orch_tasks.id"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("phase", String(10), nullable=False),  # run | rollback
    Column("worker", String(100), nullable=True),
    Column("pid", Integer, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("exit_code", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("log_path", Text, nullable=True),
)
Index("ix_orch_attempts_task", attempts.c.task_id, attempts.c.number)

# Audit events of a standalone orchestrator waiting to reach the control center
# (core.audit_relay); empty in the embedded platform, which records them directly.
audit_outbox = Table(
    "orch_audit_outbox",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("event", JSON, nullable=False),
)
Index("ix_orch_audit_outbox_created", audit_outbox.c.created_at)
