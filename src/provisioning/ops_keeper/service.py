"""The ops-keeper's logic: decide, record, sign, publish (DESIGN §7).

::

    POST /ops ──decide (policy + active freezes)──▶ rejected
                     │                        └──▶ pending_approval ──approve──▶ approved
                     └──▶ approved ─(row holds the signed token)─────────────────────┘
                                       │ publish ops.pending.<op_type>, Nats-Msg-Id = jti
                                       ▼
                                   published            (or expired, see below)

**Publishing never gets lost.** The decision and the signed token are committed in one write
(state ``approved``); only then is the token published, and only after JetStream acknowledged it
is the row moved to ``published`` (and the token dropped). A crash or a NATS failure between
the two leaves the row ``approved``: the publisher loop (:meth:`KeeperService.run_publisher`)
claims such rows once their ``next_attempt_at`` is due and publishes the *same* token with the
same ``Nats-Msg-Id``, so a message that did reach the stream before the crash is dropped as a
duplicate by JetStream (within ``nats.duplicate_window_s``; the controller's ``jti`` record
catches any later one). A token that expires before it could be published ends the operation as
``expired`` rather than being signed again: an approval is for the token's lifetime only.

**Every decision is audited, through a transactional outbox.** Each state change above (the
decision on a request, an approver's approval or rejection, an expiry, the publication) and each
freeze started or lifted writes an ``AuditEvent`` into the store's audit outbox in the same
transaction (:class:`~provisioning.ops_keeper.store.OutboxEvent`). The publisher loop relays the
outbox to ``ops.audit.<outcome>`` (:meth:`KeeperService.relay_audit`), oldest first, with
``Nats-Msg-Id`` = the event id, and deletes each event once JetStream acknowledged it; a crash in
between publishes it again and JetStream drops the repeat. While NATS is down the events wait.

* ``ops:request`` by the requester: ``approved`` or ``pending_approval`` (``success``), or
  ``rejected`` (``denied``: by a policy, a freeze, or no match);
* ``ops:approve`` / ``ops:reject`` by the approver (or the requester withdrawing):
  ``approved`` / ``rejected`` (``success``);
* ``ops:expire`` and ``ops:publish`` by the keeper itself (actor ``ops-keeper``, ``system``):
  ``expired``, ``published``;
* ``ops:freeze`` / ``ops:unfreeze`` by who started or lifted the freeze: ``frozen`` /
  ``unfrozen``.

An event never holds the parameters (they may hold secrets; ``params_sha256`` binds them) nor
the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from provisioning.core.auth import Identity
from provisioning.core.bus import Bus
from provisioning.core.clock import as_utc, utcnow
from provisioning.core.errors import (
    ConfigError,
    Forbidden,
    InvalidState,
    Unreachable,
    ValidationError,
)
from provisioning.core.logging import get_logger
from provisioning.core.settings import OpsKeeperSettings
from provisioning.core.signing import KeyRing, verify_with_ring
from provisioning.ops_keeper.api import (
    FreezeIn,
    OpRequestIn,
    OpsClaims,
    OpState,
    PendingMessage,
    params_sha256,
    pending_subject,
)
from provisioning.ops_keeper.policy import (
    DEFAULT_APPROVER_ROLE,
    Decision,
    DecisionKind,
    OpRequest,
    PolicyFile,
)
from provisioning.ops_keeper.store import KeeperStore, OutboxEvent
from provisioning.workspace.api import DOMAIN_OP_TYPES, op_target

__all__ = ["KeeperService", "KeeperStats"]

log = get_logger("ops_keeper")

_STATE_OF: dict[DecisionKind, OpState] = {
    "approve": OpState.APPROVED,
    "reject": OpState.REJECTED,
    "require_approval": OpState.PENDING_APPROVAL,
}
#: Holders of this role count as holding every approver role.
SUPER_ROLE = "admin"
_MAX_RETRY_DELAY_S = 60.0
#: The keeper's name as a service and as the actor of what it does by itself.
SERVICE = "ops-keeper"
AUDIT_SUBJECT = "ops.audit.{outcome}"
#: Events relayed per batch, and batches per publisher turn.
AUDIT_BATCH, AUDIT_BATCHES = 100, 10


def _rfc3339(at: datetime) -> str:
    utc = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _iso(at: datetime | None) -> str | None:
    return None if at is None else _rfc3339(at)


def _audit_event(
    outcome: str,
    action: str,
    *,
    at: datetime,
    actor: str,
    actor_type: str,
    object_type: str,
    object_id: str,
    details: dict[str, Any],
    result: str = "success",
) -> OutboxEvent:
    """The ``AuditEvent`` of one decision, for ``ops.audit.<outcome>`` (the fields of the
    control center's ``ForwardedEvent``)."""
    return OutboxEvent(
        AUDIT_SUBJECT.format(outcome=outcome),
        {
            "id": str(uuid.uuid4()),
            "ts": _rfc3339(at),
            "action": action,
            "result": result,
            "actor": actor,
            "actor_type": actor_type,
            "object_type": object_type,
            "object_id": object_id,
            "service": SERVICE,
            "details": details,
        },
    )


def _op_event(
    op: Mapping[str, Any],
    action: str,
    *,
    at: datetime,
    who: Identity | None = None,
    result: str = "success",
    **details: Any,
) -> OutboxEvent:
    """The audit event of an operation now in ``op["state"]``; ``who`` None: the keeper itself.
    Never the params (only their digest) nor the token."""
    state = str(op["state"])
    base = {
        "op_type": op["op_type"],
        "target": op["target"],
        "image": op["image"],
        "state": state,
        "decision": op["decision"],
        "policy": op["policy"],
        "params_sha256": op["params_sha256"],
        "requester": op["requester"],
        "requester_name": op["requester_name"],
        "approved_by": None,  # the approver's user id, where one approved it
        "frozen_by": op.get("frozen_by"),
    }
    return _audit_event(
        state,
        action,
        at=at,
        actor=who.username if who else SERVICE,
        actor_type=who.kind if who else "system",
        object_type="Operation",
        object_id=str(op["id"]),
        details={**base, **details},
        result=result,
    )


def _freeze_event(
    freeze: Mapping[str, Any], action: str, outcome: str, who: Identity
) -> OutboxEvent:
    """The audit event of a freeze started (``frozen``) or lifted (``unfrozen``)."""
    at = freeze["ended_at"] if outcome == "unfrozen" else freeze["created_at"]
    return _audit_event(
        outcome,
        action,
        at=at,
        actor=who.username,
        actor_type=who.kind,
        object_type="Freeze",
        object_id=str(freeze["id"]),
        details={
            "scope": freeze["scope"],
            "reason": freeze["reason"],
            "until": _iso(freeze["until"]),
            "created_by": freeze["created_by"],
            "ended_by": freeze.get("ended_by"),
        },
    )


def _expired_event(op: dict[str, Any], former: str) -> OutboxEvent:
    return _op_event(
        op,
        "ops:expire",
        at=op["updated_at"],
        reason=op["expired_reason"],
        former_state=former,
        approved_by=op["approver"] if former == OpState.APPROVED.value else None,
    )


@dataclass
class KeeperStats:
    """Counters since start, for ``/metrics``."""

    decisions: dict[str, int] = field(default_factory=dict)
    published: int = 0
    duplicates: int = 0
    publish_failures: int = 0
    expired: int = 0
    loop_errors: int = 0
    audit_published: int = 0
    audit_failures: int = 0


class KeeperService:
    """Decisions, approvals, freezes and publishing on one store, key ring and bus.

    ``bus`` is the connected bus to publish on; without one, ``connect_bus`` is called (by the
    publisher loop, at most every ``retry_interval_s``) until it answers one. ``retry_interval_s``
    paces the publisher loop and is the first retry delay of a failed publication (doubling up
    to a minute).
    """

    def __init__(
        self,
        store: KeeperStore,
        ring: KeyRing,
        settings: OpsKeeperSettings,
        *,
        bus: Bus | None = None,
        connect_bus: Callable[[], Awaitable[Bus]] | None = None,
        retry_interval_s: float = 2.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if retry_interval_s <= 0:
            raise ValueError("retry_interval_s must be > 0")
        self.store = store
        self.ring = ring
        self.settings = settings
        self.bus = bus
        self._connect_bus = connect_bus
        self._next_connect = datetime.min.replace(tzinfo=UTC)
        self.retry_interval_s = retry_interval_s
        self.clock = clock
        self.policy_file: PolicyFile | None = None
        self.stats = KeeperStats()
        self._audit_error: str | None = None

    # ------------------------------------------------------------------ decisions

    @property
    def policy(self) -> PolicyFile:
        """Raises: ConfigError before the service started."""
        if self.policy_file is None:
            raise ConfigError("the ops-keeper has not loaded its policy yet")
        return self.policy_file

    async def _decide(self, req: OpRequestIn, who: Identity, now: datetime) -> Decision:
        """Raises: ValidationError: a workspace request (params with an ``infra``) whose
        target is not the one its params name: policies decide on the target, so it must say
        what the op does. (The orchestrator refuses such an op at dispatch in any case; this
        tells the requester now.)"""
        if req.op_type in DOMAIN_OP_TYPES and "infra" in req.params:
            named = op_target(req.op_type, req.params)
            if req.target != named:
                raise ValidationError(
                    f"target {req.target!r} is not what the params of {req.op_type} name: "
                    f"use {named!r}",
                    field="target",
                )
        request = OpRequest(req.op_type, req.target, req.image, who.subject, req.params)
        freezes = await self.store.active_freezes(now)
        return self.policy.current.decide(request, freezes, now)

    async def evaluate(self, req: OpRequestIn, who: Identity) -> dict[str, Any]:
        """What the keeper would decide on ``req`` now and why; records nothing."""
        decision = await self._decide(req, who, self.clock())
        return {**decision.to_dict(), "state": _STATE_OF[decision.decision].value}

    async def request(self, req: OpRequestIn, who: Identity) -> dict[str, Any]:
        """Decide on ``req``, record the operation, and publish it when approved.

        A failed publication does not fail the request: the operation stays ``approved`` and
        the publisher loop retries it.
        """
        now = self.clock()
        decision = await self._decide(req, who, now)
        state = _STATE_OF[decision.decision]
        op_id = str(uuid.uuid4())
        row: dict[str, Any] = {
            "id": op_id,
            "op_type": req.op_type,
            "target": req.target,
            "image": req.image,
            "params": req.params,
            "params_sha256": params_sha256(req.params),
            "reason": req.reason,
            "requester": who.subject,
            "requester_name": who.username,
            "state": state.value,
            "decision": decision.decision,
            "policy": decision.policy,
            "decision_reason": decision.reason,
            "frozen_by": decision.frozen_by,
            "approver_role": decision.approver_role,
            "token_ttl_s": decision.token_ttl_s,
            "trace": [t.to_dict() for t in decision.trace],
            "publish_attempts": 0,
            "created_at": now,
            "updated_at": now,
        }
        token: str | None = None
        if state is OpState.APPROVED:
            token, claims = self._sign(row, approved_by=None, ttl_s=decision.token_ttl_s)
            row.update(self._signed(op_id, token, claims, now), decided_at=now)
        elif state is OpState.PENDING_APPROVAL:
            row["approval_expires_at"] = now + timedelta(seconds=self.settings.approval_ttl_s)
        else:
            row["decided_at"] = now
        audit = _op_event(
            row,
            "ops:request",
            at=now,
            who=who,
            result="denied" if state is OpState.REJECTED else "success",
            reason=decision.reason,
            request_reason=req.reason,
            approver_role=decision.approver_role,
            approval_expires_at=_iso(row.get("approval_expires_at")),
        )
        await self.store.insert_op(row, audit)
        self.stats.decisions[decision.decision] = self.stats.decisions.get(decision.decision, 0) + 1
        log.info(
            "operation decided",
            extra={
                "op_id": op_id,
                "op_type": req.op_type,
                "target": req.target,
                "state": state.value,
                "policy": decision.policy,
                "requester": who.username,
            },
        )
        if token is not None:
            await self._publish(row, token, attempts=0)
        return await self.store.get_op(op_id)

    # ------------------------------------------------------------------ approvals

    async def approve(self, op_id: str, who: Identity, reason: str) -> dict[str, Any]:
        """Approve a pending operation: sign and publish it.

        Raises:
            NotFound: no such operation.
            InvalidState: it is not pending (any more), its approval window ended, or a change
                freeze now covers its target.
            Forbidden: ``who`` requested it, or does not hold the approver role its policy
                names (``admin`` counts as holding every role).
        """
        now = self.clock()
        op = await self._pending(op_id, now, "approve")
        self._check_approver(op, who, "approve")
        for freeze in await self.store.active_freezes(now):
            if freeze.covers(op["target"]):
                raise InvalidState(
                    f"{freeze.describe(op['target'])}; approve the operation once the freeze is "
                    "lifted",
                    frozen_by=freeze.id,
                )
        token, claims = self._sign(op, approved_by=who.subject, ttl_s=op["token_ttl_s"])
        values = {
            **self._signed(op_id, token, claims, now),
            "state": OpState.APPROVED.value,
            "approver": who.subject,
            "approver_name": who.username,
            "approver_reason": reason,
            "decided_at": now,
        }
        approved = {**op, **values}
        audit = _op_event(
            approved, "ops:approve", at=now, who=who, reason=reason, approved_by=who.subject
        )
        await self._transition(op_id, OpState.PENDING_APPROVAL, values, "approved", audit)
        log.info("operation approved", extra={"op_id": op_id, "approver": who.username})
        await self._publish(approved, token, attempts=0)
        return await self.store.get_op(op_id)

    async def reject(self, op_id: str, who: Identity, reason: str) -> dict[str, Any]:
        """Reject a pending operation (its requester may withdraw it so too).

        Raises:
            NotFound, InvalidState, Forbidden: as :meth:`approve`, except that the requester may
                reject their own request.
        """
        now = self.clock()
        op = await self._pending(op_id, now, "reject")
        self._check_approver(op, who, "reject")
        values = {
            "state": OpState.REJECTED.value,
            "approver": who.subject,
            "approver_name": who.username,
            "approver_reason": reason,
            "decided_at": now,
            "updated_at": now,
        }
        audit = _op_event(
            {**op, **values},
            "ops:reject",
            at=now,
            who=who,
            reason=reason,
            rejected_by=who.subject,
            withdrawn=who.subject == op["requester"],
        )
        await self._transition(op_id, OpState.PENDING_APPROVAL, values, "rejected", audit)
        log.info("operation rejected", extra={"op_id": op_id, "approver": who.username})
        return await self.store.get_op(op_id)

    async def _pending(self, op_id: str, now: datetime, verb: str) -> dict[str, Any]:
        op = await self.store.get_op(op_id)
        if op["state"] != OpState.PENDING_APPROVAL.value:
            raise InvalidState(
                f"operation {op_id} is {op['state']}; only an operation in pending_approval "
                f"can be {verb}d",
                state=op["state"],
            )
        until = op["approval_expires_at"]
        if until is not None and now >= until:
            await self._expire(now)
            raise InvalidState(
                f"operation {op_id} waited for approval until {until.isoformat()} and expired; "
                "request it again",
                state=OpState.EXPIRED.value,
            )
        return op

    def _check_approver(self, op: Mapping[str, Any], who: Identity, verb: str) -> None:
        role = op["approver_role"] or DEFAULT_APPROVER_ROLE
        own = who.subject == op["requester"]
        if own and verb == "approve":
            raise Forbidden(
                f"{who.username} requested operation {op['id']} and may not approve it: it "
                f'needs the approval of another user holding role "{role}" (no self-approval)',
                reason="self_approval",
            )
        if own or role in who.roles or SUPER_ROLE in who.roles:
            return
        raise Forbidden(
            f'{who.username} does not hold role "{role}", which policy "{op["policy"]}" '
            f"requires to {verb} operation {op['id']}",
            reason="approver_role",
            approver_role=role,
        )

    async def _transition(
        self,
        op_id: str,
        from_state: OpState,
        values: dict[str, Any],
        verb: str,
        audit: OutboxEvent,
    ) -> None:
        if not await self.store.update_if(op_id, from_state, values, audit):
            current = await self.store.get_op(op_id)
            raise InvalidState(
                f"operation {op_id} is {current['state']} now and cannot be {verb}",
                state=current["state"],
            )

    # ------------------------------------------------------------------ signing

    def _sign(
        self, op: Mapping[str, Any], *, approved_by: str | None, ttl_s: int | None
    ) -> tuple[str, OpsClaims]:
        claims = {
            "sub": op["requester"],
            "jti": op["id"],
            "op_type": op["op_type"],
            "target": op["target"],
            "image": op["image"],
            "params_sha256": op["params_sha256"],
            "policy": op["policy"],
            "approved_by": approved_by,
        }
        cfg = self.settings
        token = self.ring.sign(
            claims, audience=cfg.token_audience, ttl_s=float(ttl_s or 300), issuer=cfg.issuer
        )
        # Read back through the verifier: what is published is known to verify.
        verified = verify_with_ring(
            self.ring, token, cfg.token_audience, issuer=cfg.issuer, leeway_s=0
        )
        return token, OpsClaims.from_dict(verified)

    def _signed(self, op_id: str, token: str, claims: OpsClaims, now: datetime) -> dict[str, Any]:
        return {
            "jti": op_id,
            "token": token,
            "token_expires_at": datetime.fromtimestamp(claims.exp, UTC),
            # The request publishes at once; the loop steps in only if that never finishes.
            "next_attempt_at": now + timedelta(seconds=3 * self.retry_interval_s),
            "updated_at": now,
        }

    def jwks(self) -> dict[str, Any]:
        """The public keys that verify operation tokens (current and still-valid old ones)."""
        return self.ring.jwks()

    async def rotate_keys(self) -> dict[str, Any]:
        """A new signing key; the old one stays in the JWKS for ``key_overlap_s``."""
        new = await asyncio.to_thread(self.ring.rotate, self.settings.key_overlap_s)
        log.info("ops-keeper signing key rotated", extra={"kid": new.kid})
        return {"kid": new.kid, "jwks": self.ring.jwks()}

    # ------------------------------------------------------------------ publishing

    async def _publish(
        self, op: Mapping[str, Any], token: str, *, attempts: int, connect: bool = False
    ) -> bool:
        """Publish one approved operation; on success move it to ``published``. ``connect``:
        connect the bus if there is none (the loop's job; a request never waits for it)."""
        op_id = op["id"]
        try:
            bus = await self._get_bus(connect)
            message = PendingMessage(token, dict(op["params"])).to_bytes()
            ack = await bus.publish(pending_subject(op["op_type"]), message, msg_id=op_id)
        except Exception as exc:  # any failure: the row stays approved and is retried
            self.stats.publish_failures += 1
            error = f"{type(exc).__name__}: {exc}"
            delay = min(self.retry_interval_s * 2**attempts, _MAX_RETRY_DELAY_S)
            log.warning(
                "operation not published yet; will retry",
                extra={"op_id": op_id, "error": error, "retry_in_s": delay},
            )
            with contextlib.suppress(Exception):  # the store may be what failed
                retry_at = self.clock() + timedelta(seconds=delay)
                await self.store.publish_failed(op_id, error, retry_at)
            return False
        now = self.clock()
        if ack.duplicate:
            self.stats.duplicates += 1
        else:
            self.stats.published += 1
        values = {
            "state": OpState.PUBLISHED.value,
            "token": None,
            "next_attempt_at": None,
            "stream_seq": ack.seq,
            "published_at": now,
            "updated_at": now,
            "last_publish_error": None,
            "publish_attempts": attempts + 1,
        }
        audit = _op_event(
            {**op, **values},
            "ops:publish",
            at=now,
            approved_by=op.get("approver"),
            subject=pending_subject(op["op_type"]),
            stream_seq=ack.seq,
            duplicate=ack.duplicate,
        )
        await self.store.update_if(op_id, OpState.APPROVED, values, audit)
        log.info(
            "operation published",
            extra={"op_id": op_id, "seq": ack.seq, "duplicate": ack.duplicate},
        )
        return True

    async def _get_bus(self, connect: bool) -> Bus:
        if self.bus is not None:
            return self.bus
        if self._connect_bus is None:
            raise Unreachable("the ops-keeper has no message bus to publish on")
        if not connect:
            raise Unreachable("NATS is not connected; the publisher retries in the background")
        now = self.clock()
        if now < self._next_connect:
            raise Unreachable("NATS is not connected; retrying shortly")
        self._next_connect = now + timedelta(seconds=self.retry_interval_s)
        self.bus = await self._connect_bus()
        return self.bus

    async def _expire(self, now: datetime) -> None:
        for op_id, former in await self.store.expire(now, _expired_event):
            self.stats.expired += 1
            log.warning("operation expired", extra={"op_id": op_id, "was": former})

    async def publish_due(self) -> int:
        """One turn of the publisher: expire what waited too long, publish every ``approved``
        operation whose next try is due, then relay the audit outbox (a failure to relay is
        logged once and retried next turn). Answers how many operations were published."""
        now = self.clock()
        await self._expire(now)
        lease = max(30.0, 10 * self.retry_interval_s)
        done = 0
        for op in await self.store.claim_due(now, lease, limit=100):
            attempts = op["publish_attempts"]
            if await self._publish(op, str(op["token"]), attempts=attempts, connect=True):
                done += 1
        try:
            await self.relay_audit()
        except Exception as exc:  # NATS down: the events wait in the outbox
            self.stats.audit_failures += 1
            error = f"{type(exc).__name__}: {exc}"
            if error != self._audit_error:
                log.warning("audit events wait in the outbox", extra={"error": error})
            self._audit_error = error
        else:
            if self._audit_error is not None:
                log.info("audit events are published again")
            self._audit_error = None
        return done

    async def relay_audit(self) -> int:
        """Publish the audit outbox to ``ops.audit.<outcome>``, oldest first, ``Nats-Msg-Id`` =
        the event id, deleting each batch's published events once JetStream acknowledged them.
        At most ``AUDIT_BATCHES`` batches of ``AUDIT_BATCH``. Answers how many were published.

        Raises:
            Unreachable: there is no bus (yet).
            Exception: what the bus raised; the events acknowledged before it are deleted, the
                rest wait for the next try.
        """
        total = 0
        for _ in range(AUDIT_BATCHES):
            pending = await self.store.audit_pending(AUDIT_BATCH)
            if not pending:
                break
            bus = await self._get_bus(connect=True)
            acked: list[int] = []
            try:
                for seq, subject, event in pending:
                    await bus.publish(subject, _canonical(event), msg_id=str(event["id"]))
                    acked.append(seq)
            finally:
                await self.store.audit_done(acked)
                self.stats.audit_published += len(acked)
                total += len(acked)
            if len(pending) < AUDIT_BATCH:
                break
        return total

    async def run_publisher(self, stop: asyncio.Event) -> None:
        """Call :meth:`publish_due` every ``retry_interval_s`` until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.publish_due()
            except Exception:  # the loop must outlive any one failure
                self.stats.loop_errors += 1
                log.exception("ops-keeper publisher turn failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.retry_interval_s)

    # ------------------------------------------------------------------ freezes and reads

    async def freeze(self, body: FreezeIn, who: Identity) -> dict[str, Any]:
        now = self.clock()
        row = {
            "id": str(uuid.uuid4()),
            "reason": body.reason,
            "scope": body.scope,
            "until": as_utc(body.until),
            "created_by": who.subject,
            "created_by_name": who.username,
            "created_at": now,
        }
        audit = _freeze_event(row, "ops:freeze", "frozen", who)
        doc = await self.store.insert_freeze(row, now, audit)
        log.warning(
            "change freeze started",
            extra={"freeze_id": row["id"], "scope": body.scope, "by": who.username},
        )
        return doc

    async def unfreeze(self, freeze_id: str, who: Identity) -> dict[str, Any]:
        """Raises: NotFound."""
        doc = await self.store.end_freeze(
            freeze_id,
            who.subject,
            self.clock(),
            lambda freeze: _freeze_event(freeze, "ops:unfreeze", "unfrozen", who),
        )
        log.warning("change freeze lifted", extra={"freeze_id": freeze_id, "by": who.username})
        return doc

    async def list_freezes(self, state: str) -> list[dict[str, Any]]:
        return await self.store.list_freezes(state, self.clock())

    def policy_status(self) -> dict[str, Any]:
        """The policy file: what is loaded, and Nickel's error if the file on disk is broken."""
        current = self.policy.current
        return {**self.policy.status(), "names": current.names}


def _canonical(event: Mapping[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, compact, UTF-8), so anyone can re-hash an event."""
    return json.dumps(
        event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
