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
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioning.core.clock import utcnow
from provisioning.core.process import exit_reason
from provisioning.orchestrator.store import Claim, Result

__all__ = ["AttemptRunner", "LogWriter", "input_env_name"]

_READ_LIMIT = 1024 * 1024  # a longer line is cut here
_READ_CHUNK = 64 * 1024
_DRAIN_AFTER_EXIT_S = 0.5


def input_env_name(task_name: str) -> str:
    """``PRVNG_INPUT_<TASK>``: the task name upper-cased, non-alphanumerics as ``_``."""
    return "PRVNG_INPUT_" + re.sub(r"[^A-Za-z0-9]", "_", task_name).upper()


class LogWriter:
    """Appends numbered JSON lines to an attempt's log file and wakes followers.

    Every line is one ``write`` to the file (opened ``O_APPEND``, no buffering in between), so
    a follower woken by ``notify`` finds it whole.
    """

    def __init__(self, path: Path, notify: Callable[[], None]) -> None:
        self.path = path
        self._fd: int | None = None
        self._closed = False
        self._n = 0
        self._notify = notify

    def open(self) -> None:
        """Create the file (and the workflow's folder) unless done. Thread-safe against the
        event loop as long as the loop does not use the writer meanwhile: ``_spawn`` calls it
        in its thread, since creating a file takes ~0.6 ms on some disks (docs/performance.md)."""
        if self._fd is not None or self._closed:
            return
        try:
            self._fd = os.open(self.path, _LOG_FLAGS, 0o666)
        except FileNotFoundError:  # the workflow's first attempt here: make its folder
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, _LOG_FLAGS, 0o666)

    def write(self, stream: str, line: str) -> None:
        if self._closed:
            raise ValueError(f"log {self.path} is closed")
        if self._fd is None:
            self.open()
        assert self._fd is not None
        self._n += 1
        doc = {"n": self._n, "ts": utcnow().isoformat(), "stream": stream, "line": line}
        data = (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._notify()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        self._closed = True
        if fd is not None:
            os.close(fd)
        self._notify()


_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


class _Child:
    """An attempt's process, watched from the event loop without asyncio's subprocess layer.

    The exit is seen through a pidfd; stdout and stderr are two pipes read by loop callbacks
    and cut into lines (a line longer than the read limit is cut at the limit). ``finished``
    resolves once the process exited and both pipes reached end of file, or
    ``_DRAIN_AFTER_EXIT_S`` after the exit when grandchildren keep a pipe open.
    """

    def __init__(self, popen: subprocess.Popen[bytes], out_fd: int, err_fd: int, log: LogWriter):
        self._loop = asyncio.get_running_loop()
        self._popen = popen
        self.pid = popen.pid
        self.returncode: int | None = None
        self._log = log
        self._streams = {out_fd: "stdout", err_fd: "stderr"}
        self._bufs = {out_fd: b"", err_fd: b""}
        self._waiters: list[asyncio.Future[None]] = []
        self.finished: asyncio.Future[None] = self._loop.create_future()
        self._drain: asyncio.TimerHandle | None = None
        for fd in (out_fd, err_fd):
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._on_readable, fd)
        self._pidfd = -1
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfd here: wait in a thread instead
            waiting = self._loop.run_in_executor(None, _wait_blocking, self.pid)
            waiting.add_done_callback(lambda f: self._exited(f.result()))
        else:
            self._loop.add_reader(self._pidfd, self._on_pidfd)

    async def wait(self) -> int | None:
        """Until the process exited (safe to cancel)."""
        if self.returncode is None:
            fut = self._loop.create_future()
            self._waiters.append(fut)
            await fut
        return self.returncode

    def _on_pidfd(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self._exited(_wait_blocking(self.pid))

    def _exited(self, code: int) -> None:
        self.returncode = self._popen.returncode = code
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        if self._streams:
            self._drain = self._loop.call_later(_DRAIN_AFTER_EXIT_S, self.close)
        elif not self.finished.done():
            self.finished.set_result(None)

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_stream(fd)
            return
        buf = self._bufs[fd] + data
        write, name = self._log.write, self._streams[fd]
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            write(name, buf[start:end].decode("utf-8", "replace").rstrip("\r\n"))
            start = end + 1
        buf = buf[start:]
        while len(buf) >= _READ_LIMIT:
            write(name, buf[:_READ_LIMIT].decode("utf-8", "replace"))
            buf = buf[_READ_LIMIT:]
        self._bufs[fd] = buf

    def _close_stream(self, fd: int) -> None:
        name = self._streams.pop(fd)
        self._loop.remove_reader(fd)
        os.close(fd)
        rest = self._bufs.pop(fd)
        if rest:  # the last line had no newline
            self._log.write(name, rest.decode("utf-8", "replace").rstrip("\r\n"))
        if not self._streams and self.returncode is not None:
            if self._drain is not None:
                self._drain.cancel()
            if not self.finished.done():
                self.finished.set_result(None)

    def close(self) -> None:
        """Stop reading (what is buffered is written) and watching; idempotent."""
        for fd in list(self._streams):
            self._close_stream(fd)
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if not self.finished.done():
            self.finished.set_result(None)


def _wait_blocking(pid: int) -> int:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return 255
    return os.waitstatus_to_exitcode(status)


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class _Proc:
    process: _Child | None = None
    cancel_requested: bool = False
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)  # wakes builtin sleeps


