"""Provider backends for the contract suite (``test_provider_contract.py``).

A backend is one way of getting servers: a provider extension, the settings that select how it
works, and the few things only it knows — what "inside a server" means, what it could leave
behind on the host, and how to clean that up as a last resort. The suite drives every backend
exactly as the platform does: ``resolve`` the extension, build requests with ``request(...)``,
``run_operation(...)``.

What a backend's servers *are* differs: the ``local`` provider isolates each server (an address
of its own, ``delete`` kills whatever was started in it); the ``ssh`` provider registers hosts
that exist anyway (all of them here are the sshd's 127.0.0.1, and ``delete`` never touches the
host). Such differences are capabilities, class data on the backend (:attr:`Backend.own_address`,
:attr:`Backend.isolates`, ...): the suite runs a behaviour only on the backends that have what it
tests, and everything else on all of them.

Adding a backend is subclassing :class:`Backend` (set its capabilities, implement
:meth:`Backend.open` — ``pytest.skip`` with a reason when it cannot run here — and override the
hooks) and adding one entry to :data:`BACKENDS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from provisioning.core.errors import ExtensionError
from provisioning.workspace.extensions import Extension, request, resolve, run_operation
from tests.sshd import Sshd

__all__ = ["BACKENDS", "Backend", "ExtensionError"]


class Backend:
    """A provider under test, bound to one temporary workspace."""

    name = "abstract"
    provider = ""  # the provider extension: providers/<provider>
    #: The Python interpreter to use on the servers.
    python = "python3"

    # ------------------------------------------------------------------ capabilities
    # Class data, read when the suite is collected: a test of a capability runs only on the
    # backends that have it.

    #: Every server has an address of its own: servers made at once get distinct addresses and
    #: reach each other at them.
    own_address = False
    #: A server is a world of its own: ``delete`` kills everything started in it (descendants
    #: too) and removes everything the provider made for it.
    isolates = False
    #: :meth:`break_server` can leave a server half-made, as a crash would; ``status`` then says
    #: ``stopped`` and ``create`` repairs it.
    repairs = False
    #: :meth:`one_server_settings` gives an address range with room for exactly one server.
    exhaustible = False

    def __init__(self, workspace: Path, settings: dict[str, Any]) -> None:
        self.workspace = workspace
        self.settings = settings
        self.known: dict[str, dict[str, Any]] = {}  # hostname -> last server answer
        self._ext: Extension | None = None

    @classmethod
    def open(cls, workspace: Path) -> Backend:
        """A backend bound to ``workspace`` (which exists); ``pytest.skip`` when it cannot run
        here."""
        raise NotImplementedError

    # ------------------------------------------------------------------ driving the provider

    @property
    def ext(self) -> Extension:
        if self._ext is None:
            self._ext = resolve(f"providers/{self.provider}", self.workspace)
        return self._ext

    def settings_of(self, host: str) -> dict[str, Any]:
        """The provider settings of ``host``: the backend's (and any of the server's own)."""
        return dict(self.settings)

    def server(self, host: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """The server as the platform passes it (with what the inventory knows); ``settings``
        over its provider settings."""
        known = self.known.get(host, {})
        return {
            "hostname": host,
            "provider": self.provider,
            "plan": "small",
            "zone": "local",
            "labels": {},
            "taskservs": [],
            "provider_settings": {**self.settings_of(host), **(settings or {})},
            "address": known.get("address"),
            "provider_id": known.get("provider_id"),
        }

    def call(
        self, operation: str, target: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        # As the platform does: the server's provider settings, plus the operation's own.
        own = target["server"]["provider_settings"] if target["kind"] == "server" else {}
        body = request(
            target,
            {**self.settings, **own, **(extra or {})},
            workspace=self.workspace,
            infra=None,
            ext=self.ext,
        )
        timeout = float((extra or {}).get("timeout_s", 60)) + 30
        return run_operation(self.ext, operation, body, timeout_s=timeout)

    def create(self, host: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create ``host`` (with ``settings`` over the backend's); teardown deletes it."""
        self.known.setdefault(host, {})
        target = {"kind": "server", "server": self.server(host, settings)}
        answer = self.call("create", target)
        server = dict(answer["server"])
        self.known[host] = server
        return server

    def status(self, host: str) -> dict[str, Any]:
        return dict(self.call("status", {"kind": "server", "server": self.server(host)})["server"])

    def list_servers(self, hosts: Sequence[str] = ()) -> list[dict[str, Any]]:
        target = {"kind": "servers", "servers": [self.server(h) for h in hosts]}
        return [dict(s) for s in self.call("list", target)["servers"]]

    def delete(self, host: str) -> bool:
        return bool(self.call("delete", {"kind": "server", "server": self.server(host)})["deleted"])

    def exec(
        self,
        host: str,
        argv: Sequence[str],
        *,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 30.0,
        background: bool = False,
    ) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "command": list(argv),
            "timeout_s": timeout_s,
            "background": background,
        }
        if input is not None:
            extra["input"] = input
        if env:
            extra["env"] = env
        return self.call("exec", {"kind": "server", "server": self.server(host)}, extra)

    def close(self) -> None:
        """Teardown: delete every server the test touched, then the last-resort cleanup."""
        for host in list(self.known):
            with contextlib.suppress(ExtensionError):
                self.delete(host)
        self.force_cleanup()

    # ------------------------------------------------------------------ hooks

    def assert_inside(self, server: dict[str, Any]) -> None:
        """Assert that ``exec`` runs inside ``server`` (not merely on the test's host)."""
        raise NotImplementedError

    def free_port(self, address: str) -> int:
        """A TCP port free on ``address``."""
        raise NotImplementedError

    def process_alive(self, pid: int) -> bool:
        """Whether the process ``pid`` (as ``exec`` answered it) still runs."""
        raise NotImplementedError

    def break_server(self, server: dict[str, Any]) -> None:
        """Leave ``server`` half-made, as a crash would (see :attr:`repairs`)."""
        raise NotImplementedError

    def bad_settings(self) -> list[tuple[dict[str, Any], str]]:
        """Settings ``create`` must refuse, each with a regex of what the error names."""
        raise NotImplementedError

    def one_server_settings(self) -> dict[str, Any]:
        """Settings whose address range has room for exactly one server (see
        :attr:`exhaustible`)."""
        raise NotImplementedError

    def leftovers(self) -> list[str]:
        """What this test's servers left on the host (empty once every server is deleted)."""
        return []

    def force_cleanup(self) -> None:
        """Remove whatever is left with this test's unique names (never anything else)."""


