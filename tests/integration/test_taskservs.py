"""The built-in task services and the redis-replication cluster on real servers.

Two servers of the ``local`` provider (network namespaces on a bridge of this test's own), the
real daemons (redis-server, nginx, dnsmasq), every operation run through ``run_operation`` as the
platform runs it. What the services serve is verified from this process with tools of its own
(``redis-cli``, ``httpx``, ``dig``), not with the extensions' code.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.core.errors import ExtensionError
from provisioning.workspace.extensions import request, resolve, run_operation

TOOLS = ("ip", "redis-server", "redis-cli", "nginx", "dnsmasq", "dig")
MISSING = [t for t in TOOLS if shutil.which(t) is None]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="servers of the local provider need root"),
    pytest.mark.skipif(bool(MISSING), reason=f"missing tools: {', '.join(MISSING)}"),
    pytest.mark.timeout(120),
]

SERVICES = ("base", "redis", "nginx", "dnsmasq")
DOMAIN = "prvng.internal"


@dataclass
class Infra:
    """A workspace with two servers, and how to run extensions on them."""

    workspace: Path
    servers: list[dict[str, Any]]

    def inventory(self) -> list[dict[str, Any]]:
        return [{"hostname": s["hostname"], "address": s["address"]} for s in self.servers]

    def taskserv(
        self,
        name: str,
        operation: str,
        server: dict[str, Any],
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        ext = resolve(f"taskservs/{name}", self.workspace)
        target = {"kind": "taskserv", "server": server, "name": name}
        body = request(target, settings, workspace=self.workspace, infra=None, ext=ext)
        body["context"]["inventory"] = self.inventory()
        return run_operation(ext, operation, body)

    def cluster(self, operation: str) -> dict[str, Any]:
        ext = resolve("clusters/redis-replication", self.workspace)
        target = {
            "kind": "cluster",
            "name": "cache",
            "members": [
                {"role": "primary", "server": self.servers[0]},
                {"role": "replica", "server": self.servers[1]},
            ],
        }
        body = request(target, {"port": 6379}, workspace=self.workspace, infra=None, ext=ext)
        return run_operation(ext, operation, body)

    def exec(self, server: dict[str, Any], argv: list[str]) -> dict[str, Any]:
        """Run a command on the server through the provider (in the server's folder)."""
        ext = resolve("providers/local", self.workspace)
        settings = {**server["provider_settings"], "command": argv, "timeout_s": 30}
        body = request(
            {"kind": "server", "server": server},
            settings,
            workspace=self.workspace,
            infra=None,
            ext=ext,
        )
        return run_operation(ext, "exec", body)

    def ensure(self, server: dict[str, Any], *names: str) -> None:
        """These task services installed on ``server`` (install is idempotent)."""
        for name in names:
            assert self.taskserv(name, "install", server)["ok"]


def _provider_call(ws: Path, operation: str, server: dict[str, Any]) -> dict[str, Any]:
    ext = resolve("providers/local", ws)
    body = request(
        {"kind": "server", "server": server},
        server["provider_settings"],
        workspace=ws,
        infra=None,
        ext=ext,
    )
    return run_operation(ext, operation, body)


@pytest.fixture(scope="module")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    ws = tmp_path_factory.mktemp("taskservs-ws")
    rnd = secrets.SystemRandom()
    settings = {
        "mode": "netns",
        "bridge": f"ts{secrets.token_hex(3)}",
        "subnet": f"10.{rnd.randint(100, 250)}.{rnd.randint(0, 255)}.0/24",
    }
    servers: list[dict[str, Any]] = []
    try:
        for host in ("ts-one", "ts-two"):
            server: dict[str, Any] = {
                "hostname": host,
                "provider": "local",
                "plan": "small",
                "zone": "local",
                "labels": {},
                "taskservs": [],
                "provider_settings": dict(settings),
                "address": None,
                "provider_id": None,
            }
            servers.append(server)  # before create: teardown deletes a half-made one too
            made = _provider_call(ws, "create", server)["server"]
            server.update(address=made["address"], provider_id=made["provider_id"])
        yield Infra(ws, servers)
    finally:
        for server in servers:
            _provider_call(ws, "delete", server)


# ---------------------------------------------------------------------- probes of our own


def _redis_cli(address: str, *args: str, port: int = 6379) -> str:
    out = subprocess.run(
        ["redis-cli", "-h", address, "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return (out.stdout + out.stderr).strip()


def _dig(address: str, name: str) -> list[str]:
    out = subprocess.run(
        ["dig", "+short", "+time=1", "+tries=1", f"@{address}", "-p", "53", name, "A"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if out.returncode != 0:
        raise OSError(f"dig {name} @{address}: {out.stdout.strip()}")
    return out.stdout.split()


def _tcp_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


def _eventually(what: str, probe: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.1)


# ---------------------------------------------------------------------- tests


def test_each_task_service_installs_and_serves_on_the_servers_address(infra: Infra) -> None:
    one, two = infra.servers
    for name in SERVICES:
        answer = infra.taskserv(name, "install", one)
        assert answer["ok"], answer
        checked = infra.taskserv(name, "check", one)
        assert checked["ok"], checked

    address = one["address"]
    assert _redis_cli(address, "PING") == "PONG"
    page = httpx.get(f"http://{address}:8080/", timeout=5.0)
    assert page.status_code == 200
    assert page.text.strip() == "hello from ts-one"
    for server in (one, two):
        assert _dig(address, f"{server['hostname']}.{DOMAIN}") == [server["address"]]
        assert _dig(address, server["hostname"]) == [server["address"]]

    layout = infra.exec(one, ["sh", "-c", "ls -d etc srv log run && cat etc/hosts"])
    assert layout["exit_code"] == 0
    assert f"{two['address']}\tts-two" in layout["stdout"]


def test_installing_again_keeps_the_running_services(infra: Infra) -> None:
    one = infra.servers[0]
    infra.ensure(one, *SERVICES)
    pid = infra.exec(one, ["cat", "run/redis.pid"])["stdout"].strip()

    for name in SERVICES:
        again = infra.taskserv(name, "install", one)
        assert again["ok"]
        assert again["details"].get("started", False) is False, (name, again)
        assert infra.taskserv(name, "check", one)["ok"]
    assert infra.exec(one, ["cat", "run/redis.pid"])["stdout"].strip() == pid


def test_check_fails_with_a_clear_reason_once_redis_is_killed(infra: Infra) -> None:
    one = infra.servers[0]
    infra.ensure(one, "base", "redis")
    pid = int(infra.exec(one, ["cat", "run/redis.pid"])["stdout"])
    os.kill(pid, signal.SIGKILL)
    _eventually("redis port closed", lambda: not _tcp_open(one["address"], 6379))

    with pytest.raises(ExtensionError) as failed:
        infra.taskserv("redis", "check", one)
    message = failed.value.message
    assert "failed in check" in message
    assert f"redis on ts-one ({one['address']}:6379) does not answer" in message

    healed = infra.taskserv("redis", "install", one)  # a stale pid file: started again
    assert healed["details"]["started"] is True
    assert infra.taskserv("redis", "check", one)["ok"]
    assert _redis_cli(one["address"], "PING") == "PONG"


def test_remove_stops_each_service_and_twice_is_fine(infra: Infra) -> None:
    one = infra.servers[0]
    address = one["address"]
    infra.ensure(one, *SERVICES)

    stopped: list[tuple[str, Callable[[], bool]]] = [
        ("dnsmasq", lambda: _dig_fails(address)),
        ("nginx", lambda: not _tcp_open(address, 8080)),
        ("redis", lambda: not _tcp_open(address, 6379)),
    ]
    for name, closed in stopped:
        assert infra.taskserv(name, "remove", one)["ok"]
        assert closed(), f"{name} still serves after remove"
        with pytest.raises(ExtensionError, match="failed in check"):
            infra.taskserv(name, "check", one)
        assert infra.taskserv(name, "remove", one)["ok"]  # nothing left: still fine

    gone = infra.exec(one, ["sh", "-c", "ls srv etc run"])["stdout"].split()
    assert "redis" not in gone and "www" not in gone and "nginx.conf" not in gone
    assert infra.taskserv("base", "remove", one)["ok"]
    assert infra.taskserv("base", "remove", one)["ok"]
    with pytest.raises(ExtensionError, match="install base"):
        infra.taskserv("base", "check", one)


def _dig_fails(address: str) -> bool:
    try:
        _dig(address, f"ts-one.{DOMAIN}")
    except OSError:
        return True
    return False


def test_redis_replication_copies_the_primary_to_the_replica(infra: Infra) -> None:
    primary, replica = infra.servers
    for server in infra.servers:
        infra.ensure(server, "base", "redis")

    created = infra.cluster("create")
    assert created["details"] == {"primary": "ts-one", "replicas": ["ts-two"], "port": 6379}
    assert infra.cluster("create")["ok"]  # again: already following the primary
    assert infra.cluster("check")["details"]["connected_slaves"] == 1

    key, value = f"test:{secrets.token_hex(6)}", secrets.token_hex(6)
    assert _redis_cli(primary["address"], "SET", key, value) == "OK"
    _eventually(
        "the key on the replica",
        lambda: _redis_cli(replica["address"], "GET", key) == value,
    )
    assert "READONLY" in _redis_cli(replica["address"], "SET", key, "nope")

    assert infra.cluster("delete")["details"]["detached"] == ["ts-two"]
    assert "role:master" in _redis_cli(replica["address"], "INFO", "replication")
    assert _redis_cli(replica["address"], "SET", key, "mine now") == "OK"
    with pytest.raises(ExtensionError, match="connected_slaves:0, expected 1"):
        infra.cluster("check")
    assert infra.cluster("delete")["ok"]
