"""The ops-controller's decision for each message on ``ops.pending.>`` (DESIGN §7).

For one delivery: verify it (``core.ops_token.verify_op``), claim its ``jti`` in the
idempotency store, dispatch it, and answer with a named outcome:

* :class:`Ack` — dispatched and recorded ``completed``, or a duplicate of a ``jti`` already done;
* :class:`Nak` with a growing delay — the orchestrator is unreachable or answered 5xx (the
  record stays ``dispatched``; the orchestrator's idempotency key ``jti`` makes a re-dispatch
  harmless);
* :class:`Term` — bad signature, expired, malformed, a 4xx from the orchestrator, or
  ``max_deliver`` exhausted: never retried; recorded ``failed`` when the jti was claimed.

Every terminal outcome of a claimed token writes its audit event in the same transaction
(the store's outbox); :meth:`OpsController.relay_outbox` publishes the outbox to
``ops.audit.<outcome>`` with the event id as ``Nats-Msg-Id``. A refused message whose jti
cannot be trusted is audited straight to ``ops.audit.rejected`` (msg id = the message's
digest, so a redelivery re-publishes the same event, de-duplicated by JetStream) before it is
terminated. While a dispatch is slow, ``in_progress`` keeps the message from redelivery.

An orchestrator that does not answer is waited for rather than retried against: after a
passing failure, when the dispatcher offers ``ready()`` (the HTTP one probes ``GET /health``),
the loop fetches nothing more until it answers again (probing every 0.5, 1, 2, 4, then 5 s).
Messages left in the stream are not delivered meanwhile, so an outage of any length costs each
message at most the delivery that met it, instead of burning through ``max_deliver`` and
failing every op held up by a long outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from provisioning.core.bus import Bus, Delivery
from provisioning.core.errors import InvalidState, Unreachable
from provisioning.core.logging import get_logger
from provisioning.core.ops_token import OpRejected, VerifiedOp, verify_op
from provisioning.core.signing import TokenVerifier
from provisioning.ops_controller.idempotency import IdempotencyStore

__all__ = [
    "Ack",
    "DispatchFailed",
    "Dispatcher",
    "Nak",
    "OpsController",
    "Outcome",
    "Term",
]

log = get_logger("ops_controller")


@dataclass(frozen=True)
class Ack:
    reason: str = "done"


@dataclass(frozen=True)
class Nak:
    delay_s: float
    reason: str = ""


@dataclass(frozen=True)
class Term:
    reason: str


Outcome = Ack | Nak | Term

_PROBE_MAX_S = 5.0  # longest wait between two probes of a silent orchestrator


class DispatchFailed(Exception):
    """The dispatch did not happen: ``retry`` True for unreachable/5xx, False for 4xx."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class Dispatcher(Protocol):
    """Hands ops to the orchestrator. It may also offer ``async def ready() -> bool`` (does the
    orchestrator answer?): then the controller holds its consumption during an outage."""

    async def dispatch(self, op: VerifiedOp) -> dict[str, Any]:
        """Hand the op to the orchestrator; answer what it made (``workflow_id``…).

        Raises:
            DispatchFailed: with ``retry`` telling a passing failure from a refusal.
        """
        ...


def _event(op_jti: str | None, result: str, action: str, **details: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "ts": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "action": action,
        "result": result,
        "actor": "ops-controller",
        "actor_type": "system",
        "object_type": "Operation",
        "object_id": op_jti,
        "service": "ops-controller",
        "details": details,
    }


