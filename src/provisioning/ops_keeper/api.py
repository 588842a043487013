"""Wire models of the ops-keeper API: what a client sends and receives.

These are the only ops-keeper types other services and the CLI may import (with ``client.py``);
the token claims and the published message format (``claims.py``) are re-exported here for the
ops-controller.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from provisioning.core.clock import as_utc, utcnow
from provisioning.ops_keeper.claims import (
    PENDING_SUBJECT_PREFIX,
    OpsClaims,
    PendingMessage,
    canonical_params,
    params_sha256,
    pending_subject,
)

__all__ = [
    "IMAGE_PATTERN",
    "MAX_PARAMS_BYTES",
    "OP_TYPE_PATTERN",
    "PENDING_SUBJECT_PREFIX",
    "TARGET_PATTERN",
    "ApproveIn",
    "DecisionOut",
    "FreezeIn",
    "FreezeOut",
    "OpOut",
    "OpRequestIn",
    "OpState",
    "OpsClaims",
    "PendingMessage",
    "TraceOut",
    "canonical_params",
    "params_sha256",
    "pending_subject",
]

#: ``server.create``, ``taskserv.remove``, ``cluster.node.drain``: lower-case words joined by
#: dots; each word becomes one token of the NATS subject ``ops.pending.<op_type>``.
OP_TYPE_PATTERN = r"^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*){1,4}$"
#: ``prod/web-01``, ``dev/db:5432``.
TARGET_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]*$"
#: ``registry.example/app:1.2``, ``app@sha256:...``.
IMAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@/+-]*$"
MAX_PARAMS_BYTES = 64 * 1024


class OpState(StrEnum):
    """Where an operation is: decided, then (when approved) signed and published."""

    PENDING_APPROVAL = "pending_approval"
    """A policy demands a manual approval by another user holding its approver role."""
    APPROVED = "approved"
    """Approved and signed; the token is being published (retried until it is)."""
    PUBLISHED = "published"
    """On ``ops.pending.<op_type>``, for the ops-controller."""
    REJECTED = "rejected"
    """Rejected by a policy, a change freeze, no policy at all, or an approver."""
    EXPIRED = "expired"
    """Not approved within ``approval_ttl_s``, or its token expired before it was published."""


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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul_characters(cls, data: Any) -> Any:
        # PostgreSQL cannot store NUL in text, nor JSON carry it unescaped to every consumer.
        found = _nul_path(data, "body")
        if found:
            raise ValueError(f"{found} contains a NUL character, which is not allowed")
        return data


class OpRequestIn(_Model):
    """An operation somebody asks the keeper to allow (``POST /ops``, ``POST /ops/evaluate``)."""

    op_type: str = Field(
        min_length=3,
        max_length=100,
        pattern=OP_TYPE_PATTERN,
        description="What to do, like `server.create`: lower-case words joined by dots.",
        examples=["server.delete"],
    )
    target: str = Field(
        min_length=1,
        max_length=200,
        pattern=TARGET_PATTERN,
        description="What to do it to, like `prod/web-01`.",
        examples=["prod/web-01"],
    )
    image: str | None = Field(
        None, min_length=1, max_length=300, pattern=IMAGE_PATTERN, description="Image, if any."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Parameters of the operation (JSON, at most {MAX_PARAMS_BYTES} bytes); "
        "they travel beside the signed token, bound to it by their SHA-256.",
    )
    reason: str | None = Field(None, max_length=500, description="Why, for the approver.")

    @field_validator("params")
    @classmethod
    def _params_fit(cls, params: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(canonical_params(params))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"must be plain JSON (no NaN or Infinity): {exc}") from None
        if size > MAX_PARAMS_BYTES:
            raise ValueError(
                f"is {size} bytes as JSON; at most {MAX_PARAMS_BYTES} bytes are allowed"
            )
        return params


class ApproveIn(_Model):
    """The approver's (or rejecter's) reason, recorded with the decision."""

    reason: str = Field(min_length=1, max_length=500, description="Why; recorded and audited.")

    @field_validator("reason")
    @classmethod
    def _not_blank(cls, reason: str) -> str:
        if not reason.strip():
            raise ValueError("must not be blank")
        return reason


class FreezeIn(_Model):
    """A change freeze: operations on targets matching ``scope`` are rejected until ``until``
    (or until it is lifted)."""

    reason: str = Field(min_length=1, max_length=500, description="Why; shown in rejections.")
    scope: str = Field(
        "*",
        min_length=1,
        max_length=200,
        description="Glob on the target (`prod/*`); `*` freezes everything.",
    )
    until: datetime | None = Field(
        None, description="When the freeze ends by itself (UTC if no offset); none: when lifted."
    )

    @field_validator("until")
    @classmethod
    def _in_the_future(cls, until: datetime | None) -> datetime | None:
        until = as_utc(until)
        if until is not None and until <= utcnow():
            raise ValueError("must be in the future")
        return until


class TraceOut(BaseModel):
    policy: str
    matched: bool
    field: Literal["op_types", "images", "targets"] | None
    detail: str


class DecisionOut(BaseModel):
    """What the keeper decides (``POST /ops/evaluate``) and why."""

    decision: Literal["approve", "reject", "require_approval"]
    policy: str | None
    reason: str
    approver_role: str | None
    token_ttl_s: int | None
    frozen_by: str | None
    trace: list[TraceOut]
    state: OpState = Field(description="The state a request would get now.")


class OpOut(BaseModel):
    """An operation as the API shows it (the signed token itself is never shown)."""

    id: str = Field(description="Also the token's `jti` and the message's `Nats-Msg-Id`.")
    op_type: str
    target: str
    image: str | None
    params: dict[str, Any]
    params_sha256: str
    reason: str | None
    requester: str
    requester_name: str
    state: OpState
    decision: Literal["approve", "reject", "require_approval"]
    policy: str | None
    decision_reason: str
    frozen_by: str | None
    approver_role: str | None
    token_ttl_s: int | None
    trace: list[TraceOut]
    approver: str | None
    approver_name: str | None
    approver_reason: str | None
    jti: str | None
    token_expires_at: datetime | None
    approval_expires_at: datetime | None
    publish_attempts: int
    last_publish_error: str | None
    stream_seq: int | None
    expired_reason: str | None
    created_at: datetime
    updated_at: datetime
    decided_at: datetime | None
    published_at: datetime | None


class FreezeOut(BaseModel):
    id: str
    reason: str
    scope: str
    until: datetime | None
    created_by: str
    created_by_name: str
    created_at: datetime
    ended_at: datetime | None
    ended_by: str | None
    active: bool
