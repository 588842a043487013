"""The message bus seam: JetStream streams, publishing with de-duplication, durable pull
consumers with explicit acknowledgement.

Contract of :class:`Bus` (see ``core/bus/nats.py`` for the implementation over ``nats-py``):

* :meth:`Bus.ensure` creates every stream of :data:`STREAMS` and durable consumer of
  :data:`CONSUMERS` when absent and updates them when their settings changed — idempotent, safe
  for several processes starting at once.
* :meth:`Bus.publish` returns only once the server stored the message (with ``sync_interval:
  always``, on disk); a ``msg_id`` published again within the duplicate window is not stored
  twice (``duplicate`` is True in the answer).
* :meth:`Bus.consumer` binds a durable pull consumer; :meth:`Consumer.fetch` returns at most
  ``batch`` deliveries within ``timeout_s`` (an empty list on timeout). A delivery not acked
  within ``ack_wait`` is delivered again, at most ``max_deliver`` times.
* :meth:`Bus.stream_info` and :meth:`Bus.consumer_info` only read: the state of each declared
  stream and durable consumer that exists on the server (one missing is left out), for
  monitoring. They raise :class:`~provisioning.core.errors.Unreachable` when the server does
  not answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = [
    "CONSUMERS",
    "STREAMS",
    "Bus",
    "Consumer",
    "ConsumerDef",
    "ConsumerInfo",
    "Delivery",
    "Published",
    "StreamDef",
    "StreamInfo",
]


@dataclass(frozen=True)
class StreamDef:
    name: str
    subjects: tuple[str, ...]
    retention: Literal["workqueue", "limits"]
    max_age_s: float = 0  # 0: forever


@dataclass(frozen=True)
class ConsumerDef:
    stream: str
    durable: str
    filter_subject: str


#: DESIGN §4.
STREAMS: tuple[StreamDef, ...] = (
    StreamDef("OPS_PENDING", ("ops.pending.>",), "workqueue"),
    StreamDef("OPS_AUDIT", ("ops.audit.>",), "limits"),
    StreamDef("TASKS", ("tasks.>",), "limits", max_age_s=7 * 86400),
    StreamDef("EVENTS", ("events.>",), "limits", max_age_s=3600),
)
CONSUMERS: tuple[ConsumerDef, ...] = (
    ConsumerDef("OPS_PENDING", "ops-controller", "ops.pending.>"),
    ConsumerDef("OPS_AUDIT", "audit-mirror", "ops.audit.>"),
    ConsumerDef("OPS_AUDIT", "control-center", "ops.audit.>"),
)


@dataclass(frozen=True)
class Published:
    stream: str
    seq: int
    duplicate: bool


@dataclass
class Delivery:
    """One delivered message; answer it exactly once with ack, nak or term."""

    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    num_delivered: int = 1
    stream_seq: int = 0
    _raw: object = None

    async def ack(self) -> None:
        await self._raw.ack()  # type: ignore[attr-defined]

    async def nak(self, delay_s: float | None = None) -> None:
        await self._raw.nak(delay=delay_s)  # type: ignore[attr-defined]

    async def term(self) -> None:
        await self._raw.term()  # type: ignore[attr-defined]

    async def in_progress(self) -> None:
        await self._raw.in_progress()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class StreamInfo:
    """A stream's state: what it holds now."""

    name: str
    subjects: tuple[str, ...]
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumers: int


@dataclass(frozen=True)
class ConsumerInfo:
    """A durable consumer's progress on its stream."""

    stream: str
    durable: str
    num_pending: int  # matching messages not delivered yet: the consumer's lag
    num_ack_pending: int  # delivered, not acknowledged yet
    num_redelivered: int  # delivered more than once and not acknowledged yet
    num_waiting: int  # pull requests waiting for messages
    delivered_seq: int  # stream seq of the last message delivered
    ack_floor_seq: int  # stream seq below which every message is acknowledged


class Consumer(Protocol):
    async def fetch(self, batch: int = 1, timeout_s: float = 1.0) -> list[Delivery]: ...


class Bus(Protocol):
    async def ensure(self) -> None: ...

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Published: ...

    async def consumer(self, stream: str, durable: str) -> Consumer: ...

    async def stream_info(self) -> list[StreamInfo]: ...

    async def consumer_info(self) -> list[ConsumerInfo]: ...

    async def close(self) -> None: ...