# ---------------------------------------------------------------------- local


def _local_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has finished


def _host_ipv4() -> list[ipaddress.IPv4Interface]:
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return [
        ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
        for entry in json.loads(out or "[]")
        for a in entry.get("addr_info", [])
        if "local" in a
    ]


def _processes_with_env_prefix(prefix: bytes) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if any(e.startswith(prefix) for e in env.split(b"\0")):
            found.append(int(name))
    return found


class _Local(Backend):
    provider = "local"
    python = sys.executable
    own_address = True
    isolates = True
    repairs = True

    @property
    def runtime_dir(self) -> Path:
        return (self.workspace / "runtime").resolve()

    @property
    def ns_prefix(self) -> str:
        """``provider_id`` = ``prvng-<8 hex of sha256(runtime_dir)>-<hostname>``."""
        return f"prvng-{hashlib.sha256(str(self.runtime_dir).encode()).hexdigest()[:8]}-"

    def process_alive(self, pid: int) -> bool:
        return _local_alive(pid)

    def bad_settings(self) -> list[tuple[dict[str, Any], str]]:
        return [
            ({"mode": "vm"}, "setting mode"),
            ({"subnet": "10.0.0.0/33"}, "setting subnet"),
            ({"subnet": "127.0.0.0/24"}, "setting subnet"),
            ({"bridge": "a-bridge-name-too-long"}, "setting bridge"),
        ]

    def _marked(self) -> list[int]:
        return _processes_with_env_prefix(f"PRVNG_LOCAL_SERVER={self.ns_prefix}".encode())

    def _kill_marked(self) -> None:
        """SIGKILL what carries this workspace's marker; wait (bounded) until it is gone."""
        for pid in self._marked():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self._marked() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _server_folders(self) -> list[str]:
        servers = self.runtime_dir / "servers"
        return [f"folder {p}" for p in servers.iterdir()] if servers.is_dir() else []


