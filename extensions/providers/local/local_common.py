"""Shared pieces of the ``local`` provider: settings, on-disk records, the workspace lock,
address allocation, running commands and killing the processes of a server.

State lives under the workspace's runtime folder only::

    <runtime_dir>/servers/<hostname>/server.json     the server's record (mode, names, address)
    <runtime_dir>/servers/<hostname>/root/           sandbox mode: the server's root folder
    <runtime_dir>/servers/<hostname>/logs/           logs of background processes
    <runtime_dir>/providers/local/lock               fcntl lock serialising create and delete
    <runtime_dir>/providers/local/allocations.json   pool -> {address: hostname}
    <runtime_dir>/providers/local/bridges.json       bridge -> whether the provider created it

Records are written before the thing they describe is made (write-ahead), so a crash part-way
leaves a record that ``create`` repairs from and ``delete`` cleans up from.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from provisioning.workspace.sdk import Failure, Request

MODES = ("auto", "netns", "sandbox")
DEFAULT_BRIDGE = "prvng0"
DEFAULT_SUBNET = "10.209.0.0/24"
#: Every process started on a server carries ``PRVNG_LOCAL_SERVER=<provider_id>``.
MARKER = "PRVNG_LOCAL_SERVER"
#: Links the provider creates carry an ``ifalias`` starting with this.
ALIAS = "prvng-local"

LOCK_WAIT_S = 120.0
MAX_RECORDS = 10_000
OUTPUT_CAP = 4 * 1024 * 1024
DEFAULT_EXEC_TIMEOUT_S = 300.0
BACKGROUND_GRACE_S = 0.3
KILL_ROUNDS = 5
TERM_WAIT_S = 3.0
KILL_WAIT_S = 2.0

_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")

Record = dict[str, Any]
Progress = Callable[[str], None]


# ---------------------------------------------------------------------- settings and context


@dataclass(frozen=True)
class Settings:
    """The provider settings, checked."""

    mode: str
    bridge: str
    subnet: ipaddress.IPv4Network


def parse_settings(raw: Mapping[str, Any]) -> Settings:
    """Raises: Failure naming the bad setting."""
    mode = raw.get("mode") or "auto"
    if mode not in MODES:
        raise Failure(f"setting mode: expected one of {', '.join(MODES)}, got {mode!r}")
    bridge = raw.get("bridge") or DEFAULT_BRIDGE
    if not isinstance(bridge, str) or not _IFNAME.match(bridge):
        raise Failure(
            f"setting bridge: {bridge!r} is not an interface name "
            "(letters, digits, '_', '.', '-'; 15 characters at most)"
        )
    subnet_raw = raw.get("subnet") or DEFAULT_SUBNET
    try:
        subnet = ipaddress.IPv4Network(str(subnet_raw), strict=True)
    except ValueError as exc:
        raise Failure(
            f"setting subnet: {subnet_raw!r} is not an IPv4 network such as 10.209.0.0/24 ({exc})"
        ) from None
    if not 16 <= subnet.prefixlen <= 30:
        raise Failure(f"setting subnet: {subnet} must have a prefix between /16 and /30")
    if subnet.is_loopback or subnet.is_multicast or subnet.is_link_local or subnet.is_reserved:
        raise Failure(f"setting subnet: {subnet} is not usable for servers (use a private range)")
    return Settings(str(mode), bridge, subnet)


def check_hostname(server: Mapping[str, Any]) -> str:
    """The server's hostname, checked (it becomes part of file and namespace names)."""
    host = server.get("hostname")
    if not isinstance(host, str) or not _HOSTNAME.match(host):
        raise Failure(
            f"hostname {host!r}: expected letters, digits, '.', '_' or '-' (63 at most), "
            "starting and ending with a letter or digit"
        )
    return host


