"""Small asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio

__all__ = ["reraise_if_cancelling"]


def reraise_if_cancelling() -> None:
    """Call inside ``except asyncio.CancelledError`` raised by awaiting *another* task: re-raise
    when the current task is itself being cancelled; otherwise the error was only that other
    task's (a loop cancelled before its service's ``stop`` awaited it) and the caller goes on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