class LocalSandbox(_Local):
    """``local`` in sandbox mode: a folder and the processes marked as started in it."""

    name = "local-sandbox"

    def assert_inside(self, server: dict[str, Any]) -> None:
        code = "import os; print(os.getcwd()); print(os.environ.get('PRVNG_LOCAL_SERVER', ''))"
        out = self.exec(server["hostname"], [self.python, "-c", code])
        assert out["exit_code"] == 0, out
        cwd, marker = out["stdout"].splitlines()
        assert Path(cwd) == self.runtime_dir / "servers" / server["hostname"] / "root"
        assert marker == server["provider_id"]

    def free_port(self, address: str) -> int:
        with socket.socket() as s:
            s.bind((address, 0))
            return int(s.getsockname()[1])

    @classmethod
    def open(cls, workspace: Path) -> Backend:
        return cls(workspace, {"mode": "sandbox"})

    def break_server(self, server: dict[str, Any]) -> None:
        shutil.rmtree(self.runtime_dir / "servers" / server["hostname"] / "root")

    def leftovers(self) -> list[str]:
        return [f"process {p}" for p in self._marked()] + self._server_folders()

    def force_cleanup(self) -> None:
        self._kill_marked()


class LocalNetns(_Local):
    """``local`` in netns mode: network namespaces on a bridge with this test's own name."""

    name = "local-netns"
    exhaustible = True

    @classmethod
    def open(cls, workspace: Path) -> Backend:
        if os.geteuid() != 0:
            pytest.skip("local-netns needs root (network namespaces, a bridge, veth pairs)")
        if shutil.which("ip") is None:
            pytest.skip("local-netns needs the `ip` command (iproute2)")
        bridge, subnet = _unique_bridge_and_subnet()
        return cls(workspace, {"mode": "netns", "bridge": bridge, "subnet": subnet})

    def assert_inside(self, server: dict[str, Any]) -> None:
        out = self.exec(server["hostname"], ["ip", "-4", "-o", "addr", "show"])
        assert out["exit_code"] == 0, out
        assert f"inet {server['address']}/" in out["stdout"], out["stdout"]
        for iface in _host_ipv4():
            if not iface.ip.is_loopback:
                assert f"inet {iface.ip}/" not in out["stdout"], (iface, out["stdout"])

    def free_port(self, address: str) -> int:
        return 20000 + secrets.randbelow(20000)  # a fresh namespace: every port is free

    def one_server_settings(self) -> dict[str, Any]:
        # A /30 of the test's /24: the bridge takes .1, one server .2.
        first = next(ipaddress.IPv4Network(self.settings["subnet"]).subnets(new_prefix=30))
        return {"subnet": str(first)}

    def break_server(self, server: dict[str, Any]) -> None:
        # A crash right after the namespace went: the record stays, the namespace (and the
        # veth pair with it) is gone.
        _ip("netns", "del", server["provider_id"])

    def _namespaces(self) -> list[str]:
        out = _ip("netns", "list").stdout
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if n.startswith(self.ns_prefix)]

    def _links(self) -> list[str]:
        ws = self.ns_prefix.split("-")[1]
        found = []
        for entry in json.loads(_ip("-d", "-j", "link", "show").stdout or "[]"):
            alias = str(entry.get("ifalias") or "")
            if entry.get("ifname") == self.settings["bridge"] or f"ws={ws}" in alias.split():
                found.append(str(entry["ifname"]))
        return found

    def leftovers(self) -> list[str]:
        return (
            [f"namespace {n}" for n in self._namespaces()]
            + [f"link {n}" for n in self._links()]
            + [f"process {p}" for p in self._marked()]
            + self._server_folders()
        )

    def force_cleanup(self) -> None:
        for ns in self._namespaces():
            for word in _ip("netns", "pids", ns).stdout.split():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(word), signal.SIGKILL)
            _ip("netns", "del", ns)
        for link in self._links():
            if link != self.settings["bridge"]:
                _ip("link", "del", "dev", link)
        if self.settings["bridge"] in self._links():
            _ip("link", "del", "dev", self.settings["bridge"])
        self._kill_marked()


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)


def _unique_bridge_and_subnet() -> tuple[str, str]:
    """A bridge name (<= 15 characters) and a /24 no interface of this host overlaps."""
    taken = [i.network for i in _host_ipv4()]
    for _ in range(50):
        n = secrets.randbelow(1 << 24)
        subnet = ipaddress.IPv4Network(f"10.{100 + n % 150}.{(n >> 8) % 256}.0/24")
        if not any(subnet.overlaps(t) for t in taken):
            return f"prvt{n:06x}", str(subnet)
    raise RuntimeError("no free /24 in 10.100.0.0-10.249.255.0 for the test")


# ---------------------------------------------------------------------- ssh