@dataclass(frozen=True)
class Ctx:
    """Where this workspace keeps the provider's state."""

    runtime_dir: Path
    dry_run: bool
    progress: Progress

    @classmethod
    def from_request(cls, req: Request) -> Ctx:
        return cls(req.runtime_dir.resolve(), bool(req.context.get("dry_run")), req.progress)

    @property
    def ws_id(self) -> str:
        """8 hex digits naming this workspace in host-wide names (namespaces, link aliases)."""
        return hashlib.sha256(str(self.runtime_dir).encode()).hexdigest()[:8]

    @property
    def servers_dir(self) -> Path:
        return self.runtime_dir / "servers"

    @property
    def provider_dir(self) -> Path:
        return self.runtime_dir / "providers" / "local"

    def server_dir(self, host: str) -> Path:
        return self.servers_dir / host

    def provider_id(self, host: str) -> str:
        """Unique per workspace and hostname: the namespace name, and the sandbox marker."""
        return f"prvng-{self.ws_id}-{host}"

    def short_hash(self, host: str, n: int = 10) -> str:
        return hashlib.sha256(f"{self.runtime_dir}\0{host}".encode()).hexdigest()[:n]


class Mode(Protocol):
    """What each mode (``netns``, ``sandbox``) implements."""

    name: str

    def available(self) -> bool: ...

    def create(self, ctx: Ctx, host: str, settings: Settings, rec: Record | None) -> Record:
        """Make the server (or repair a half-made one, or answer a healthy one unchanged)."""
        ...

    def status(self, ctx: Ctx, rec: Record) -> str: ...

    def teardown(self, ctx: Ctx, rec: Record) -> None:
        """Kill everything running on the server and remove what the mode made on the host."""
        ...

    def after_removal(self, ctx: Ctx, rec: Record) -> None:
        """Called once the server's folder and allocation are gone."""
        ...

    def exec_target(self, ctx: Ctx, rec: Record) -> tuple[list[str], Path]:
        """The argv prefix that runs a command on the server, and its working folder."""
        ...


# ---------------------------------------------------------------------- files and records


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise Failure(f"{path} is not valid JSON ({exc}); fix or remove it") from None


