"""The control center's REST routes: auth, users, roles, API keys, audit, authz, keys."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from provisioning import __version__
from provisioning.control_center.api import (
    ApiKeyCreate,
    AuditIngest,
    AuthzCheck,
    IntrospectRequest,
    LoginRequest,
    LogoutRequest,
    MfaConfirm,
    RefreshRequest,
    UserCreate,
    UserStateRequest,
    UserUpdate,
)
from provisioning.control_center.service import Actor, IdentityService
from provisioning.core.auth import Guard, Identity
from provisioning.core.errors import NotFound, ValidationError
from provisioning.core.rbac import ACTIONS, ROLES, Principal, Resource
from provisioning.core.web import envelope

__all__ = ["build_router"]

Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]


def actor_of(request: Request, identity: Identity | None = None) -> Actor:
    client = request.client.host if request.client else None
    return Actor(
        identity=identity or getattr(request.state, "identity", None),
        source=client,
        request_id=request.headers.get("x-request-id"),
    )


def build_router(svc: IdentityService, guard: Guard, started: float) -> APIRouter:
    r = APIRouter()
    registry = CollectorRegistry()

    def need(action: str) -> Any:
        return Depends(guard.require(action))

    @r.get("/health", tags=["system"], summary="Liveness")
    async def health() -> Response:
        return envelope(
            {
                "status": "ok",
                "service": "control-center",
                "version": __version__,
                "uptime_s": round(time.monotonic() - started, 3),
            }
        )

    @r.get("/metrics", tags=["system"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @r.get("/.well-known/jwks.json", tags=["auth"], summary="Public keys of the token signers")
    async def jwks() -> Response:
        return Response(
            content=__import__("json").dumps(svc.ring.jwks()),
            media_type="application/json",
            headers={"Cache-Control": "max-age=60"},
        )

    # ---------------------------------------------------------------- auth
    @r.post("/auth/login", tags=["auth"], summary="Log in: access token + refresh token")
    async def login(body: LoginRequest, request: Request) -> Response:
        return envelope(
            await svc.login(body.username, body.password, body.mfa_code, actor_of(request))
        )

    @r.post("/auth/refresh", tags=["auth"], summary="Trade a refresh token for new tokens")
    async def refresh(body: RefreshRequest, request: Request) -> Response:
        return envelope(await svc.refresh(body.refresh_token, actor_of(request)))

    @r.post("/auth/introspect", tags=["auth"], summary="Check an API key (for other services)")
    async def introspect(body: IntrospectRequest, request: Request) -> Response:
        who = await svc.api_key(body.api_key)
        return envelope(who.public())

    @r.post("/auth/user-state", tags=["auth"], summary="Revocation state of a user (services)")
    async def user_state(body: UserStateRequest) -> Response:
        return envelope(await svc.user_state(body.user_id, body.session))

    @r.post("/auth/logout", tags=["auth"], summary="End this login")
    async def logout(
        request: Request,
        body: LogoutRequest | None = None,
        who: Identity = Depends(guard.authenticated()),
    ) -> Response:
        await svc.logout(who, body.refresh_token if body else None, actor_of(request, who))
        return envelope({"logged_out": True})

    @r.get("/auth/whoami", tags=["auth"], summary="Who the credentials belong to")
    async def whoami(who: Identity = Depends(guard.authenticated())) -> Response:
        return envelope(who.public())

    @r.post("/auth/mfa/enroll", tags=["auth"], summary="Start TOTP enrolment")
    async def mfa_enroll(
        request: Request, who: Identity = Depends(guard.authenticated())
    ) -> Response:
        return envelope(await svc.mfa_enroll(who, actor_of(request, who)))

    @r.post("/auth/mfa/confirm", tags=["auth"], summary="Confirm TOTP enrolment with a code")
    async def mfa_confirm(
        body: MfaConfirm, request: Request, who: Identity = Depends(guard.authenticated())
    ) -> Response:
        await svc.mfa_confirm(who, body.code, actor_of(request, who))
        return envelope({"mfa_enabled": True})

    # ---------------------------------------------------------------- users and roles
    @r.get("/users", tags=["users"], summary="List users")
    async def list_users(who: Identity = need("user:read")) -> Response:
        users = await svc.list_users()
        return envelope(
            [u for u in users if guard.allows(who, "user:read", Resource("User", u["id"]))]
        )

    @r.post("/users", status_code=201, tags=["users"], summary="Create a user")
    async def create_user(
        body: UserCreate, request: Request, who: Identity = need("user:manage")
    ) -> Response:
        doc = await svc.create_user(
            body.username, body.password, body.roles, actor_of(request, who)
        )
        return envelope(doc, status=201)

    @r.get("/users/{user_id}", tags=["users"], summary="Show a user (id or name)")
    async def get_user(
        user_id: str, request: Request, who: Identity = need("user:read")
    ) -> Response:
        uid = await svc.find_user_id(user_id)
        await guard.check_object(request, who, "user:read", Resource("User", uid))
        return envelope(await svc.get_user(uid))

    @r.patch("/users/{user_id}", tags=["users"], summary="Change roles, disable, set password")
    async def update_user(
        user_id: str, body: UserUpdate, request: Request, who: Identity = need("user:manage")
    ) -> Response:
        uid = await svc.find_user_id(user_id)
        doc = await svc.update_user(uid, actor_of(request, who), **body.model_dump())
        return envelope(doc)

    @r.get("/roles", tags=["users"], summary="The roles and what they may do")
    async def roles(who: Identity = need("user:read")) -> Response:
        out = []
        for name, desc in ROLES.items():
            p = Principal(f"role-probe-{name}", roles=frozenset({name}))
            allowed = [
                a
                for a in ACTIONS
                if svc.authorizer.decide(p, a, Resource.platform()).allowed
                or svc.authorizer.decide(p, a, Resource("Workflow", "x", owner=p.user_id)).allowed
            ]
            out.append({"name": name, "description": desc, "actions": allowed})
        return envelope(out)

    # ---------------------------------------------------------------- API keys
    @r.get("/apikeys", tags=["apikeys"], summary="List API keys (own; all with apikey:admin)")
    async def list_keys(who: Identity = need("apikey:manage"), all_users: bool = False) -> Response:
        everyone = all_users and guard.allows(who, "apikey:admin", Resource.platform())
        return envelope(await svc.list_api_keys(None if everyone else who.subject))

    @r.post("/apikeys", status_code=201, tags=["apikeys"], summary="Create an API key (shown once)")
    async def create_key(
        body: ApiKeyCreate, request: Request, who: Identity = need("apikey:manage")
    ) -> Response:
        if who.kind == "apikey":
            raise ValidationError("an API key cannot create API keys; log in as the user")
        doc = await svc.create_api_key(
            who, body.name, body.scopes, body.expires_in_days, actor_of(request, who)
        )
        return envelope(doc, status=201)

    @r.delete("/apikeys/{key_id}", tags=["apikeys"], summary="Revoke an API key")
    async def revoke_key(
        key_id: str, request: Request, who: Identity = need("apikey:manage")
    ) -> Response:
        key = await svc.get_api_key(key_id)
        if key["user_id"] != who.subject and not guard.allows(
            who, "apikey:admin", Resource.platform()
        ):
            raise NotFound(f"API key {key_id} not found")
        doc = await svc.revoke_api_key(key_id, actor_of(request, who))
        if guard.authenticator is not None:
            guard.authenticator.forget_key(key_id)
        return envelope(doc)

    # ---------------------------------------------------------------- audit
    def _filters(
        actor: str | None,
        action: str | None,
        object_type: str | None,
        object_id: str | None,
        result: str | None,
        since: datetime | None,
        until: datetime | None,
        service: str | None = None,
    ) -> dict[str, Any]:
        return {
            "service": service,
            "actor": actor,
            "action": action,
            "object_type": object_type,
            "object_id": object_id,
            "result": result,
            "since": since,
            "until": until,
        }

    @r.get("/audit", tags=["audit"], summary="Search the audit log")
    async def audit(
        actor: Annotated[str | None, Query(max_length=200)] = None,
        action: Annotated[str | None, Query(max_length=100)] = None,
        object_type: Annotated[str | None, Query(max_length=100)] = None,
        object_id: Annotated[str | None, Query(max_length=200)] = None,
        result: Annotated[str | None, Query(pattern="^(success|denied|failure|error)$")] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        service: Annotated[str | None, Query(max_length=100)] = None,
        limit: Limit = 100,
        offset: Offset = 0,
        who: Identity = need("audit:read"),
    ) -> Response:
        rows = await svc.audit_query(
            limit=limit,
            offset=offset,
            **_filters(actor, action, object_type, object_id, result, since, until, service),
        )
        return envelope(rows)

    @r.get("/audit/export", tags=["audit"], summary="Export the audit log as JSON lines")
    async def audit_export(
        actor: Annotated[str | None, Query(max_length=200)] = None,
        action: Annotated[str | None, Query(max_length=100)] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        who: Identity = need("audit:export"),
    ) -> Response:
        lines = await svc.audit_export(**_filters(actor, action, None, None, None, since, until))
        return PlainTextResponse("".join(lines), media_type="application/x-ndjson")

    @r.post(
        "/audit/ingest",
        tags=["audit"],
        summary="Record audit events forwarded by another service (service API key)",
    )
    async def audit_ingest(body: AuditIngest, who: Identity = need("audit:write")) -> Response:
        events = [e.model_dump() for e in body.events]
        return envelope(await svc.ingest(events, f"prvng_{who.key_id}"))

    @r.get("/audit/verify", tags=["audit"], summary="Check the hash chain of the audit log")
    async def audit_verify(who: Identity = need("audit:read")) -> Response:
        res = await svc.audit_verify()
        return envelope(
            {
                "ok": res.ok,
                "checked": res.checked,
                "first_bad_seq": res.first_bad_seq,
                "reason": res.reason,
                "last_seq": res.last_seq,
            }
        )

    # ---------------------------------------------------------------- authz and keys
    @r.post("/authz/check", tags=["authz"], summary="Would this action be allowed? And why")
    async def authz_check(body: AuthzCheck, who: Identity = need("authz:check")) -> Response:
        res = body.resource
        try:
            resource = Resource(res.type, res.id, owner=res.owner)
        except ValueError as exc:
            raise ValidationError(str(exc), field="resource") from None
        decision = svc.authorizer.decide(who.principal(), body.action, resource)
        return envelope(
            {
                "allowed": decision.allowed,
                "policies": decision.policies,
                "errors": decision.errors,
                "action": body.action,
                "principal": who.public(),
            }
        )

    @r.post("/keys/rotate", tags=["auth"], summary="Rotate the token signing key")
    async def rotate(request: Request, who: Identity = need("keys:rotate")) -> Response:
        return envelope(await svc.rotate_keys(actor_of(request, who)))

    return r