class SshHost(Backend):
    """``ssh``: hosts that exist anyway, reached over SSH — here this machine, through an sshd
    of the test's own on 127.0.0.1 (``tests/sshd.py``).

    Every server is that one host: they share its address, ``provider_id`` names the endpoint
    (``ssh://root@127.0.0.1:<port>``), and ``delete`` only unregisters (it never touches the
    host, so it cannot stop what a command left running there). ``exec`` runs a command in the
    server's work folder (the ``workdir`` setting), which is kept under the test's temporary
    folder, next to the workspace, instead of the default ``~/.prvng/servers/<hostname>``.
    Teardown kills every background process an ``exec`` answered (with its process group) and
    stops the sshd.
    """

    name = "ssh"
    provider = "ssh"
    python = "python3"  # the host's own, on sshd's default PATH

    def __init__(self, workspace: Path, sshd: Sshd) -> None:
        super().__init__(workspace, sshd.provider_settings())
        self.sshd = sshd
        #: The "remote" side of this test: the servers' work folders and background logs.
        self.host_dir = workspace.parent / f"{workspace.name}-ssh-host"
        self.started: list[int] = []  # pids of background processes, as exec answered them

    @classmethod
    def open(cls, workspace: Path) -> Backend:
        sshd = Sshd()  # no sshd here is a failure (tests/sshd.py), not a skip
        try:
            sshd.start()
        except BaseException:
            sshd.close()
            raise
        return cls(workspace, sshd)

    def workdir(self, host: str) -> Path:
        return self.host_dir / host

    def settings_of(self, host: str) -> dict[str, Any]:
        return {**self.settings, "workdir": str(self.workdir(host))}

    def call(
        self, operation: str, target: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        extra = dict(extra or {})
        if operation == "exec" and extra.get("background"):
            # The output goes next to the server's files, not to the default /tmp/prvng-*.log.
            host = target["server"]["hostname"]
            extra.setdefault("log", str(self.workdir(host) / f"background-{len(self.started)}.log"))
        answer = super().call(operation, target, extra)
        if operation == "exec" and isinstance(answer.get("pid"), int):
            self.started.append(answer["pid"])
        return answer

    # ------------------------------------------------------------------ hooks

    def assert_inside(self, server: dict[str, Any]) -> None:
        # Inside = through this test's sshd (SSH_CONNECTION names its address and port), in
        # the server's own work folder.
        code = "import os; print(os.getcwd()); print(os.environ.get('SSH_CONNECTION', ''))"
        out = self.exec(server["hostname"], [self.python, "-c", code])
        assert out["exit_code"] == 0, out
        cwd, connection = out["stdout"].splitlines()
        assert Path(cwd).resolve() == self.workdir(server["hostname"]).resolve()
        _client, _client_port, address, port = connection.split()
        assert (address, int(port)) == (server["address"], self.sshd.port), connection

    def free_port(self, address: str) -> int:
        with socket.socket() as s:
            s.bind((address, 0))
            return int(s.getsockname()[1])

    def process_alive(self, pid: int) -> bool:
        return _local_alive(pid)  # the "remote" host is this machine

    def bad_settings(self) -> list[tuple[dict[str, Any], str]]:
        missing = str(self.workspace / "no-such-file")
        return [
            ({"port": 0}, r"settings of \S+: port: "),
            ({"user": "no body"}, r"settings of \S+: user: "),
            ({"identity_file": missing}, r"settings of \S+: identity_file: .* is not a file"),
            ({"known_hosts": missing}, r"settings of \S+: known_hosts: .* is not a file"),
            ({"connect_timeout_s": 0}, r"settings of \S+: connect_timeout_s: "),
        ]

    def leftovers(self) -> list[str]:
        # What the provider keeps: its registrations. (The host is never touched by delete: the
        # servers' work folders stay there, by design.)
        records = (self.workspace / "runtime" / "servers").glob("*/server.json")
        return [f"record {p}" for p in sorted(records)]

    def force_cleanup(self) -> None:
        try:
            # Each background process was started in a session (and process group) of its own,
            # led by the pid exec answered: the group takes whatever it started with it.
            for pid in self.started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while any(_local_alive(p) for p in self.started) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            self.sshd.close()


#: name -> backend class. A test runs once per backend that has the capability it tests (all of
#: them for the behaviours every provider shares).
BACKENDS: dict[str, type[Backend]] = {
    "local-netns": LocalNetns,
    "local-sandbox": LocalSandbox,
    "ssh": SshHost,
}
