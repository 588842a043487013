"""Wire models of the orchestrator API: what a client sends and receives.

These are the only orchestrator types other services and the CLI may import (with `client.py`).
Workflow files (Nickel, JSON, YAML) have exactly the fields of :class:`WorkflowSpec`.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AttemptOut",
    "Dependency",
    "DependencyKind",
    "OnFailure",
    "RetryPolicy",
    "TaskOut",
    "TaskSpec",
    "TaskStatus",
    "WorkflowKind",
    "WorkflowOut",
    "WorkflowSpec",
    "WorkflowStatus",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]*$"
TaskName = Annotated[str, Field(min_length=1, max_length=128, pattern=NAME_PATTERN)]


class TaskStatus(StrEnum):
    PENDING = "Pending"
    READY = "Ready"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    SKIPPED = "Skipped"
    ROLLING_BACK = "RollingBack"
    ROLLED_BACK = "RolledBack"


class WorkflowStatus(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    PAUSED = "Paused"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    ROLLING_BACK = "RollingBack"
    ROLLED_BACK = "RolledBack"


class WorkflowKind(StrEnum):
    SERVERS_CREATE = "servers.create"
    TASKSERV_CREATE = "taskserv.create"
    CLUSTER_CREATE = "cluster.create"
    SERVERS_DELETE = "servers.delete"
    TASKSERV_REMOVE = "taskserv.remove"
    CLUSTER_DELETE = "cluster.delete"
    BATCH = "batch"
    CUSTOM = "custom"


class DependencyKind(StrEnum):
    HARD = "hard"
    """Runs only after the dependency Completed; otherwise the dependant is Skipped."""
    SOFT = "soft"
    """Runs after the dependency ran, whether it Completed or Failed; Skipped if it never ran."""
    OPTIONAL = "optional"
    """Runs after the dependency ended in any state, including Skipped or Cancelled."""


class OnFailure(StrEnum):
    FAIL = "fail"
    CONTINUE = "continue"
    ROLLBACK = "rollback"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetryPolicy(_Model):
    """How a failed attempt is retried: delay = min(max, initial * 2^(n-1)) scaled by jitter."""

    max_attempts: int = Field(3, ge=1, le=100, description="Attempts in all, the first included.")
    backoff: Literal["exponential", "fixed"] = "exponential"
    initial_delay_s: float = Field(5.0, ge=0, le=3600)
    max_delay_s: float = Field(300.0, ge=0, le=86400)
    jitter: float = Field(
        0.2, ge=0, le=1, description="Each delay is scaled by a random factor in [1-jitter, 1]."
    )


class Dependency(_Model):
    task: TaskName
    kind: DependencyKind = DependencyKind.HARD


BuiltinAction = Literal["noop", "sleep", "fail"]


class TaskSpec(_Model):
    """One task of a submitted workflow."""

    name: TaskName
    command: list[Annotated[str, Field(max_length=65536)]] | None = Field(
        None, min_length=1, max_length=4096, description="argv; run without a shell."
    )
    action: BuiltinAction | None = Field(
        None, description="A builtin in-process action instead of a command."
    )
    args: dict[str, Any] = Field(default_factory=dict, description="Arguments of the action.")
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    depends_on: list[TaskName | Dependency] = Field(default_factory=list, max_length=10000)
    priority: int | None = Field(None, ge=-1000, le=1000, description="Defaults to the workflow's.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout_s: float = Field(300.0, gt=0, le=7 * 86400)
    concurrency_key: str | None = Field(None, min_length=1, max_length=200)
    on_failure: OnFailure = OnFailure.ROLLBACK
    rollback: list[Annotated[str, Field(max_length=65536)]] | None = Field(
        None, min_length=1, max_length=4096, description="Compensation argv."
    )

    @model_validator(mode="after")
    def _one_of_command_or_action(self) -> TaskSpec:
        if (self.command is None) == (self.action is None):
            raise ValueError(f"task {self.name!r}: give exactly one of `command` or `action`")
        if self.action == "sleep":
            seconds = self.args.get("seconds", 1)
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
                raise ValueError(
                    f"task {self.name!r}: args.seconds of action sleep must be a number >= 0"
                )
        if self.action == "fail" and not isinstance(self.args.get("message", ""), str):
            raise ValueError(f"task {self.name!r}: args.message of action fail must be a string")
        for key in self.env:
            if not key or "=" in key:
                raise ValueError(
                    f"task {self.name!r}: env name {key!r} is not valid (empty or contains '=')"
                )
        return self

    def dependencies(self) -> list[Dependency]:
        """`depends_on` with plain names expanded to hard dependencies."""
        return [d if isinstance(d, Dependency) else Dependency(task=d) for d in self.depends_on]


def _nul_path(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            found = _nul_path(k, f"{path}.<key>") or _nul_path(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _nul_path(v, f"{path}[{i}]")
            if found:
                return found
    return None


class WorkflowSpec(_Model):
    """A workflow as submitted: a DAG of tasks and how to run them."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul_characters(cls, data: Any) -> Any:
        # NUL cannot be stored by PostgreSQL nor passed in argv or the environment.
        found = _nul_path(data, "workflow")
        if found:
            raise ValueError(f"{found} contains a NUL character, which is not allowed")
        return data

    name: str = Field(min_length=1, max_length=200)
    kind: WorkflowKind = WorkflowKind.CUSTOM
    priority: int = Field(0, ge=-1000, le=1000, description="Higher runs first.")
    parallel_limit: int | None = Field(None, ge=1, le=100000)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)
    labels: dict[str, str] = Field(default_factory=dict)
    tasks: list[TaskSpec] = Field(min_length=1)


class AttemptOut(BaseModel):
    number: int
    phase: Literal["run", "rollback"]
    started_at: datetime
    ended_at: datetime | None = None
    exit_code: int | None = None
    error: str | None = None
    log_path: str | None = None
    worker: str | None = None


class TaskOut(BaseModel):
    id: str
    workflow_id: str
    name: str
    status: TaskStatus
    priority: int
    depends_on: list[Dependency]
    command: list[str] | None
    action: str | None
    rollback: list[str] | None
    concurrency_key: str | None
    on_failure: OnFailure
    attempts: list[AttemptOut]
    outputs: dict[str, Any]
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class WorkflowOut(BaseModel):
    id: str
    name: str
    kind: str
    status: WorkflowStatus
    priority: int
    parallel_limit: int | None
    idempotency_key: str | None
    owner: str | None
    labels: dict[str, str]
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    task_counts: dict[str, int]
    tasks: list[TaskOut] | None = None
