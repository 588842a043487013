"""Runs one task attempt: a subprocess in its own process group, or a builtin action.

stdout and stderr are written line by line to the attempt's log file as JSON lines
``{"n", "ts", "stream", "line"}``; ``n`` numbers the lines of the attempt from 1 and is the
position a log follower resumes from. A timeout or cancel sends SIGTERM to the whole process
group, then SIGKILL after the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioning.orchestrator.clock import utcnow
from provisioning.orchestrator.store import Claim, Result

__all__ = ["AttemptRunner", "LogWriter", "input_env_name"]

_READ_LIMIT = 1024 * 1024
_DRAIN_AFTER_EXIT_S = 0.5


def input_env_name(task_name: str) -> str:
    """``PRVNG_INPUT_<TASK>``: the task name upper-cased, non-alphanumerics as ``_``."""
    return "PRVNG_INPUT_" + re.sub(r"[^A-Za-z0-9]", "_", task_name).upper()


class LogWriter:
    """Appends numbered JSON lines to an attempt's log file and wakes followers.

    Creating a file costs this machine kind ~0.5 ms of blocking I/O, so :meth:`open` creates
    it in a helper thread while the event loop goes on. Lines written before it is open are
    kept in order and written first; after that every line is one ``write`` to the file
    (``O_APPEND``), so a reader never sees half a line.
    """

    def __init__(self, path: Path, notify: Callable[[], None]) -> None:
        self.path = path
        self._fd: int | None = None
        self._pending: list[bytes] = []
        self._n = 0
        self._notify = notify

    async def open(self) -> None:
        """Create (or append to) the file; the lines written so far go first."""
        head, self._pending = b"".join(self._pending), []
        loop = asyncio.get_running_loop()
        self._fd = await loop.run_in_executor(_log_executor(), _open_log, self.path, head)
        if self._pending:
            head, self._pending = b"".join(self._pending), []
            _write_all(self._fd, head)
        self._notify()

    def write(self, stream: str, line: str) -> None:
        self._n += 1
        doc = {"n": self._n, "ts": utcnow().isoformat(), "stream": stream, "line": line}
        data = (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
        if self._fd is None:
            self._pending.append(data)
            return
        _write_all(self._fd, data)
        self._notify()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self._notify()


_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
_LOG_EXECUTOR: list[ThreadPoolExecutor] = []


def _log_executor() -> ThreadPoolExecutor:
    if not _LOG_EXECUTOR:
        _LOG_EXECUTOR.append(ThreadPoolExecutor(2, thread_name_prefix="attempt-logs"))
    return _LOG_EXECUTOR[0]


def _open_log(path: Path, head: bytes) -> int:
    try:
        fd = os.open(path, _LOG_FLAGS, 0o666)
    except FileNotFoundError:  # the workflow's first attempt here: make its folder
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, _LOG_FLAGS, 0o666)
    try:
        if head:
            _write_all(fd, head)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass
class _Proc:
    process: asyncio.subprocess.Process | None = None
    cancel_requested: bool = False


def _use_pidfd_child_watcher() -> None:
    # Python 3.11 waits for every child in a thread of its own (ThreadedChildWatcher): starting
    # that thread blocks the loop, which halved task throughput here. A pidfd watcher waits in
    # the event loop itself. 3.12+ does this by default (and deprecates choosing); the stdlib's
    # 3.11 PidfdChildWatcher is tied to one loop, so this one uses whichever loop spawns.
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if not isinstance(asyncio.get_child_watcher(), _PidfdWatcher):
            asyncio.set_child_watcher(_PidfdWatcher())


class _PidfdWatcher(asyncio.AbstractChildWatcher):
    """Child watcher on pidfds, for the event loop running when the child is added."""

    def __init__(self) -> None:
        self._callbacks: dict[int, tuple[asyncio.AbstractEventLoop, int, Any, tuple[Any, ...]]] = {}

    def add_child_handler(self, pid: int, callback: Any, *args: Any) -> None:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        loop.add_reader(pidfd, self._do_wait, pid)
        self._callbacks[pid] = (loop, pidfd, callback, args)

    def remove_child_handler(self, pid: int) -> bool:
        entry = self._callbacks.pop(pid, None)
        if entry is None:
            return False
        loop, pidfd, _cb, _args = entry
        with contextlib.suppress(Exception):
            loop.remove_reader(pidfd)
        os.close(pidfd)
        return True

    def _do_wait(self, pid: int) -> None:
        loop, pidfd, callback, args = self._callbacks.pop(pid)
        loop.remove_reader(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 255
        os.close(pidfd)
        callback(pid, code, *args)

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        pass

    def close(self) -> None:
        pass

    def is_active(self) -> bool:
        return True

    def __enter__(self) -> _PidfdWatcher:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass


class AttemptRunner:
    """Runs claims; one instance per engine."""

    def __init__(
        self,
        *,
        kill_grace_s: float,
        on_pid: Callable[[Claim, int], Any],
        notify_log: Callable[[str], None],
    ) -> None:
        self.kill_grace_s = kill_grace_s
        self._on_pid = on_pid
        self._notify_log = notify_log
        self._procs: dict[str, _Proc] = {}
        _use_pidfd_child_watcher()

    def running(self) -> list[str]:
        return list(self._procs)

    async def cancel(self, task_id: str) -> None:
        """Terminate a running attempt: SIGTERM to its group, SIGKILL after the grace."""
        entry = self._procs.get(task_id)
        if entry is None:
            return
        entry.cancel_requested = True
        if entry.process is not None:
            await _terminate_group(entry.process, self.kill_grace_s)

    async def run(self, claim: Claim) -> Result:
        """Run the attempt to its end and say how it ended (never raises for task failures)."""
        entry = _Proc()
        self._procs[claim.task_id] = entry
        log = LogWriter(claim.log_path, lambda: self._notify_log(claim.task_id))
        try:
            await log.open()
            if claim.phase == "run" and claim.spec.get("action"):
                return await self._builtin(claim, log, entry)
            argv = claim.spec["command"] if claim.phase == "run" else claim.spec["rollback"]
            return await self._process(claim, list(argv), log, entry)
        finally:
            self._procs.pop(claim.task_id, None)
            log.close()

    async def _builtin(self, claim: Claim, log: LogWriter, entry: _Proc) -> Result:
        action = claim.spec["action"]
        args = claim.spec.get("args") or {}
        timeout = float(claim.spec.get("timeout_s", 300))
        log.write("system", f"builtin action {action}")
        if action == "noop":
            return Result(
                claim.task_id, claim.attempt, claim.phase, ok=True, exit_code=0, outputs={}
            )
        if action == "fail":
            msg = str(args.get("message", "builtin action fail"))
            log.write("stderr", msg)
            return Result(
                claim.task_id, claim.attempt, claim.phase, ok=False, exit_code=1, error=msg
            )
        seconds = float(args.get("seconds", 1))
        try:
            await asyncio.wait_for(asyncio.sleep(seconds), timeout)
        except TimeoutError:
            return Result(
                claim.task_id,
                claim.attempt,
                claim.phase,
                ok=False,
                error=f"timed out after {timeout:g}s",
            )
        return Result(claim.task_id, claim.attempt, claim.phase, ok=True, exit_code=0, outputs={})

    async def _process(self, claim: Claim, argv: list[str], log: LogWriter, entry: _Proc) -> Result:
        out_path = log.path.with_suffix(".out.jsonl")  # <task>.<n>.out.jsonl
        env = dict(os.environ)
        env.update(claim.spec.get("env") or {})
        env.update(
            {
                "PRVNG_WORKFLOW_ID": claim.workflow_id,
                "PRVNG_TASK_ID": claim.task_id,
                "PRVNG_TASK_NAME": claim.name,
                "PRVNG_ATTEMPT": str(claim.attempt),
                "PRVNG_ATTEMPT_ID": claim.attempt_id,
                "PRVNG_PHASE": claim.phase,
                "PRVNG_IDEMPOTENCY_KEY": claim.idempotency_key,
                "PRVNG_OUTPUT": str(out_path),
            }
        )
        for name, outputs in claim.inputs.items():
            env[input_env_name(name)] = json.dumps(outputs)
        timeout = float(claim.spec.get("timeout_s", 300))
        cwd = claim.spec.get("cwd") or None
        log.write("system", f"{claim.phase} attempt {claim.attempt}: {_show(argv)}")
        if cwd is not None and not Path(cwd).is_dir():
            msg = f"working directory {cwd!r} does not exist"
            log.write("system", msg)
            return Result(
                claim.task_id, claim.attempt, claim.phase, ok=False, exit_code=127, error=msg
            )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=_devnull(),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,
                limit=_READ_LIMIT,
            )
        except OSError as exc:
            msg = f"cannot start {argv[0]!r}: {exc.strerror or exc}"
            log.write("system", msg)
            return Result(
                claim.task_id, claim.attempt, claim.phase, ok=False, exit_code=127, error=msg
            )
        entry.process = proc
        pid_note = self._on_pid(claim, proc.pid)
        if asyncio.iscoroutine(pid_note):
            await pid_note
        readers = [
            asyncio.create_task(_pump(proc.stdout, "stdout", log)),
            asyncio.create_task(_pump(proc.stderr, "stderr", log)),
        ]
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
            log.write("system", f"timed out after {timeout:g}s; terminating the process group")
            await _terminate_group(proc, self.kill_grace_s)
        # Grandchildren that kept the pipes open must not hold the attempt open forever.
        _done, pending = await asyncio.wait(readers, timeout=_DRAIN_AFTER_EXIT_S)
        for r in pending:
            r.cancel()
        code = proc.returncode
        if entry.cancel_requested:
            log.write("system", "cancelled")
            return Result(
                claim.task_id,
                claim.attempt,
                claim.phase,
                ok=False,
                exit_code=code,
                error="cancelled",
                cancelled=True,
            )
        if timed_out:
            return Result(
                claim.task_id,
                claim.attempt,
                claim.phase,
                ok=False,
                exit_code=code,
                error=f"timed out after {timeout:g}s",
            )
        outputs, out_err = _read_outputs(out_path)
        if code == 0 and out_err is None:
            log.write("system", "exit code 0")
            return Result(
                claim.task_id, claim.attempt, claim.phase, ok=True, exit_code=0, outputs=outputs
            )
        error = out_err or _exit_reason(code)
        log.write("system", error)
        return Result(
            claim.task_id, claim.attempt, claim.phase, ok=False, exit_code=code, error=error
        )


_DEVNULL: list[int] = []


def _devnull() -> int:
    # One /dev/null for every child's stdin: opening it per spawn is a syscall on the hot path.
    if not _DEVNULL:
        _DEVNULL.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    return _DEVNULL[0]


def _show(argv: list[str]) -> str:
    text = " ".join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


async def _pump(stream: asyncio.StreamReader | None, name: str, log: LogWriter) -> None:
    if stream is None:
        return
    while True:
        try:
            raw = await stream.readline()
        except ValueError:
            # A line longer than the read limit: take what is buffered as one line.
            raw = await stream.read(_READ_LIMIT)
        if not raw:
            return
        log.write(name, raw.decode("utf-8", "replace").rstrip("\r\n"))


def _read_outputs(path: Path) -> tuple[dict[str, Any], str | None]:
    """Merge the JSON objects a task wrote to ``PRVNG_OUTPUT``, one per line."""
    outputs: dict[str, Any] = {}
    if not path.exists():
        return outputs, None
    with path.open(encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exc:
                return outputs, f"PRVNG_OUTPUT line {i} is not JSON: {exc}"
            if not isinstance(doc, dict):
                return outputs, f"PRVNG_OUTPUT line {i} is not a JSON object"
            outputs.update(doc)
    return outputs, None


async def _terminate_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    if proc.returncode is not None:
        _signal_group(proc.pid, signal.SIGKILL)  # leftovers of the group, if any
        return
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 5)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_orphan(pid: int | None, attempt_id: str | None) -> bool:
    """Kill the process group of an attempt left running by a dead worker on this host.

    Only a process whose environment carries the attempt's id is touched, so a reused pid is
    never killed by mistake. A worker records an attempt's pid a scheduler turn after starting
    it; when it died in between (no ``pid``), the attempt's processes are found in ``/proc``
    by that same environment entry. Returns True when a group was signalled.
    """
    if not attempt_id:
        return False
    entry = f"PRVNG_ATTEMPT_ID={attempt_id}".encode()
    if pid:
        if not _carries(pid, entry):
            return False
        _signal_group(pid, signal.SIGKILL)
        return True
    killed = False
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or not _carries(int(proc_dir.name), entry):
            continue
        with contextlib.suppress(ProcessLookupError):
            pgid = os.getpgid(int(proc_dir.name))
            if pgid != os.getpgrp():  # attempts run in their own session: never our group
                _signal_group(pgid, signal.SIGKILL)
                killed = True
    return killed


def _carries(pid: int, entry: bytes) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return entry in environ.split(b"\0")