def write_json(path: Path, data: Any) -> None:
    """Write atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def record_path(ctx: Ctx, host: str) -> Path:
    return ctx.server_dir(host) / "server.json"


def load_record(ctx: Ctx, host: str) -> Record | None:
    data = read_json(record_path(ctx, host))
    if data is None:
        return None
    if isinstance(data, dict) and data.get("provider") not in (None, "local"):
        return None  # another provider's server (ssh keeps its records here too)
    if not isinstance(data, dict) or data.get("hostname") != host or "mode" not in data:
        raise Failure(f"{record_path(ctx, host)} is not a server record of {host}; remove it")
    return data


def save_record(ctx: Ctx, rec: Record) -> None:
    write_json(record_path(ctx, str(rec["hostname"])), rec)


def all_records(ctx: Ctx) -> list[Record]:
    """Every server record of this workspace, by hostname."""
    if not ctx.servers_dir.is_dir():
        return []
    found: list[Record] = []
    for i, folder in enumerate(sorted(ctx.servers_dir.iterdir())):
        if i >= MAX_RECORDS:
            ctx.progress(f"more than {MAX_RECORDS} server folders; listing the first ones")
            break
        if folder.is_dir() and _HOSTNAME.match(folder.name):
            rec = load_record(ctx, folder.name)
            if rec is not None:
                found.append(rec)
    return found


@contextlib.contextmanager
def workspace_lock(ctx: Ctx, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold ``providers/local/lock`` (fcntl) so parallel creates and deletes of one workspace
    do not collide. Waits at most ``wait_s``."""
    ctx.provider_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.provider_dir / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Failure(
                        f"{path}: another create or delete held the lock for more than {wait_s:g} s"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------- address allocation


def _allocations_path(ctx: Ctx) -> Path:
    return ctx.provider_dir / "allocations.json"


def _load_allocations(ctx: Ctx) -> dict[str, dict[str, str]]:
    data = read_json(_allocations_path(ctx)) or {}
    if not isinstance(data, dict):
        raise Failure(f"{_allocations_path(ctx)} is not an object of pools; fix or remove it")
    return {str(k): dict(v) for k, v in data.items() if isinstance(v, dict)}


def allocate(
    ctx: Ctx, pool: str, host: str, candidates: Iterable[str], taken: set[str], what: str
) -> str:
    """The address ``host`` holds in ``pool``, or the first free candidate (not allocated in
    this workspace and not in ``taken``), recorded. Call with the workspace lock held.

    Raises: Failure when the range is exhausted.
    """
    data = _load_allocations(ctx)
    table = data.setdefault(pool, {})
    for address, owner in table.items():
        if owner == host:
            return address
    for address in candidates:
        if address not in table and address not in taken:
            table[address] = host
            write_json(_allocations_path(ctx), data)
            return address
    raise Failure(
        f"{what}: address range exhausted ({len(table)} addresses allocated in this workspace, "
        f"{len(taken)} more in use on this host); delete servers or choose a larger subnet"
    )


def release(ctx: Ctx, host: str) -> bool:
    """Free every address ``host`` holds. Answers whether it held any."""
    data = _load_allocations(ctx)
    held = False
    for table in data.values():
        for address in [a for a, owner in table.items() if owner == host]:
            del table[address]
            held = True
    if held:
        write_json(_allocations_path(ctx), {k: v for k, v in data.items() if v})
    return held


# ---------------------------------------------------------------------- processes


def all_pids() -> list[int]:
    """Every process id on this host."""
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _ancestors() -> set[int]:
    """This process and its ancestors: never killed, whatever they carry."""
    seen: set[int] = set()
    pid = os.getpid()
    for _ in range(128):
        if pid <= 1 or pid in seen:
            break
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return seen


def pids_with_env(name: str, value: str) -> list[int]:
    """Processes whose environment holds ``name=value`` (zombies have none)."""
    entry = f"{name}={value}".encode()
    found: list[int] = []
    for pid in all_pids():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone, or not ours to read (then not ours to kill either)
            continue
        if entry in env.split(b"\0"):
            found.append(pid)
    return found


def kill_processes(scan: Callable[[], list[int]], verify: Callable[[int], bool], what: str) -> int:
    """Kill what ``scan`` finds: SIGTERM, then SIGKILL, rescanning for processes started
    meanwhile; every wait is bounded. Each pid is pinned with a pidfd and re-checked with
    ``verify`` before it is signalled, so a recycled pid is never hit. Answers how many were
    signalled.

    Raises: Failure when some survive every round.
    """
    spare = _ancestors()
    signalled: set[int] = set()
    for round_no in range(KILL_ROUNDS):
        pids = [p for p in scan() if p not in spare]
        if not pids:
            return len(signalled)
        sig = signal.SIGTERM if round_no == 0 else signal.SIGKILL
        fds: list[int] = []
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # already gone
                continue
            try:
                if verify(pid):
                    signal.pidfd_send_signal(fd, sig)
                    signalled.add(pid)
                    fds.append(fd)
                    continue
            except ProcessLookupError:
                pass
            os.close(fd)
        _wait_exit(fds, TERM_WAIT_S if round_no == 0 else KILL_WAIT_S)
        for fd in fds:
            os.close(fd)
    left = [p for p in scan() if p not in spare]
    if left:
        raise Failure(f"{what}: processes {left[:20]} survive SIGKILL; try delete again later")
    return len(signalled)


def _wait_exit(fds: list[int], wait_s: float) -> None:
    """Until every pidfd reports its process exited, or ``wait_s`` passed."""
    if not fds:
        return
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    pending = set(fds)
    deadline = time.monotonic() + wait_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for fd, _ in poller.poll(int(left * 1000) + 1):
            pending.discard(fd)
            poller.unregister(fd)


def remove_tree(path: Path) -> None:
    """Remove ``path`` (bounded retries: a dying process may still be writing a log)."""
    for attempt in range(5):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if attempt == 4:
                raise Failure(f"cannot remove {path}: {exc}") from None
            time.sleep(0.2)


# ---------------------------------------------------------------------- exec


@dataclass(frozen=True)
class ExecRequest:
    command: list[str]
    input: str | None
    env: dict[str, str]
    timeout_s: float
    background: bool


def parse_exec(settings: Mapping[str, Any]) -> ExecRequest:
    """Raises: Failure naming the bad field."""
    command = settings.get("command")
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(a, str) for a in command)
        or not command[0]
    ):
        raise Failure(
            f"exec: settings.command must be a non-empty list of strings, got {command!r}"
        )
    text = settings.get("input")
    if text is not None and not isinstance(text, str):
        raise Failure("exec: settings.input must be text")
    env = settings.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise Failure("exec: settings.env must be an object of strings")
    timeout = settings.get("timeout_s")
    try:
        timeout_s = DEFAULT_EXEC_TIMEOUT_S if timeout is None else float(timeout)
    except (TypeError, ValueError):
        raise Failure(f"exec: settings.timeout_s must be a number, got {timeout!r}") from None
    if timeout_s <= 0:
        raise Failure("exec: settings.timeout_s must be positive")
    return ExecRequest(
        list(command), text, dict(env), timeout_s, bool(settings.get("background", False))
    )


