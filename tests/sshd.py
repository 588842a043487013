"""A real OpenSSH server on 127.0.0.1 for tests (the ``ssh`` provider and anything built on it).

Each :class:`Sshd` has a temporary folder of its own with a fresh Ed25519 host key, a client key
that root accepts, an ``sshd_config``, and a ``known_hosts`` that trusts exactly this server::

    from tests.sshd import Sshd, running_sshd

    with running_sshd() as sshd:
        settings = sshd.provider_settings()  # host, port, user, identity_file, known_hosts, ...
        ...

or as a fixture: ``sshd = Sshd().start()`` ... ``sshd.close()``. :meth:`Sshd.stop` stops the
server but keeps its keys and port, so :meth:`Sshd.start` brings the same server back.

If sshd cannot start, :class:`SshdError` carries its stderr (tests fail; they do not skip).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["SSHD", "Sshd", "SshdError", "free_port", "keygen", "running_sshd"]

SSHD = "/usr/sbin/sshd"
_START_TIMEOUT_S = 10.0


class SshdError(RuntimeError):
    """sshd could not be set up or started (the message has its stderr)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path, comment: str = "prvng-test") -> Path:
    """A new passphrase-less Ed25519 key pair at ``path`` and ``path.pub``; answers ``path``."""
    proc = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise SshdError(f"ssh-keygen -f {path} failed ({proc.returncode}): {proc.stderr.strip()}")
    path.chmod(0o600)
    return path


def public_key(path: Path) -> str:
    """``<type> <base64>`` of the public half of the key at ``path`` (without the comment)."""
    kind, blob = (path.parent / f"{path.name}.pub").read_text().split()[:2]
    return f"{kind} {blob}"


class Sshd:
    """One sshd on 127.0.0.1:``port`` accepting ``client_key`` for root."""

    def __init__(self, port: int | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="prvng-sshd-"))
        try:
            self._setup(port)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.proc: subprocess.Popen[bytes] | None = None

    def _setup(self, port: int | None) -> None:
        self.dir.chmod(0o755)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.host_key = keygen(self.dir / "ssh_host_ed25519_key", "prvng-test-host")
        self.client_key = keygen(self.dir / "id_ed25519", "prvng-test-client")
        self.authorized_keys = self.dir / "authorized_keys"
        self.authorized_keys.write_text(public_key(self.client_key) + "\n")
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line() + "\n")
        self.config = self.dir / "sshd_config"
        self.pid_file = self.dir / "sshd.pid"
        self.log_file = self.dir / "sshd.log"
        self.config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.host}",
                    f"Port {self.port}",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.pid_file}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "StrictModes no",
                    "UsePAM no",
                    "UseDNS no",
                    "PrintMotd no",
                    "MaxStartups 100",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Sshd:
        """Start sshd and wait (bounded) until its port accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise SshdError(
                    f"sshd exited with {self.proc.returncode} on start:\n{self.log_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    s.settimeout(2)
                    if s.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SshdError(
                    f"sshd did not accept on {self.host}:{self.port} within "
                    f"{_START_TIMEOUT_S:g} s:\n{self.log_text()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop sshd, its per-connection processes and what still runs in their sessions (keys
        and port are kept). Processes started detached (reparented to init) are the test's to
        kill."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        leftovers = _descendants(proc.pid)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        # The port is closed once the listener is gone; wait for it (bounded).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
            except OSError:
                return
            time.sleep(0.05)

    def close(self) -> None:
        """Stop sshd and remove its folder."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def known_hosts_line(self, key: Path | None = None) -> str:
        """The ``known_hosts`` line for this server (or claiming ``key`` is its host key)."""
        return f"[{self.host}]:{self.port} {public_key(key or self.host_key)}"

    def new_key(self, name: str) -> Path:
        """Another key pair in this server's folder (not authorized; for negative tests)."""
        return keygen(self.dir / name, f"prvng-test-{name}")

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def provider_settings(self, **overrides: Any) -> dict[str, Any]:
        """Settings for the ``ssh`` provider that reach this server."""
        settings: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": "root",
            "identity_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "connect_timeout_s": 5,
            # The servers' folders on the "remote" host: here, not in /root.
            "workdir": str(self.dir / "work"),
        }
        settings.update(overrides)
        return settings


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc), children first found first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextlib.contextmanager
def running_sshd() -> Iterator[Sshd]:
    """A started :class:`Sshd`, stopped and removed afterwards."""
    sshd = Sshd()
    try:
        yield sshd.start()
    finally:
        sshd.close()
