"""SSH connections and remote commands with asyncssh.

Every failure one can expect (unknown or changed host key, refused key, refused or timed-out
connection, a command that runs too long) becomes an :class:`SshFailure` with one line naming
the server and ``host:port``; the sdk prints it to stderr and exits 1. Key material is never
printed: errors name key files by path only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import shlex
import signal
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncssh
from ssh_settings import Conn

from provisioning.workspace.sdk import Failure

__all__ = ["Completed", "SshFailure", "connect", "run_command", "start_background"]

# asyncssh logs through `logging`; with no handler Python would print its warnings to stderr.
_log = logging.getLogger("asyncssh")
_log.addHandler(logging.NullHandler())
_log.propagate = False

_PID_MARK = "prvng-exec-pid:"
_CANNOT_MARK = "prvng-exec-cannot:"
# The wrappers below run as `sh -c <script> sh [<log>] NAME=value... -- <argv...>`, so the
# remote user's login shell only ever sees one quoted command line. The prelude exports the
# environment (whatever the server's AcceptEnv) and checks that the program exists and is
# executable: a command that cannot run is the provider's error, not an exit code.
_PRELUDE = (
    'while [ "$1" != -- ]; do export "$1"; shift; done; shift; __prvng_why=; '
    'if [ -n "${PRVNG_WORKDIR:-}" ]; then mkdir -p "$PRVNG_WORKDIR" && cd "$PRVNG_WORKDIR" || '
    f'{{ printf "%s%s: cannot enter\\n" "{_CANNOT_MARK}" "$PRVNG_WORKDIR" >&2; exit 127; }}; fi; '
    'case $1 in */*) if [ ! -e "$1" ]; then __prvng_why="not found"; '
    'elif [ -d "$1" ] || [ ! -x "$1" ]; then __prvng_why="not executable"; fi;; '
    '*) command -v "$1" >/dev/null 2>&1 || __prvng_why="not found";; esac; '
    'if [ -n "$__prvng_why" ]; then '
    f'printf "%s%s: %s\\n" "{_CANNOT_MARK}" "$1" "$__prvng_why" >&2; exit 127; fi; '
)
# Foreground, started with `exec sh -c ...`: the session's first process (sshd makes it a
# session and process-group leader) reports its pid, which is also the process group of the
# command, then becomes the command. On timeout the whole group is killed.
_FOREGROUND = _PRELUDE + f'printf "%s%s\\n" "{_PID_MARK}" "$$" >&2; exec "$@"'
# Background: start the command detached (own session, no hangup, stdin from /dev/null, output
# to the log) and print its pid. In a non-interactive shell a background job is not a
# process-group leader, so setsid does not fork and `$!` is the command's own pid.
_BACKGROUND = (
    "for __prvng_p in nohup setsid; do command -v $__prvng_p >/dev/null 2>&1 || { "
    f'printf "%s%s: not found\\n" "{_CANNOT_MARK}" "$__prvng_p" >&2; exit 127; }}; done; '
    "__prvng_log=$1; shift; "
    + _PRELUDE
    + 'nohup setsid "$@" >"$__prvng_log" 2>&1 </dev/null & echo "$!"; '
    # ... then where the log is, absolute (a relative one is in the server's folder).
    + 'case $__prvng_log in /*) echo "$__prvng_log";; *) echo "$PWD/$__prvng_log";; esac'
)
_MAX_HEAD_LINES = 100
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SshFailure(Failure):
    """An SSH failure; ``unreachable`` when the server could not be reached at all (as opposed
    to reached but not trusted, or refusing the key)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class Completed:
    exit_code: int
    stdout: str
    stderr: str
    signal: str | None = None


# ---------------------------------------------------------------------- connecting


def _load_key(conn: Conn) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(str(conn.identity_file))
    except asyncssh.KeyEncryptionError:
        raise SshFailure(
            f"ssh {conn.where}: identity_file {conn.identity_file} is encrypted; "
            "the ssh provider needs a key without a passphrase"
        ) from None
    except asyncssh.KeyImportError as exc:
        reason = "encrypted (needs a passphrase)" if "assphrase" in str(exc) else str(exc)
        raise SshFailure(
            f"ssh {conn.where}: identity_file {conn.identity_file} is not a usable private key: "
            f"{reason}"
        ) from None
    except (OSError, ValueError) as exc:
        raise SshFailure(
            f"ssh {conn.where}: cannot read identity_file {conn.identity_file}: "
            f"{getattr(exc, 'strerror', None) or type(exc).__name__}"
        ) from None


