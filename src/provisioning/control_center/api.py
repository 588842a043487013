"""Wire models of the control center API (what clients send)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ApiKeyCreate",
    "AuditIngest",
    "AuthzCheck",
    "AuthzResource",
    "ForwardedEvent",
    "IntrospectRequest",
    "LoginRequest",
    "LogoutRequest",
    "MfaConfirm",
    "RefreshRequest",
    "UserCreate",
    "UserStateRequest",
    "UserUpdate",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginRequest(_Model):
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=4096, repr=False)
    mfa_code: str | None = Field(None, max_length=16)


class RefreshRequest(_Model):
    refresh_token: str = Field(min_length=1, max_length=512, repr=False)


class LogoutRequest(_Model):
    refresh_token: str | None = Field(None, max_length=512, repr=False)


class IntrospectRequest(_Model):
    api_key: str = Field(min_length=1, max_length=256, repr=False)


class UserStateRequest(_Model):
    user_id: str = Field(min_length=1, max_length=64)
    session: str | None = Field(
        None, max_length=64, description="A token's `sid`: is that login still on?"
    )


class MfaConfirm(_Model):
    code: str = Field(min_length=6, max_length=16)


class UserCreate(_Model):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=4096, repr=False)
    roles: list[str] = Field(default_factory=list, max_length=20)


class UserUpdate(_Model):
    roles: list[str] | None = Field(None, max_length=20)
    disabled: bool | None = None
    password: str | None = Field(None, min_length=1, max_length=4096, repr=False)
    end_sessions: bool | None = Field(None, description="Log this user out everywhere.")


class ApiKeyCreate(_Model):
    name: str = Field(min_length=1, max_length=100)
    scopes: list[str] = Field(
        default_factory=list, max_length=64, description="Empty: all the owner may do."
    )
    expires_in_days: float | None = Field(None, gt=0, le=3650)


class AuthzResource(_Model):
    type: str = Field("Platform", max_length=40)
    id: str = Field("platform", max_length=200)
    owner: str | None = Field(None, max_length=200)


class AuthzCheck(_Model):
    action: str = Field(min_length=1, max_length=100)
    resource: AuthzResource = Field(default_factory=AuthzResource)


class ForwardedEvent(_Model):
    """One audit event of another service (see core.audit_relay)."""

    id: str = Field(min_length=1, max_length=36, description="Recorded once per id.")
    action: str = Field(min_length=1, max_length=100, pattern=r"^[a-z_-]+:[a-z_-]+$")
    result: Literal["success", "denied", "failure", "error"]
    actor: str | None = Field(None, max_length=200)
    actor_type: Literal["user", "apikey", "anonymous", "system"]
    object_type: str | None = Field(None, max_length=100)
    object_id: str | None = Field(None, max_length=200)
    source: str | None = Field(None, max_length=100)
    request_id: str | None = Field(None, max_length=100)
    service: str = Field(min_length=1, max_length=100)
    ts: str | None = Field(
        None, max_length=40, description="When it happened at its source (RFC 3339)."
    )
    details: dict[str, Any] = Field(default_factory=dict)


class AuditIngest(_Model):
    events: list[ForwardedEvent] = Field(min_length=1, max_length=500)
