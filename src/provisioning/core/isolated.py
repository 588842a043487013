"""Run one allow-listed function in a child process bounded in time and memory.

Nickel that users send (a workflow pasted in the web UI, a workspace file written through the
``/config`` API) must not be evaluated in the service's own process: a thread that loops forever
cannot be stopped, and a memory bomb takes the whole service down. :func:`run` evaluates in a
child instead::

    python -P -s -m provisioning.core.isolated      # JSON request on stdin, JSON answer on stdout

The child sets its own limits before anything else (``RLIMIT_AS`` = the memory limit,
``RLIMIT_CPU`` a little above the time limit, no core file), then imports and calls the function,
which must be one of :data:`ALLOWED` (``"module:function"``, keyword arguments and result plain
JSON). The parent waits at most ``timeout_s`` (wall clock), then kills the child's whole process
group. Outcomes, as the caller sees them:

* the function's result;
* a :class:`ProvisioningError` raised in the child: the same class, message and details;
* the time limit passed: :class:`NickelError` "evaluating <source> took longer than N s and was
  stopped" (``details.limit == "time"``);
* memory exhausted (``MemoryError``, an allocation failure, the child killed or gone without an
  answer): :class:`NickelError` naming the memory limit (``details.limit == "memory"``);
* any other exception in the child: :class:`ProvisioningError` (internal) naming its type.

The child's environment is reduced to what Python needs (no ``PRVNG_*`` variable, so no secret
of the platform); its stderr is logged, only a short tail of it ever reaches an error message.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import provisioning
from provisioning.core.errors import NickelError, ProvisioningError, UsageError, error_from_wire
from provisioning.core.nickel import strip_ansi
from provisioning.core.process import exit_reason

if TYPE_CHECKING:
    from provisioning.core.settings import ControlCenterSettings

__all__ = ["ALLOWED", "Limits", "run"]

ALLOWED: Final[frozenset[str]] = frozenset(
    {
        "provisioning.core.nickel:evaluate",
        "provisioning.control_center.config_check:diagnose",
        "provisioning.control_center.workflow_nickel:load_workflow_data",
    }
)
"""The functions :func:`run` may call, as ``"module:function"``."""

_ENV_KEPT = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
_KILL_WAIT_S = 5.0  # reaping a killed child; it cannot take long
_TAIL = 300  # characters of the child's stderr an error message may show
_CPU_SIGNALS = {-signal.SIGXCPU}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """How long (wall clock) and how much memory (address space) one child may use."""

    timeout_s: float = 10.0
    memory_mb: int = 1024

    @classmethod
    def of(cls, cc: ControlCenterSettings) -> Limits:
        """The control center's ``nickel_timeout_s`` and ``nickel_memory_mb``."""
        return cls(timeout_s=cc.nickel_timeout_s, memory_mb=cc.nickel_memory_mb)


def run(
    function: str, kwargs: Mapping[str, Any], *, limits: Limits, source: str = "the input"
) -> Any:
    """Call ``function`` (one of :data:`ALLOWED`) with ``kwargs`` in a child process and
    answer its result. Blocking: call it in a thread from async code. ``source`` names what is
    evaluated in the errors (a file name as the user knows it).

    Raises:
        UsageError: ``function`` is not allowed.
        ProvisioningError: what the function raised (same class), or an internal error.
        NickelError: the time or the memory limit was reached (``details.limit``).
    """
    if function not in ALLOWED:
        raise UsageError(f"{function!r} may not run in an isolated child process")
    request = {
        "function": function,
        "kwargs": dict(kwargs),
        "memory_mb": limits.memory_mb,
        "cpu_s": math.ceil(limits.timeout_s) + 2,
    }
    body = json.dumps(request).encode("utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-P", "-s", "-m", __name__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
        start_new_session=True,  # its own process group: killed as a whole
    )
    try:
        out, err = proc.communicate(body, timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise _time_error(source, limits) from None
    except BaseException:
        _kill(proc)
        raise
    tail = _tail(err)
    if err:
        logger.debug("isolated %s (%s): stderr: %s", function, source, tail)
    answer = _answer(out)
    if answer is None:
        if proc.returncode in _CPU_SIGNALS:
            raise _time_error(source, limits)
        raise _memory_error(source, limits, exit_reason(proc.returncode), tail)
    if "result" in answer:
        return answer["result"]
    if "error" in answer:
        raise error_from_wire(answer["error"])
    if answer.get("memory"):
        raise _memory_error(source, limits, "MemoryError", "")
    crash = str(answer.get("crash", "no answer"))
    logger.warning("isolated %s (%s) failed: %s\n%s", function, source, crash, tail)
    raise ProvisioningError(f"evaluating {source} failed unexpectedly: {crash}", source=source)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEPT}
    # The package as this process has it, whatever the install (editable, plain, a source tree).
    env["PYTHONPATH"] = str(Path(provisioning.__file__).resolve().parents[1])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["MALLOC_ARENA_MAX"] = "2"  # address space reserved by glibc arenas counts in RLIMIT_AS
    return env


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    try:
        proc.communicate(timeout=_KILL_WAIT_S)
    except subprocess.TimeoutExpired:  # a grandchild escaped the group and holds the pipes
        proc.wait(timeout=_KILL_WAIT_S)


def _answer(out: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(out)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _tail(err: bytes) -> str:
    text = strip_ansi(err.decode("utf-8", errors="replace")).strip()
    return text if len(text) <= _TAIL else "…" + text[-_TAIL:]


def _time_error(source: str, limits: Limits) -> NickelError:
    return NickelError(
        f"evaluating {source} took longer than {limits.timeout_s:g} s and was stopped; "
        "look for a recursion that never ends (the limit is control_center.nickel_timeout_s)",
        source=source,
        limit="time",
        timeout_s=limits.timeout_s,
    )


def _memory_error(source: str, limits: Limits, how: str, tail: str) -> NickelError:
    last = tail.splitlines()[-1] if tail else ""
    said = f": {last}" if last and "Traceback" not in last else ""
    return NickelError(
        f"evaluating {source} was stopped ({how}{said}): it needs more than the memory limit of "
        f"{limits.memory_mb} MB (control_center.nickel_memory_mb)",
        source=source,
        limit="memory",
        memory_mb=limits.memory_mb,
    )


# ---------------------------------------------------------------------- the child


def _limit_self(memory_mb: int, cpu_s: int) -> None:
    import resource

    memory = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 2))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _child() -> int:
    request = json.loads(sys.stdin.buffer.read())
    _limit_self(int(request["memory_mb"]), int(request["cpu_s"]))
    # The answer goes to the real stdout; anything else the function prints (Python or native
    # code) goes to stderr, so it cannot corrupt the answer.
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    answer: dict[str, Any]
    try:
        function = str(request["function"])
        if function not in ALLOWED:
            raise UsageError(f"{function!r} may not run in an isolated child process")
        module, _, name = function.partition(":")
        result = getattr(importlib.import_module(module), name)(**request["kwargs"])
        answer = {"result": result}
    except ProvisioningError as exc:
        answer = {"error": exc.to_wire()}
    except MemoryError:
        answer = {"memory": True}
    except BaseException as exc:  # a Rust panic (pyo3's PanicException) is a BaseException
        import traceback

        traceback.print_exc()
        if "out of memory" in str(exc).lower():
            answer = {"memory": True}
        else:
            answer = {"crash": f"{type(exc).__name__}: {exc}"}
    try:
        data = json.dumps(answer, default=str).encode("utf-8")
    except MemoryError:
        data = b'{"memory": true}'
    with os.fdopen(answer_fd, "wb") as f:
        f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