@dataclass
class OpsController:
    verifier: TokenVerifier
    store: IdempotencyStore
    dispatcher: Dispatcher
    bus: Bus
    max_deliver: int = 10
    max_delay_s: float = 60.0
    heartbeat_s: float = 10.0
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    counts: dict[str, int] = field(default_factory=dict)
    #: monotonic time of the first passing dispatch failure of the current streak, else None
    held_since: float | None = None
    _locks: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    def _count(self, outcome: Outcome) -> Outcome:
        name = type(outcome).__name__.lower()
        self.counts[name] = self.counts.get(name, 0) + 1
        return outcome

    async def handle(self, delivery: Delivery) -> Outcome:
        """Decide one delivery (does not answer it: :meth:`answer` does)."""
        try:
            op = await verify_op(self.verifier, delivery.subject, delivery.data)
        except OpRejected as exc:
            digest = hashlib.sha256(delivery.data).hexdigest()
            event = _event(
                None,
                "denied",
                "ops:verify",
                reason=exc.reason,
                message=exc.message,
                subject=delivery.subject[:200],
                message_sha256=digest,
            )
            event["id"] = str(uuid.UUID(digest[:32]))
            await self.bus.publish(
                "ops.audit.rejected", json.dumps(event).encode(), msg_id=f"rejected-{digest}"
            )
            return self._count(Term(f"{exc.reason}: {exc.message}"))
        async with self._jti_lock(op.jti):
            return await self._claim_and_dispatch(delivery, op)

    @contextlib.asynccontextmanager
    async def _jti_lock(self, jti: str) -> AsyncIterator[None]:
        """One delivery of a jti at a time in this process (a batch is handled concurrently
        and may carry the same op twice); other processes are kept apart by the store."""
        entry = self._locks.setdefault(jti, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[jti]

    async def _claim_and_dispatch(self, delivery: Delivery, op: VerifiedOp) -> Outcome:
        record, _new = await self.store.claim(op.jti, op.op_type, now=self.clock())
        if record.terminal:
            return self._count(Ack(f"duplicate of {op.jti} ({record.state})"))
        try:
            await self.store.mark_dispatched(op.jti, now=self.clock())
        except InvalidState:  # another controller ended it between the claim and now
            return self._count(Ack(f"duplicate of {op.jti} (ended by another controller)"))
        try:
            made = await self._with_heartbeat(delivery, self.dispatcher.dispatch(op))
        except DispatchFailed as exc:
            if exc.retry and self.held_since is None:
                self.held_since = time.monotonic()
            if exc.retry and delivery.num_delivered < self.max_deliver:
                delay = min(self.max_delay_s, 2.0 ** max(0, delivery.num_delivered - 1))
                return self._count(Nak(delay, str(exc)))
            reason = (
                str(exc)
                if not exc.retry
                else f"gave up after {delivery.num_delivered} deliveries: {exc}"
            )
            await self._finish(op, "failed", reason=reason)
            return self._count(Term(reason))
        self.held_since = None
        await self._finish(op, "completed", outcome=made)
        return self._count(Ack())

    async def _finish(
        self,
        op: VerifiedOp,
        state: str,
        *,
        outcome: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> None:
        event = _event(
            op.jti,
            "success" if state == "completed" else "failure",
            "ops:dispatch",
            op_type=op.op_type,
            target=op.target,
            requester=op.requester,
            outcome=outcome or {},
            reason=reason,
        )
        await self.store.finish(
            op.jti, state, audit_event=event, outcome=outcome, reason=reason, now=self.clock()
        )

    async def _with_heartbeat(
        self, delivery: Delivery, work: Awaitable[dict[str, Any]]
    ) -> dict[str, Any]:
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.heartbeat_s)
                if done:
                    return task.result()
                with contextlib.suppress(Exception):
                    await delivery.in_progress()
        finally:
            if not task.done():
                task.cancel()

    async def answer(self, delivery: Delivery, outcome: Outcome) -> None:
        if isinstance(outcome, Ack):
            await delivery.ack()
        elif isinstance(outcome, Nak):
            await delivery.nak(outcome.delay_s)
        else:
            log.info("op terminated", extra={"reason": outcome.reason[:300]})
            await delivery.term()

    async def relay_outbox(self, limit: int = 100) -> int:
        """Publish pending audit events to ``ops.audit.<result>``; answer how many."""
        pending = await self.store.outbox_pending(limit)
        done = []
        try:
            for _id, event in pending:
                subject = (
                    "ops.audit.completed"
                    if event.get("result") == "success"
                    else "ops.audit.failed"
                )
                await self.bus.publish(subject, json.dumps(event).encode(), msg_id=str(event["id"]))
                done.append(_id)
        except Unreachable as exc:
            # NATS busy (a leader election), or another controller on the same store relaying
            # the same event at this moment: the rest waits for the next turn (same msg ids).
            log.warning(
                "audit events not relayed yet; will retry",
                extra={"waiting": len(pending) - len(done), "error": str(exc)[:300]},
            )
        if done:
            await self.store.outbox_done(done)
        return len(done)

    async def reconcile(self, lookup: Callable[[str], Awaitable[dict[str, Any] | None]]) -> int:
        """On start: records left ``dispatched`` by a crash are settled by asking the
        orchestrator by idempotency key (``lookup(jti)`` → the workflow, or None). Found:
        ``completed``; not found: left ``dispatched`` — the message is still unacked and comes
        back, and the re-dispatch is idempotent. Answers how many were settled."""
        settled = 0
        for rec in await self.store.in_state("dispatched", limit=1000):
            wf = await lookup(rec.jti)
            if wf is None:
                continue
            op = VerifiedOp(rec.jti, rec.op_type, "", None, "", {}, {}, "")
            await self._finish(op, "completed", outcome={"workflow_id": wf.get("id")})
            settled += 1
        return settled

    async def process(self, delivery: Delivery) -> None:
        """Decide and answer one delivery; a failure leaves it unanswered (it comes back)."""
        try:
            await self.answer(delivery, await self.handle(delivery))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("op not decided; it will be redelivered")

    async def run(self, stop: asyncio.Event, *, batch: int = 16) -> None:
        """Consume until ``stop`` is set: fetch, decide and answer the fetched messages
        concurrently (each dispatch mostly waits on the orchestrator and the store), relay the
        outbox between fetches."""
        consumer = await self.bus.consumer("OPS_PENDING", "ops-controller")
        failing = 0  # consecutive failed turns: logged at the first, then every 30th
        while not stop.is_set():
            try:
                await self.hold_while_unreachable(stop)
                if stop.is_set():
                    return
                deliveries = await consumer.fetch(batch, timeout_s=1.0)
                await asyncio.gather(*(self.process(d) for d in deliveries))
                await self.relay_outbox()
                if failing:
                    log.info("controller loop works again", extra={"failed_turns": failing})
                failing = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS or the store hiccuped: unanswered messages come back
                # A NATS leader election fails every fetch for seconds: one line, not a
                # traceback a second.
                if failing % 30 == 0:
                    log.warning(
                        "controller loop failed; retrying every second",
                        extra={"error": f"{type(exc).__name__}: {exc}", "failed_turns": failing},
                    )
                failing += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def hold_while_unreachable(self, stop: asyncio.Event) -> None:
        """After a passing dispatch failure, wait until the orchestrator answers (or ``stop``)
        before taking more messages; a no-op for a dispatcher without ``ready()``."""
        ready = getattr(self.dispatcher, "ready", None)
        if self.held_since is None or ready is None:
            return
        delay, told = 0.5, False
        while not stop.is_set():
            if await ready():
                if told:
                    log.info(
                        "orchestrator answers again; taking operations",
                        extra={"held_s": round(time.monotonic() - self.held_since, 1)},
                    )
                self.held_since = None
                return
            if not told:
                log.warning("orchestrator not answering; holding operations until it does")
                told = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, _PROBE_MAX_S)
