"""Reading and following task logs.

A log is one JSON-lines file per attempt (written by :class:`~.runner.LogWriter`). Every line
has a position ``<attempt>:<n>``; that is the SSE event id, so a follower reconnecting with
``Last-Event-ID`` continues after the last line it saw, without losing or repeating lines.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioning.core.errors import ValidationError
from provisioning.core.sse import comment, format_event

__all__ = ["LogCursor", "follow_log", "parse_position", "read_lines"]

_TERMINAL = {"Completed", "Failed", "Cancelled", "Skipped", "RolledBack"}


def parse_position(value: str | None) -> tuple[int, int]:
    """``"3:17"`` → ``(3, 17)``: after line 17 of attempt 3. Empty → from the start.

    Raises:
        ValidationError: the value is not ``<attempt>:<line>``.
    """
    if not value:
        return (0, 0)
    attempt, sep, line = value.partition(":")
    if not sep or not attempt.isdigit() or not line.isdigit():
        raise ValidationError(
            f"Last-Event-ID {value[:50]!r} is not a log position '<attempt>:<line>'"
        )
    return int(attempt), int(line)


@dataclass
class LogCursor:
    """Where a reader is: the attempt and line it saw last, and byte offsets per attempt."""

    attempt: int = 0
    line: int = 0
    offsets: dict[int, int] = field(default_factory=dict)

    def read_new(self, files: list[tuple[int, str]]) -> list[dict[str, Any]]:
        """Complete lines after the cursor, advancing it."""
        out: list[dict[str, Any]] = []
        for number, path in files:
            if number < self.attempt:
                continue
            try:
                with Path(path).open("rb") as fh:
                    fh.seek(self.offsets.get(number, 0))
                    data = fh.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n")
            if end < 0:
                continue
            self.offsets[number] = self.offsets.get(number, 0) + end + 1
            for raw in data[: end + 1].splitlines():
                try:
                    doc = json.loads(raw)
                except ValueError:
                    continue
                n = int(doc.get("n", 0))
                if number == self.attempt and n <= self.line:
                    continue
                doc["attempt"] = number
                out.append(doc)
                self.attempt, self.line = number, n
        return out


def read_lines(
    files: list[tuple[int, str]],
    *,
    attempt: int | None = None,
    query: str | None = None,
    after: tuple[int, int] = (0, 0),
    limit: int = 10000,
) -> list[dict[str, Any]]:
    """Every line of the task's log (optionally of one attempt, containing ``query``)."""
    cursor = LogCursor(*after)
    chosen = [f for f in files if attempt is None or f[0] == attempt]
    lines = cursor.read_new(chosen)
    if query:
        q = query.lower()
        lines = [ln for ln in lines if q in str(ln.get("line", "")).lower()]
    return lines[:limit]


async def follow_log(
    files: Callable[[], Awaitable[list[tuple[int, str]]]],
    status: Callable[[], Awaitable[str]],
    wait_change: Callable[[float], Awaitable[None]],
    *,
    after: tuple[int, int] = (0, 0),
    keepalive_s: float = 15.0,
    max_s: float = 24 * 3600.0,
) -> AsyncIterator[str]:
    """Server-Sent Events of log lines until the task ends (or ``max_s`` passes).

    Each line is ``event: log`` with ``id: <attempt>:<n>``; the stream closes with
    ``event: end`` carrying the task's final status.
    """
    cursor = LogCursor(*after)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_s
    last_sent = loop.time()
    while loop.time() < deadline:
        current = await status()
        for doc in cursor.read_new(await files()):
            last_sent = loop.time()
            yield format_event(doc, event="log", id=f"{doc['attempt']}:{doc['n']}")
        if current in _TERMINAL:
            # One more read: lines written between the status read and the file read.
            for doc in cursor.read_new(await files()):
                yield format_event(doc, event="log", id=f"{doc['attempt']}:{doc['n']}")
            yield format_event({"status": current}, event="end")
            return
        if loop.time() - last_sent >= keepalive_s:
            last_sent = loop.time()
            yield comment("keepalive")
        await wait_change(0.5)
