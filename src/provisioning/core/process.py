"""What the platform says about a child process that ended."""

from __future__ import annotations

import signal

__all__ = ["exit_reason"]


def exit_reason(code: int | None) -> str:
    """``exit code N``, or ``killed by signal SIGKILL`` for a negative return code (Popen's way
    of saying a signal ended the process)."""
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