class AttemptRunner:
    """Runs claims; one instance per engine."""

    def __init__(
        self,
        *,
        kill_grace_s: float,
        on_pid: Callable[[Claim, int], Any],
        notify_log: Callable[[str], None],
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.kill_grace_s = kill_grace_s
        # Under each task's own env: how `prvng` inside a task reaches this platform (its data
        # dir and store), so it never has to be written into a workflow (secrets stay out).
        self._base_env = {k.encode(): v.encode() for k, v in (base_env or {}).items()}
        self._on_pid = on_pid
        self._notify_log = notify_log
        self._procs: dict[str, _Proc] = {}

    def running(self) -> list[str]:
        return list(self._procs)

    async def cancel(self, task_id: str) -> None:
        """Terminate a running attempt: SIGTERM to its group, SIGKILL after the grace."""
        entry = self._procs.get(task_id)
        if entry is None:
            return
        entry.cancel_requested = True
        entry.cancelled.set()
        if entry.process is not None:
            await _terminate_group(entry.process, self.kill_grace_s)

    async def run(self, claim: Claim) -> Result:
        """Run the attempt to its end and say how it ended (never raises for task failures)."""
        log = LogWriter(claim.log_path, lambda: self._notify_log(claim.task_id))
        entry = _Proc()
        self._procs[claim.task_id] = entry
        try:
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
            # A cancel ends the sleep at once instead of waiting it out.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.cancelled.wait(), min(seconds, timeout))
            if entry.cancel_requested:
                log.write("system", "cancelled")
                return Result(
                    claim.task_id,
                    claim.attempt,
                    claim.phase,
                    ok=False,
                    error="cancelled",
                    cancelled=True,
                )
            if seconds > timeout:
                raise TimeoutError
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
        env = _environment(claim, out_path, self._base_env)
        timeout = float(claim.spec.get("timeout_s", 300))
        cwd = claim.spec.get("cwd") or None
        header = f"{claim.phase} attempt {claim.attempt}: {_show(argv)}"
        if cwd is not None and not Path(cwd).is_dir():
            msg = f"working directory {cwd!r} does not exist"
            log.write("system", header)
            log.write("system", msg)
            return Result(
                claim.task_id, claim.attempt, claim.phase, ok=False, exit_code=127, error=msg
            )
        try:
            proc = await _spawn(argv, env, cwd, log, header)
        except OSError as exc:
            msg = f"cannot start {argv[0]!r}: {exc.strerror or exc}"
            log.write("system", header)
            log.write("system", msg)
            return Result(
                claim.task_id, claim.attempt, claim.phase, ok=False, exit_code=127, error=msg
            )
        entry.process = proc
        timer: asyncio.TimerHandle | None = None
        try:
            pid_note = self._on_pid(claim, proc.pid)
            if asyncio.iscoroutine(pid_note):
                await pid_note
            timed_out = False
            if not proc.finished.done():
                # One future for the common case: the process ends (with its pipes) in time.
                ended = asyncio.get_running_loop().create_future()
                proc.finished.add_done_callback(lambda _f: _release(ended))
                timer = asyncio.get_running_loop().call_later(timeout, _release, ended)
                await ended
                if proc.returncode is None:
                    timed_out = True
                    log.write(
                        "system", f"timed out after {timeout:g}s; terminating the process group"
                    )
                    await _terminate_group(proc, self.kill_grace_s)
                    # Exited (and pipes drained), or a process even SIGKILL does not end.
                    await asyncio.wait({proc.finished}, timeout=_DRAIN_AFTER_EXIT_S)
        finally:
            if timer is not None:
                timer.cancel()
            proc.close()
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
        error = out_err or exit_reason(code)
        log.write("system", error)
        return Result(
            claim.task_id, claim.attempt, claim.phase, ok=False, exit_code=code, error=error
        )


def _environment(
    claim: Claim, out_path: Path, base: Mapping[bytes, bytes] | None = None
) -> dict[bytes, bytes]:
    # Bytes all the way: the child needs bytes, and os.environ would decode every variable
    # only for subprocess to encode it again.
    enc = os.fsencode
    env = dict(os.environb)
    env.update(base or {})
    for key, value in (claim.spec.get("env") or {}).items():
        env[enc(key)] = enc(value)
    env[b"PRVNG_WORKFLOW_ID"] = enc(claim.workflow_id)
    env[b"PRVNG_TASK_ID"] = enc(claim.task_id)
    env[b"PRVNG_TASK_NAME"] = enc(claim.name)
    env[b"PRVNG_ATTEMPT"] = str(claim.attempt).encode()
    env[b"PRVNG_ATTEMPT_ID"] = enc(claim.attempt_id)
    env[b"PRVNG_PHASE"] = enc(claim.phase)
    env[b"PRVNG_IDEMPOTENCY_KEY"] = enc(claim.idempotency_key)
    env[b"PRVNG_OUTPUT"] = enc(out_path)
    for name, outputs in claim.inputs.items():
        env[enc(input_env_name(name))] = enc(json.dumps(outputs))
    return env


_Started = tuple[subprocess.Popen[bytes], int, int]


def _popen(argv: list[str], env: dict[bytes, bytes], cwd: str | None, log: LogWriter) -> _Started:
    """Create the attempt's log file, then start the process in a session of its own, stdout
    and stderr on pipes of their own (blocking: run in a thread)."""
    log.open()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        popen = subprocess.Popen(
            argv,
            stdin=_devnull(),
            stdout=out_w,
            stderr=err_w,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    except BaseException:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    os.close(out_w)
    os.close(err_w)
    return popen, out_r, err_r


async def _spawn(
    argv: list[str], env: dict[bytes, bytes], cwd: str | None, log: LogWriter, header: str
) -> _Child:
    """Start the attempt's process, with ``header`` as the log's first line.

    The log file's creation and the fork/exec run in a thread: each takes ~0.5 ms on this
    kind of disk and machine, during which the event loop (every other attempt, the claims,
    the API) would stand still; it was a third of a worker's time on a DAG of `true` tasks.
    Cancelled meanwhile, the process started anyway is killed and reaped.
    """
    started = asyncio.get_running_loop().run_in_executor(None, _popen, argv, env, cwd, log)
    try:
        popen, out_r, err_r = await asyncio.shield(started)
    except asyncio.CancelledError:
        started.add_done_callback(_discard_started)
        raise
    log.write("system", header)  # before the loop reads any of the process's output
    return _Child(popen, out_r, err_r, log)


def _discard_started(done: asyncio.Future[_Started]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    popen, out_r, err_r = done.result()
    with contextlib.suppress(OSError):
        os.killpg(popen.pid, signal.SIGKILL)
    for fd in (out_r, err_r):
        os.close(fd)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(5)


_DEVNULL: list[int] = []


def _devnull() -> int:
    # One /dev/null for every child's stdin: opening it per spawn is a syscall on the hot path.
    if not _DEVNULL:
        _DEVNULL.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    return _DEVNULL[0]


def _show(argv: list[str]) -> str:
    text = " ".join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


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


async def _terminate_group(proc: _Child, grace: float) -> None:
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