def _require_command(argv0: str, env: Mapping[str, str], cwd: Path) -> None:
    """Fail (an error of the provider, not an exit code) when the command does not exist."""
    if "/" in argv0:
        path = Path(argv0) if argv0.startswith("/") else cwd / argv0
        if os.access(path, os.X_OK) and path.is_file():
            return
    elif shutil.which(argv0, path=env.get("PATH", os.defpath)):
        return
    raise Failure(f"exec: command not found or not executable: {argv0}")


def execute(
    req: ExecRequest, prefix: Sequence[str], cwd: Path, markers: Mapping[str, str], log_dir: Path
) -> dict[str, Any]:
    """Run ``req.command`` behind ``prefix`` in ``cwd``: the exec answer of the protocol."""
    env = dict(os.environ)
    env.update(req.env)
    env.update(markers)
    _require_command(req.command[0], env, cwd)
    argv = [*prefix, *req.command]
    if req.background:
        return _start_background(argv, cwd, env, log_dir, req.command[0])
    return _run_foreground(argv, cwd, env, req.input, req.timeout_s)


def _run_foreground(
    argv: list[str], cwd: Path, env: dict[str, str], text: str | None, timeout_s: float
) -> dict[str, Any]:
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise Failure(f"exec: cannot run {argv[0]}: {exc.strerror}") from None
    out = bytearray()
    err = bytearray()

    def reader(stream: Any, buf: bytearray) -> None:
        while True:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                return
            if len(buf) < OUTPUT_CAP:
                buf.extend(chunk[: OUTPUT_CAP - len(buf)])

    def writer() -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write((text or "").encode())
            proc.stdin.close()
        except OSError:  # the command exited without reading all of it
            pass

    threads = [
        threading.Thread(target=reader, args=(proc.stdout, out), daemon=True),
        threading.Thread(target=reader, args=(proc.stderr, err), daemon=True),
    ]
    if text is not None:
        threads.append(threading.Thread(target=writer, daemon=True))
    for t in threads:
        t.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        tail = err.decode("utf-8", "replace").strip().splitlines()[-5:]
        raise Failure(
            f"exec: {argv[-1] if len(argv) == 1 else ' '.join(argv)} did not finish within "
            f"{timeout_s:g} s (killed)" + (f": {' | '.join(tail)}" if tail else "")
        ) from None
    # Something the command left running may hold its pipes: read what comes soon, then stop.
    deadline = time.monotonic() + 2.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    answer: dict[str, Any] = {
        "exit_code": code if code >= 0 else 128 - code,
        "stdout": out.decode("utf-8", "replace"),
        "stderr": err.decode("utf-8", "replace"),
    }
    if code < 0:
        answer["signal"] = -code
    return answer


def _start_background(
    argv: list[str], cwd: Path, env: dict[str, str], log_dir: Path, name: str
) -> dict[str, Any]:
    """Start detached: own session, stdin from /dev/null, stdout and stderr to a log file; no
    descriptor of this process (its answer pipe included) is inherited."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name).name)[:40] or "command"
    log = log_dir / f"{stamp}-{base}-{os.getpid()}.log"
    with open(log, "ab") as fh:
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise Failure(f"exec: cannot start {argv[0]}: {exc.strerror}") from None
    try:
        code = proc.wait(BACKGROUND_GRACE_S)
    except subprocess.TimeoutExpired:
        code = None
    if code is None:
        proc.returncode = 0  # it runs on, detached: not this process's to wait for
    answer: dict[str, Any] = {
        "exit_code": 0,
        "stdout": "",
        "stderr": "",
        "pid": proc.pid,
        "log": str(log),
    }
    if code is not None and code != 0:
        answer["exit_code"] = code if code >= 0 else 128 - code
        answer["stderr"] = log.read_text(errors="replace")[-4000:]
    return answer
