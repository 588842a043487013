"""The :class:`~provisioning.core.bus.Bus` over NATS JetStream with ``nats-py``."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from provisioning.core.bus import (
    CONSUMERS,
    STREAMS,
    ConsumerDef,
    ConsumerInfo,
    Delivery,
    Published,
    StreamDef,
    StreamInfo,
)
from provisioning.core.errors import Unreachable
from provisioning.core.logging import get_logger
from provisioning.core.settings import Settings

__all__ = ["NatsBus"]

log = get_logger("bus")


class _PullConsumer:
    def __init__(self, sub: JetStreamContext.PullSubscription) -> None:
        self._sub = sub

    async def fetch(self, batch: int = 1, timeout_s: float = 1.0) -> list[Delivery]:
        try:
            msgs = await self._sub.fetch(batch, timeout=timeout_s)
        except (NatsTimeout, TimeoutError):  # nats-py raises either on an empty stream
            return []
        out = []
        for m in msgs:
            md = m.metadata
            out.append(
                Delivery(
                    subject=m.subject,
                    data=m.data,
                    headers=dict(m.headers or {}),
                    num_delivered=int(md.num_delivered or 1),
                    stream_seq=int(md.sequence.stream if md.sequence else 0),
                    _raw=m,
                )
            )
        return out


class NatsBus:
    """Streams and consumers of DESIGN §4 on a NATS server or cluster."""

    def __init__(
        self,
        servers: list[str],
        *,
        max_deliver: int = 10,
        ack_wait_s: float = 30.0,
        duplicate_window_s: float = 600.0,
        replicas: int = 1,
        name: str = "prvng",
        streams: tuple[StreamDef, ...] = STREAMS,
        consumers: tuple[ConsumerDef, ...] = CONSUMERS,
    ) -> None:
        self.servers = servers
        self.max_deliver, self.ack_wait_s = max_deliver, ack_wait_s
        self.duplicate_window_s = duplicate_window_s
        self.replicas = replicas
        self.name = name
        self.streams, self.consumers = streams, consumers
        self.nc: Client | None = None
        self._js: JetStreamContext | None = None

    async def connect(self, timeout_s: float = 5.0) -> NatsBus:
        """Raises: Unreachable naming the servers."""

        async def quiet(exc: Exception) -> None:  # reconnects are normal; say so once, briefly
            log.debug("NATS connection error", extra={"error": repr(exc)})

        client = Client()
        try:
            # Reconnect forever once connected; but the first connection is bounded in time.
            await asyncio.wait_for(
                client.connect(
                    servers=self.servers,
                    name=self.name,
                    connect_timeout=max(1, round(timeout_s)),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    allow_reconnect=True,
                    error_cb=quiet,
                ),
                timeout=timeout_s * 2,
            )
        except (NoServersError, OSError, NatsTimeout, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await client.close()
            raise Unreachable(
                f"NATS at {', '.join(self.servers)} is not reachable ({type(exc).__name__})"
            ) from None
        self.nc = client
        self._js = self.nc.jetstream()
        return self

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise Unreachable("not connected to NATS: call connect() first")
        return self._js

    def _stream_config(self, d: StreamDef) -> StreamConfig:
        return StreamConfig(
            name=d.name,
            subjects=list(d.subjects),
            retention=(
                RetentionPolicy.WORK_QUEUE if d.retention == "workqueue" else RetentionPolicy.LIMITS
            ),
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=d.max_age_s or None,
            duplicate_window=self.duplicate_window_s,
            num_replicas=self.replicas,
        )

    def _consumer_config(self, d: ConsumerDef) -> ConsumerConfig:
        # No num_replicas: a durable consumer has its stream's replicas (nats.replicas).
        return ConsumerConfig(
            durable_name=d.durable,
            filter_subject=d.filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=1000,
        )

    async def ensure(self) -> None:
        """Create or update every stream and durable consumer (idempotent)."""
        js = self.js
        for d in self.streams:
            cfg = self._stream_config(d)
            try:
                await js.stream_info(d.name)
            except NotFoundError:
                try:
                    await js.add_stream(cfg)
                    log.info("stream created", extra={"stream": d.name})
                    continue
                except Exception:  # created by another process meanwhile
                    await js.stream_info(d.name)
            await js.update_stream(cfg)
        for c in self.consumers:
            await js.add_consumer(c.stream, self._consumer_config(c))

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Published:
        """Raises: Unreachable when the server did not confirm storing it."""
        hdrs: dict[str, Any] = dict(headers or {})
        if msg_id:
            hdrs["Nats-Msg-Id"] = msg_id
        try:
            ack = await self.js.publish(subject, payload, headers=hdrs or None, timeout=10)
        except NatsError as exc:
            # Timeouts, no server, no stream answering (a leader election in a cluster), or
            # an API error such as 10158 "duplicate message id is in process" (another
            # publisher of the same id, not yet stored): nothing confirmed, so try again.
            raise Unreachable(
                f"NATS did not confirm {subject} ({type(exc).__name__}: {exc}); publish again "
                "with the same msg id"
            ) from None
        return Published(stream=ack.stream, seq=ack.seq, duplicate=bool(ack.duplicate))

    async def consumer(self, stream: str, durable: str) -> _PullConsumer:
        d = next((c for c in self.consumers if c.stream == stream and c.durable == durable), None)
        if d is None:
            raise Unreachable(f"no consumer {durable} on {stream} is declared")
        sub = await self.js.pull_subscribe_bind(durable=durable, stream=stream)
        return _PullConsumer(sub)

    async def stream_info(self) -> list[StreamInfo]:
        """Every declared stream the server has, in declaration order.

        Raises:
            Unreachable: not connected, or the server did not answer.
        """
        infos = await self._ask(
            [self.js.stream_info(d.name) for d in self.streams], "stream information"
        )
        out = []
        for d, info in zip(self.streams, infos, strict=True):
            if info is None:
                continue
            st = info.state
            out.append(
                StreamInfo(
                    name=d.name,
                    subjects=tuple(info.config.subjects or d.subjects),
                    messages=int(st.messages or 0),
                    bytes=int(st.bytes or 0),
                    first_seq=int(st.first_seq or 0),
                    last_seq=int(st.last_seq or 0),
                    consumers=int(st.consumer_count or 0),
                )
            )
        return out

    async def consumer_info(self) -> list[ConsumerInfo]:
        """Every declared durable consumer the server has, in declaration order.

        Raises:
            Unreachable: not connected, or the server did not answer.
        """
        infos = await self._ask(
            [self.js.consumer_info(c.stream, c.durable) for c in self.consumers],
            "consumer information",
        )
        out = []
        for c, info in zip(self.consumers, infos, strict=True):
            if info is None:
                continue
            out.append(
                ConsumerInfo(
                    stream=c.stream,
                    durable=c.durable,
                    num_pending=int(info.num_pending or 0),
                    num_ack_pending=int(info.num_ack_pending or 0),
                    num_redelivered=int(info.num_redelivered or 0),
                    num_waiting=int(info.num_waiting or 0),
                    delivered_seq=int(info.delivered.stream_seq if info.delivered else 0),
                    ack_floor_seq=int(info.ack_floor.stream_seq if info.ack_floor else 0),
                )
            )
        return out

    async def _ask(self, requests: list[Any], what: str) -> list[Any]:
        """Run JetStream API requests at once; a missing stream or consumer answers None."""

        answers = await asyncio.gather(*requests, return_exceptions=True)
        out: list[Any] = []
        for answer in answers:
            if isinstance(answer, NotFoundError):
                out.append(None)
            elif isinstance(answer, NatsError | TimeoutError):
                raise Unreachable(
                    f"NATS did not answer the {what} request ({type(answer).__name__})"
                ) from None
            elif isinstance(answer, BaseException):
                raise answer
            else:
                out.append(answer)
        return out

    async def close(self) -> None:
        nc, self.nc, self._js = self.nc, None, None
        if nc is not None and not nc.is_closed:
            # Not drain(): it waits out open pull requests (30 s). Answers are sent at once.
            await nc.close()


def bus_for(settings: Settings, *, name: str = "prvng") -> NatsBus:
    """An unconnected bus on the platform's NATS (embedded or ``nats.url``) with the
    stream and consumer limits of ``settings.nats``; ``name`` is the client name NATS shows."""
    n = settings.nats
    return NatsBus(
        settings.nats_servers,
        max_deliver=n.max_deliver,
        ack_wait_s=n.ack_wait_s,
        duplicate_window_s=n.duplicate_window_s,
        replicas=n.replicas,
        name=name,
    )


async def connect_bus(settings: Settings, *, name: str, timeout_s: float = 5.0) -> NatsBus:
    """A bus connected to the platform's NATS whose streams and consumers exist.

    Raises:
        Unreachable: NATS did not answer within ``timeout_s``.
    """
    bus = bus_for(settings, name=name)
    await bus.connect(timeout_s=timeout_s)
    try:
        await bus.ensure()
    except BaseException:
        await bus.close()
        raise
    log.info("connected to NATS", extra={"client": name, "servers": bus.servers})
    return bus
