"""Server-Sent Events, shared by every service that streams and every client that follows.

* :func:`format_event` and :func:`comment` write the WHATWG event-stream format: ``id:``,
  ``event:``, one ``data:`` line per line of the payload, a blank line; ``: text`` lines are
  comments (keep-alives) that clients ignore.
* :func:`iter_events` reads it back (what the typed clients use).
* :class:`EventRing` keeps the most recent events of a live stream in memory, bounded, with
  ids ``<epoch>.<seq>``: a reconnecting client sends the last id it saw (``Last-Event-ID``) and
  :meth:`EventRing.since` answers the events after it, or None when they are no longer all
  there (older than the ring, or from another process's epoch) — the stream then starts over
  with a fresh snapshot. Each live stream subscribes with a bounded queue; a subscriber that
  falls behind is marked ``overflowed`` instead of growing the queue.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from provisioning.core.errors import Unreachable

__all__ = [
    "EventRing",
    "RingEvent",
    "ServerEvent",
    "Subscription",
    "comment",
    "format_event",
    "iter_events",
]


def format_event(data: Any, *, event: str | None = None, id: str | None = None) -> str:
    """One event; ``data`` is sent as is when a string, else as compact JSON."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, default=str)
    head = (f"id: {id}\n" if id is not None else "") + (f"event: {event}\n" if event else "")
    body = "".join(f"data: {line}\n" for line in text.split("\n"))
    return f"{head}{body}\n"


def comment(text: str) -> str:
    """A comment line (a keep-alive); clients ignore it."""
    return f": {text}\n\n"


@dataclass(frozen=True)
class ServerEvent:
    """One event as a client reads it; ``id`` is None when the event carried none."""

    event: str
    id: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


async def iter_events(lines: AsyncIterator[str]) -> AsyncIterator[ServerEvent]:
    """The events of a stream given as lines (``httpx.Response.aiter_lines()``); events
    without data (and comments) are not yielded."""
    event, ident, data = "message", None, []  # type: tuple[str, str | None, list[str]]
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if line == "":
            if data:
                yield ServerEvent(event, ident, "\n".join(data))
            event, ident, data = "message", None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "id":
            ident = value
        elif name == "data":
            data.append(value)


@dataclass(frozen=True)
class RingEvent:
    """An event of the ring; ``scope`` says who may see it (the stream decides, the ring does
    not look at it)."""

    seq: int
    event: str
    data: Any
    scope: Mapping[str, Any] | None = None


@dataclass(eq=False)
class Subscription:
    """A live stream's view of the ring: events published after it subscribed."""

    queue: asyncio.Queue[RingEvent]
    overflowed: bool = False

    def drain(self) -> list[RingEvent]:
        """Every queued event, without waiting."""
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out


@dataclass
class EventRing:
    """The last ``size`` events, and the live streams subscribed to new ones (see the module
    docstring)."""

    size: int = 256
    max_subscribers: int = 32
    queue_size: int = 64
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    head: int = 0  # seq of the newest event; 0: none yet
    _events: deque[RingEvent] = field(default_factory=deque)
    _subscribers: list[Subscription] = field(default_factory=list)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def id_of(self, seq: int) -> str:
        return f"{self.epoch}.{seq}"

    def parse_id(self, value: str | None) -> int | None:
        """The seq of an id of this ring's epoch; None for anything else (never raises)."""
        epoch, _, seq = (value or "").strip().partition(".")
        if epoch != self.epoch or not seq.isdigit() or len(seq) > 18:
            return None
        n = int(seq)
        return n if n <= self.head else None

    def publish(self, event: str, data: Any, scope: Mapping[str, Any] | None = None) -> RingEvent:
        """Keep the event and hand it to every subscriber (never blocks)."""
        self.head += 1
        item = RingEvent(self.head, event, data, scope)
        self._events.append(item)
        while len(self._events) > self.size:
            self._events.popleft()
        for sub in self._subscribers:
            try:
                sub.queue.put_nowait(item)
            except asyncio.QueueFull:
                sub.overflowed = True  # the stream resynchronises with a fresh snapshot
        return item

    def since(self, seq: int) -> list[RingEvent] | None:
        """The events after ``seq``; None when some of them are no longer kept."""
        if seq > self.head:
            return None
        oldest = self._events[0].seq if self._events else self.head + 1
        if seq + 1 < oldest:
            return None
        return [e for e in self._events if e.seq > seq]

    def subscribe(self) -> Subscription:
        """Raises: Unreachable (503) when ``max_subscribers`` streams are open already."""
        if len(self._subscribers) >= self.max_subscribers:
            raise Unreachable(
                f"too many live streams are open ({self.max_subscribers}); retry later",
                max_streams=self.max_subscribers,
            )
        sub = Subscription(asyncio.Queue(maxsize=self.queue_size))
        self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)
