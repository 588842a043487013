"""Authentication and authorization for every HTTP service: one middleware, one guard.

Who is asking (:class:`Authenticator`):

* ``Authorization: Bearer <access JWT>`` — verified locally against the control center's key
  set (``core.signing.TokenVerifier``: EdDSA only, known ``kid``, ``exp``/``aud``), then checked
  against the revocation state of its user (disabled, or sessions ended after the token was
  issued) which the :class:`IdentityProvider` keeps.
* ``Authorization: Bearer prvng_<id>_<secret>`` or ``X-API-Key: prvng_…`` — an API key, checked
  by the control center through the :class:`IdentityProvider`; answers are cached briefly
  (``api_key_cache_s``), keyed by a hash of the key.

What they may do (:class:`Guard`): each route declares its action (``guard.require("workflow:
create")``); Cedar decides (``core.rbac.Authorizer``). ``/health`` and ``/metrics`` never ask.
Objects of other owners answer 404, not 403 (:meth:`Guard.check_object`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from provisioning.core.errors import Forbidden, NotFound, Unauthorized
from provisioning.core.logging import get_logger
from provisioning.core.rbac import Authorizer, Principal, Resource
from provisioning.core.signing import TokenVerifier

__all__ = [
    "AuditHook",
    "Authenticator",
    "Guard",
    "Identity",
    "IdentityProvider",
    "install_mutation_audit",
]

log = get_logger("auth")


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    subject: str  # user id
    username: str
    roles: tuple[str, ...]
    kind: str  # "user" (access token) | "apikey"
    mfa: bool = False
    scopes: tuple[str, ...] | None = None
    key_id: str | None = None
    issued_at: float | None = None
    session: str | None = None  # refresh-token family of a login
    enrol_mfa: bool = False  # must enrol TOTP before doing anything else
    expires_at: float | None = None  # epoch seconds; an API key's expiry

    def principal(self) -> Principal:
        return Principal(
            self.subject,
            roles=frozenset(self.roles),
            mfa=self.mfa,
            scopes=None if self.scopes is None else frozenset(self.scopes),
        )

    def public(self) -> dict[str, Any]:
        """What ``whoami`` shows."""
        return {
            "id": self.subject,
            "username": self.username,
            "roles": list(self.roles),
            "kind": self.kind,
            "mfa": self.mfa,
            "scopes": None if self.scopes is None else list(self.scopes),
            "key_id": self.key_id,
            "expires_at": self.expires_at,
        }


class IdentityProvider(Protocol):
    """What a service asks the control center about credentials it cannot check alone.

    Contract: :meth:`api_key` returns the key owner's identity with the key's scopes, or raises
    ``Unauthorized`` (malformed, unknown, revoked, expired key, or disabled owner — one
    message for all). :meth:`revoked` is True when the user is disabled, unknown, or its
    sessions were ended after ``issued_at``, or when the login ``session`` (a token's ``sid``)
    was ended; it must reflect a change on the next request in the embedded platform and
    within a couple of seconds across processes.
    """

    async def api_key(self, key: str) -> Identity: ...

    async def revoked(
        self, user_id: str, issued_at: float | None, session: str | None = None
    ) -> bool: ...


AuditHook = Callable[[Request, Identity | None, str, str, dict[str, Any]], Awaitable[None]]
"""``(request, identity, action, result, details)`` — records a denial in the audit log."""


@dataclass
class Authenticator:
    verifier: TokenVerifier
    provider: IdentityProvider
    api_key_cache_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _keys: dict[str, tuple[float, Identity]] = field(default_factory=dict)
    _tokens: dict[str, tuple[float, Identity, str]] = field(default_factory=dict)

    async def authenticate(self, request: Request) -> Identity | None:
        """The caller, None when the request carries no credentials.

        Raises:
            Unauthorized: credentials are present and not valid.
        """
        header = request.headers.get("authorization")
        api_key = request.headers.get("x-api-key")
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthorized("Authorization must be 'Bearer <token or API key>'")
            value = value.strip()
            if value.startswith("prvng_"):
                api_key = value
            else:
                return await self._token(value)
        if api_key is not None:
            return await self._api_key(api_key)
        return None

    async def _token(self, token: str) -> Identity:
        # A verified token is remembered until it expires or its signing key leaves the key
        # set (rotation): the signature check is the costly part and clients reuse a token for
        # many requests. Revocation is checked every time.
        now = time.time()
        hit = self._tokens.get(token)
        if hit is not None and hit[0] > now and await self.verifier.trusts(hit[2]):
            identity = hit[1]
        else:
            self._tokens.pop(token, None)
            identity, exp, kid = await self._verify(token)
            if len(self._tokens) > 10000:
                self._tokens.clear()
            self._tokens[token] = (exp, identity, kid)
        if await self.provider.revoked(identity.subject, identity.issued_at, identity.session):
            raise Unauthorized("session ended (logged out, user disabled or password changed)")
        return identity

    async def _verify(self, token: str) -> tuple[Identity, float, str]:
        claims, kid = await self.verifier.verify_with_kid(token)
        roles = claims.get("roles")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthorized("token rejected: roles claim missing")
        identity = Identity(
            subject=str(claims["sub"]),
            username=str(claims.get("name") or claims["sub"]),
            roles=tuple(roles),
            kind="user",
            mfa=bool(claims.get("mfa", False)),
            issued_at=float(claims["iat"]),
            session=str(claims["sid"]) if claims.get("sid") else None,
            enrol_mfa=bool(claims.get("enrol_mfa", False)),
        )
        return identity, float(claims["exp"]), kid

    async def _api_key(self, key: str) -> Identity:
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = self.clock()
        hit = self._keys.get(digest)
        if hit is not None and hit[0] > now:
            identity = hit[1]
            if await self.provider.revoked(identity.subject, None):
                self._keys.pop(digest, None)
                raise Unauthorized("API key is not valid")
            return identity
        identity = await self.provider.api_key(key)
        if len(self._keys) > 10000:
            self._keys.clear()
        keep = self.api_key_cache_s
        if identity.expires_at is not None:  # never serve the answer past the key's expiry
            keep = min(keep, identity.expires_at - time.time())
        if keep > 0:
            self._keys[digest] = (now + keep, identity)
        return identity

    def forget_key(self, key_id: str) -> None:
        """Drop cached answers for a key (after its revocation, in this process)."""
        for digest, (_exp, ident) in list(self._keys.items()):
            if ident.key_id == key_id:
                self._keys.pop(digest, None)


class Guard:
    """Route-level authorization: ``Depends(guard.require("workflow:read"))``."""

    def __init__(
        self,
        authenticator: Authenticator | None,
        authorizer: Authorizer,
        *,
        audit: AuditHook | None = None,
    ) -> None:
        self.authenticator = authenticator  # None: authentication disabled (bench, dev only)
        self.authorizer = authorizer
        self.audit = audit
        # Decisions that depend only on the principal and the action (platform level and the
        # owner probe), per policy set; objects' decisions are never cached.
        self._decisions: dict[tuple[Any, ...], bool] = {}
        self._policies_seen: object = None

    def require(self, action: str) -> Callable[[Request], Awaitable[Identity]]:
        async def dependency(request: Request) -> Identity:
            return await self.check(request, action)

        dependency.__name__ = f"require_{action.replace(':', '_')}"
        return dependency

    def authenticated(self) -> Callable[[Request], Awaitable[Identity]]:
        """Any valid credentials, whatever their scopes (whoami, logout, MFA enrolment)."""

        async def dependency(request: Request) -> Identity:
            found = (
                _ANONYMOUS_ADMIN
                if self.authenticator is None
                else await self.authenticator.authenticate(request)
            )
            if found is None:
                raise Unauthorized(
                    "authentication required: log in with `prvng login` or send an API key"
                )
            request.state.identity = found
            return found

        return dependency

    async def check(self, request: Request, action: str) -> Identity:
        """Authenticate and authorize ``action`` on the platform (collection level).

        Raises:
            Unauthorized: no or bad credentials.
            Forbidden: Cedar denies; the message names the action.
        """
        found = (
            _ANONYMOUS_ADMIN
            if self.authenticator is None
            else await self.authenticator.authenticate(request)
        )
        if found is None:
            raise Unauthorized(
                "authentication required: log in with `prvng login` or send an API key"
            )
        identity = found
        request.state.identity = identity
        request.state.action = action
        if identity.enrol_mfa:
            raise Forbidden(
                "your role requires MFA: enrol first (`prvng mfa enroll`), then log in again",
                action=action,
                mfa_enrolment_required=True,
            )
        if self._cached(identity, action, "platform"):
            return identity
        decision = self.authorizer.decide(identity.principal(), action, Resource.platform())
        self._remember(identity, action, "platform", decision.allowed)
        if not decision.allowed and not self._owner_scoped(identity, action):
            if self.audit is not None:
                await self.audit(
                    request, identity, action, "denied", {"policies": decision.policies}
                )
            who = identity.username
            if identity.kind == "apikey":
                who = f"API key prvng_{identity.key_id} of {identity.username}"
            raise Forbidden(f"{who} may not {action}", action=action)
        return identity

    def _owner_scoped(self, identity: Identity, action: str) -> bool:
        # Actions a role may do on its own objects only are allowed at collection level; the
        # object check (check_object) then decides per object.
        if self._cached(identity, action, "own"):
            return True
        kind = _type_of(action)
        # Users own no User objects: a user's own record is the user itself (self-user-read).
        probe = (
            Resource(kind, identity.subject)
            if kind == "User"
            else Resource(kind, "__own__", owner=identity.subject)
        )
        allowed = self.authorizer.decide(identity.principal(), action, probe).allowed
        self._remember(identity, action, "own", allowed)
        return allowed

    def _key(self, identity: Identity, action: str, what: str) -> tuple[Any, ...]:
        return (identity.subject, identity.roles, identity.scopes, identity.mfa, action, what)

    def _cached(self, identity: Identity, action: str, what: str) -> bool:
        if self._policies_seen is not self.authorizer.policies:
            self._decisions.clear()
            self._policies_seen = self.authorizer.policies
        return self._decisions.get(self._key(identity, action, what), False)

    def _remember(self, identity: Identity, action: str, what: str, allowed: bool) -> None:
        if len(self._decisions) > 10000:
            self._decisions.clear()
        self._decisions[self._key(identity, action, what)] = allowed

    def sees_all(self, identity: Identity, action: str) -> bool:
        """May the caller do ``action`` on objects somebody else owns (listing filters)?"""
        if self._cached(identity, action, "others"):
            return True
        other = Resource(_type_of(action), "__others__", owner="\x00someone-else")
        allowed = self.allows(identity, action, other)
        self._remember(identity, action, "others", allowed)
        return allowed

    def allows(self, identity: Identity, action: str, resource: Resource) -> bool:
        return self.authorizer.decide(identity.principal(), action, resource).allowed

    async def check_object(
        self, request: Request, identity: Identity, action: str, resource: Resource
    ) -> None:
        """Authorize ``action`` on one object; another's object the caller may not see is 404.

        Raises:
            NotFound: the caller may not even read the object.
            Forbidden: the caller may read it but not do ``action``.
        """
        if self.allows(identity, action, resource):
            return
        read_action = action.split(":")[0] + ":read"
        if (
            read_action != action
            and read_action in _known_actions()
            and self.allows(identity, read_action, resource)
        ):
            if self.audit is not None:
                await self.audit(request, identity, action, "denied", {"object": resource.id})
            raise Forbidden(f"{identity.username} may not {action} {resource.type} {resource.id}")
        raise NotFound(f"{resource.type.lower()} {resource.id} not found")


_MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def install_mutation_audit(
    app: FastAPI,
    guard: Guard,
    service: str,
    *,
    self_audited: Callable[[str, str], bool] | None = None,
) -> None:
    """Record every mutating request of ``app`` (who, action, object, result) through the
    guard's audit hook, after the response is known. Denials are recorded by the guard.
    Reads pass straight through (a pure ASGI middleware: no cost on GET).

    ``self_audited(method, path)``: requests whose success the service records itself as a
    richer event (the keeper's decisions on ``ops.audit``); only their failures are
    recorded here, so one decision is not in the log twice."""
    if guard.audit is not None:
        app.add_middleware(
            _MutationAudit, hook=guard.audit, service=service, self_audited=self_audited
        )


class _MutationAudit:
    def __init__(
        self,
        app: ASGIApp,
        hook: AuditHook,
        service: str,
        self_audited: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.app = app
        self.hook = hook
        self.service = service
        self.self_audited = self_audited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _MUTATING:
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            own = (
                status < 400
                and self.self_audited is not None
                and self.self_audited(scope["method"], scope["path"])
            )
            if status not in (401, 403) and not own:
                await self._record(Request(scope), status)

    async def _record(self, request: Request, status: int) -> None:
        state = request.state
        action = getattr(state, "action", None) or f"{self.service}:{request.method.lower()}"
        who = getattr(state, "identity", None)
        params = request.scope.get("path_params") or {}
        details: dict[str, Any] = {"status": status}
        created = getattr(state, "audit_object", None)  # (type, id) a route made
        obj = params.get("workflow_id") or params.get("task_id")
        if created is not None:
            details["object_type"], details["object"] = created
        elif obj:
            details["object"] = obj
            details["object_type"] = "Workflow" if "workflow_id" in params else "Task"
        try:
            await self.hook(request, who, action, "success" if status < 400 else "failure", details)
        except Exception:
            log.exception("could not record the audit event", extra={"action": action})


_ANONYMOUS_ADMIN = Identity("auth-disabled", "auth-disabled", ("admin",), "user", mfa=True)

_TYPES = {
    "workflow": "Workflow",
    "task": "Task",
    "ops": "Operation",
    "user": "User",
    "role": "Role",
    "apikey": "ApiKey",
    "server": "Server",
    "taskserv": "Taskserv",
    "cluster": "Cluster",
    "extension": "Extension",
}


def _type_of(action: str) -> str:
    return _TYPES.get(action.split(":")[0], "Platform")


def _known_actions() -> frozenset[str]:
    from provisioning.core.rbac import ACTIONS

    return frozenset(ACTIONS)
