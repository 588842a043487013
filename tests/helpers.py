"""Small helpers the tests share: bounded waiting for a condition.

Every wait in the tests is bounded in time (a condition that never comes fails the test naming
what it waited for), never a bare sleep standing in for "long enough".
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psutil

__all__ = ["isolated_children", "until", "until_sync"]

T = TypeVar("T")


async def until(
    what: str,
    check: Callable[[], Awaitable[T] | T],
    timeout_s: float = 30.0,
    *,
    interval_s: float = 0.05,
) -> T:
    """Call ``check`` (sync or async) every ``interval_s`` until it answers something true,
    and answer that; fail naming ``what`` after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        got: Any = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"still waiting after {timeout_s:g} s: {what}"
        await asyncio.sleep(interval_s)


def until_sync(
    what: str, check: Callable[[], T], timeout_s: float = 30.0, *, interval_s: float = 0.2
) -> T:
    """:func:`until` for code without an event loop (browser and CLI tests)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"still waiting after {timeout_s:g} s: {what}"
        time.sleep(interval_s)


def isolated_children() -> list[psutil.Process]:
    """This process's live descendants that are ``provisioning.core.isolated`` children."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "provisioning.core.isolated" in child.cmdline():
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found