def _load_known_hosts(conn: Conn) -> asyncssh.SSHKnownHosts:
    try:
        return asyncssh.read_known_hosts(str(conn.known_hosts))
    except (OSError, ValueError) as exc:
        raise SshFailure(
            f"ssh {conn.where}: cannot use known_hosts {conn.known_hosts}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from None


def _host_key_reason(conn: Conn, known: asyncssh.SSHKnownHosts) -> str:
    try:
        matched = known.match(conn.host, conn.host, conn.port)
        listed = bool(matched[0] or matched[1])
    except Exception:  # only to word the message better
        listed = True
    if not listed:
        return (
            f"known_hosts {conn.known_hosts} has no key for {conn.endpoint} "
            f"(add it, e.g. from `ssh-keyscan -p {conn.port} {conn.host}` checked out of band)"
        )
    return (
        f"the host key that {conn.endpoint} presented is not among those known_hosts "
        f"{conn.known_hosts} lists for it (changed host key, or another server at that address)"
    )


@asynccontextmanager
async def connect(conn: Conn) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """An authenticated connection to ``conn`` (closed on exit).

    Raises:
        SshFailure: with a one-line reason naming ``user@host:port``.
    """
    key = _load_key(conn)
    known = _load_known_hosts(conn)
    try:
        ssh = await asyncssh.connect(
            conn.host,
            conn.port,
            username=conn.user,
            client_keys=[key],
            known_hosts=known,
            connect_timeout=conn.connect_timeout_s,
            preferred_auth="publickey",
            agent_path=None,
            config=None,
            x509_trusted_certs=None,
            x509_trusted_cert_paths=None,
        )
    except asyncssh.HostKeyNotVerifiable:
        raise SshFailure(
            f"ssh {conn.where}: host key verification failed: {_host_key_reason(conn, known)}"
        ) from None
    except asyncssh.PermissionDenied:
        raise SshFailure(
            f"ssh {conn.where}: authentication failed: {conn.user} is not accepted with the "
            f"key in {conn.identity_file} (is its public key in the server's authorized_keys?)"
        ) from None
    except asyncssh.ConnectionLost as exc:
        raise SshFailure(
            f"ssh {conn.where}: the connection was lost during the SSH handshake: {exc.reason}",
            unreachable=True,
        ) from None
    except asyncssh.DisconnectError as exc:
        raise SshFailure(f"ssh {conn.where}: the SSH handshake failed: {exc.reason}") from None
    except TimeoutError:
        raise SshFailure(
            f"ssh {conn.where}: no SSH connection to {conn.endpoint} within "
            f"{conn.connect_timeout_s:g} s (connect_timeout_s)",
            unreachable=True,
        ) from None
    except ConnectionRefusedError:
        raise SshFailure(
            f"ssh {conn.where}: connection refused by {conn.endpoint} (no SSH server listening)",
            unreachable=True,
        ) from None
    except socket.gaierror as exc:
        raise SshFailure(
            f"ssh {conn.where}: cannot resolve {conn.host}: {exc.strerror}", unreachable=True
        ) from None
    except OSError as exc:
        raise SshFailure(
            f"ssh {conn.where}: cannot connect to {conn.endpoint}: {exc.strerror or exc}",
            unreachable=True,
        ) from None
    except (asyncssh.Error, ValueError) as exc:
        raise SshFailure(f"ssh {conn.where}: {type(exc).__name__}: {exc}") from None
    try:
        yield ssh
    finally:
        ssh.close()
        await ssh.wait_closed()


# ---------------------------------------------------------------------- commands


def _args(argv: Sequence[str], env: Mapping[str, str] | None) -> list[str]:
    """The wrappers' arguments: ``NAME=value... -- argv...``."""
    return [*(f"{k}={v}" for k, v in (env or {}).items()), "--", *argv]


def check_env(raw: object, hostname: str) -> dict[str, str]:
    """The ``env`` setting as a str -> str mapping.

    Raises:
        Failure: it is not an object of variable names to strings (or numbers).
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise Failure(
            f"exec on {hostname}: settings.env must be an object of NAME: value, got {raw!r}"
        )
    env: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise Failure(f"exec on {hostname}: settings.env: {name!r} is not a variable name")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise Failure(
                f"exec on {hostname}: settings.env.{name} must be a string, got {value!r}"
            )
        env[name] = str(value)
    return env


def _exit_code(
    proc: asyncssh.SSHClientProcess[str], conn: Conn, shown: str
) -> tuple[int, str | None]:
    if proc.exit_signal:
        name = proc.exit_signal[0]
        try:
            number = int(signal.Signals[f"SIG{name}"])
        except KeyError:
            number = 0
        return 128 + number, name
    if proc.exit_status is None or proc.exit_status < 0:
        raise SshFailure(f"ssh {conn.where}: {shown} ended without an exit status")
    return proc.exit_status, None


def _shown(argv: Sequence[str]) -> str:
    text = shlex.join(argv)
    return f"`{text if len(text) <= 80 else text[:77] + '...'}`"


async def _kill_group(ssh: asyncssh.SSHClientConnection, pid: int) -> None:
    """Kill the remote process group ``pid`` (best effort, bounded)."""
    kill = f"kill -s KILL -- -{pid} 2>/dev/null || kill -s KILL {pid} 2>/dev/null; true"
    try:
        await ssh.run(kill, stdin=asyncssh.DEVNULL, timeout=5)
    except (asyncssh.Error, OSError):
        pass


async def run_command(
    ssh: asyncssh.SSHClientConnection,
    conn: Conn,
    argv: Sequence[str],
    *,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> Completed:
    """Run ``argv`` on the server and wait for it.

    Raises:
        SshFailure: the session could not be opened, the connection broke, or it ran longer
            than ``timeout_s`` (it is then killed with its process group and the channel closed).
    """
    shown = _shown(argv)
    command = shlex.join(["exec", "sh", "-c", _FOREGROUND, "sh", *_args(argv, env)])
    started = time.monotonic()
    try:
        proc: asyncssh.SSHClientProcess[str] = await ssh.create_process(
            command,
            stdin=asyncssh.PIPE if input else asyncssh.DEVNULL,
            encoding="utf-8",
            errors="replace",
        )
    except (asyncssh.Error, OSError) as exc:
        raise SshFailure(f"ssh {conn.where}: cannot start {shown}: {exc}") from None
    pid: list[int] = []

    async def collect() -> tuple[str, str]:
        # The wrapper's pid line comes first, unless the login shell's start-up files print
        # something to stderr before: that is kept as the command's stderr.
        head: list[str] = []
        for _ in range(_MAX_HEAD_LINES):
            line = await proc.stderr.readline()
            if line.startswith(_CANNOT_MARK):
                cannot.append(line[len(_CANNOT_MARK) :].strip())
                break
            mark = line[len(_PID_MARK) :].strip() if line.startswith(_PID_MARK) else ""
            if mark.isdigit():
                pid.append(int(mark))
                break
            head.append(line)
            if not line:  # EOF: the wrapper never ran
                break
        out, err = await proc.communicate(None if cannot else input or None)
        return out, "".join(head) + err

    cannot: list[str] = []
    try:
        out, err = await asyncio.wait_for(collect(), timeout_s)
    except TimeoutError:
        if pid:
            await _kill_group(ssh, pid[0])
        proc.close()
        raise SshFailure(
            f"ssh {conn.where}: {shown} did not finish within {timeout_s:g} s "
            f"(timeout_s; {'killed' if pid else 'channel closed'})"
        ) from None
    except (asyncssh.Error, OSError) as exc:
        raise SshFailure(
            f"ssh {conn.where}: {shown} was cut off after {time.monotonic() - started:.1f} s: "
            f"{getattr(exc, 'reason', None) or exc}"
        ) from None
    if cannot:
        raise SshFailure(f"ssh {conn.where}: cannot run {shown}: {cannot[0]} on the server")
    code, sig = _exit_code(proc, conn, shown)
    return Completed(exit_code=code, stdout=out, stderr=err, signal=sig)


async def start_background(
    ssh: asyncssh.SSHClientConnection,
    conn: Conn,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log: str | None = None,
    timeout_s: float | None = None,
) -> tuple[int, str]:
    """Start ``argv`` detached on the server (it outlives the connection); answers its pid and
    the remote file its output goes to.

    Raises:
        SshFailure: it could not be started.
    """
    shown = _shown(argv)
    if log is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        # Relative: the wrapper enters the server's own folder (workdir) before redirecting.
        log = f"prvng-exec-{stamp}-{secrets.token_hex(4)}.log"
    command = shlex.join(["sh", "-c", _BACKGROUND, "sh", log, *_args(argv, env)])
    try:
        result = await ssh.run(
            command,
            stdin=asyncssh.DEVNULL,
            encoding="utf-8",
            errors="replace",
            timeout=timeout_s or 60,
        )
    except asyncssh.TimeoutError:
        raise SshFailure(
            f"ssh {conn.where}: starting {shown} in the background took over {timeout_s or 60:g} s"
        ) from None
    except (asyncssh.Error, OSError) as exc:
        raise SshFailure(
            f"ssh {conn.where}: cannot start {shown} in the background: {exc}"
        ) from None
    lines = str(result.stdout or "").strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(lines) > 1:
        log = lines[1].strip()
    errors = str(result.stderr or "")
    if _CANNOT_MARK in errors:
        why = errors.split(_CANNOT_MARK, 1)[1].splitlines()[0].strip()
        raise SshFailure(
            f"ssh {conn.where}: cannot start {shown} in the background: {why} on the server"
        )
    if result.exit_status != 0 or not text.isdigit():
        why = errors.strip().replace("\n", " | ") or f"printed {text!r}"
        raise SshFailure(
            f"ssh {conn.where}: cannot start {shown} in the background "
            f"(exit code {result.exit_status}): {why}"
        )
    return int(text), log
