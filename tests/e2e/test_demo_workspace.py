"""The README walk-through, for real: `examples/workspaces/demo` on a background platform.

`prvng server create --infra demo --wait` makes two `local` servers (network namespaces as
root) and installs base → redis, nginx, dnsmasq; the test reaches each service from outside
with its own tools; `prvng cluster create cache` makes web-02 a replica of web-01;
`prvng server delete` leaves nothing behind. The `demo-broken` infra's failing task service
ends the workflow RolledBack with no server, namespace or process left.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.platform_proc import REPO, Platform, prvng, running_platform, show

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="local servers as network namespaces need root and iproute2 (CI runs as root)",
)


def netns() -> set[str]:
    """Namespaces of the demo's servers (whatever workspace made them)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    return {n for n in names if n.endswith(("-web-01", "-web-02"))}


def processes_under(folder: Path) -> list[str]:
    """Live processes whose command line names ``folder`` (daemons of the task services)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "stat").read_text().split()[2] == "Z":
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmd and "pytest" not in cmd:
            found.append(f"{proc.name}: {cmd}")
    return found


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with running_platform(tmp_path_factory.mktemp("demo") / "home") as plat:
        yield plat


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The example workspace, on a bridge and subnet of its own."""
    ws = tmp_path / "demo"
    shutil.copytree(REPO / "examples" / "workspaces" / "demo", ws)
    bridge = f"pd{random.randrange(16**6):06x}"
    subnet = f"10.{random.randrange(100, 250)}.{random.randrange(0, 250)}.0/24"
    cfg = ws / "config" / "workspace.ncl"
    text = cfg.read_text()
    text = text.replace('bridge = "prvng-demo"', f'bridge = "{bridge}"')
    text = text.replace('subnet = "10.209.0.0/24"', f'subnet = "{subnet}"')
    cfg.write_text(text)
    before = netns()
    try:
        yield ws, bridge
    finally:
        # Last resort if the test failed half-way: whatever namespaces appeared, go.
        for ns in netns() - before:
            for pid in subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True
            ).stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        if link_exists(bridge):
            subprocess.run(["ip", "link", "delete", bridge], capture_output=True)


def cli(
    platform: Platform, ws: Path, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return prvng(*args, "--workspace", str(ws), data_dir=platform.data_dir, timeout=timeout)


def inventory(platform: Platform, ws: Path, infra: str) -> dict[str, dict[str, Any]]:
    listed = prvng(
        "-o", "json", "server", "list", "--infra", infra, "--workspace", str(ws),
        data_dir=platform.data_dir,
    )  # fmt: skip
    assert listed.returncode == 0, show(listed)
    return {r["hostname"]: r for r in json.loads(listed.stdout)}


def redis(address: str, *args: str) -> str:
    out = subprocess.run(
        ["redis-cli", "-h", address, "-p", "6379", *args],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout.strip()


def eventually(what: str, probe: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s (last {last!r})")


def test_the_demo_workspace_comes_up_serves_and_goes_away(
    platform: Platform, demo: tuple[Path, str]
) -> None:
    ws, bridge = demo
    before = netns()

    plan = cli(platform, ws, "server", "create", "--infra", "demo", "--check")
    assert plan.returncode == 0, show(plan)
    assert "install task service base" in plan.stdout and "nothing changed" in plan.stdout
    assert inventory(platform, ws, "demo") == {}

    created = cli(platform, ws, "server", "create", "--infra", "demo", "--wait")
    assert created.returncode == 0, show(created)
    assert "Completed" in created.stdout, show(created)

    servers = inventory(platform, ws, "demo")
    assert set(servers) == {"web-01", "web-02"}
    assert servers["web-01"]["taskservs"][0] == "base"  # dependencies first
    assert set(servers["web-01"]["taskservs"]) == {"base", "redis", "nginx", "dnsmasq"}
    assert servers["web-02"]["taskservs"] == ["base", "redis"]
    web1, web2 = servers["web-01"]["address"], servers["web-02"]["address"]
    assert web1 != web2 and {s["status"] for s in servers.values()} == {"running"}
    assert len(netns() - before) == 2

    # Reached from outside, with the test's own tools.
    assert redis(web1, "ping") == "PONG"
    assert redis(web2, "ping") == "PONG"
    page = httpx.get(f"http://{web1}:8080/", timeout=10)
    assert page.status_code == 200 and "hello from web-01" in page.text
    dig = subprocess.run(
        ["dig", f"@{web1}", "web-02.demo.internal", "+short", "+time=2", "+tries=2"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert dig.stdout.strip() == web2, dig

    formed = cli(platform, ws, "cluster", "create", "cache", "--infra", "demo", "--wait")
    assert formed.returncode == 0, show(formed)
    redis(web1, "set", "demo-key", "replicated")
    eventually("the replica has the key", lambda: redis(web2, "get", "demo-key") == "replicated")
    assert "master_host:" + web1 in redis(web2, "info", "replication")

    deleted = cli(platform, ws, "server", "delete", "--infra", "demo", "--wait")
    assert deleted.returncode == 0, show(deleted)
    assert inventory(platform, ws, "demo") == {}
    assert netns() - before == set()
    assert not link_exists(bridge)
    assert processes_under(ws) == []


def test_a_failing_task_service_rolls_everything_back(
    platform: Platform, demo: tuple[Path, str]
) -> None:
    ws, bridge = demo
    before = netns()

    failed = cli(platform, ws, "server", "create", "--infra", "demo-broken", "--wait")

    assert failed.returncode == 1, show(failed)
    assert "RolledBack" in failed.stdout + failed.stderr, show(failed)
    wf_id = re.search(r"workflow ([0-9a-f-]{36})", failed.stdout + failed.stderr)
    assert wf_id, show(failed)
    shown = prvng("-o", "json", "workflow", "show", wf_id[1], data_dir=platform.data_dir)
    doc = json.loads(shown.stdout)
    assert doc["status"] == "RolledBack"
    tasks = {t["name"]: t for t in doc["tasks"]}
    assert tasks["install:broken@web-01"]["status"] == "Failed"
    assert tasks["create:web-01"]["status"] == "RolledBack"
    logs = prvng("task", "logs", tasks["install:broken@web-01"]["id"], data_dir=platform.data_dir)
    assert "the package repository is unreachable" in logs.stdout, show(logs)

    assert inventory(platform, ws, "demo-broken") == {}
    assert netns() - before == set()
    assert not link_exists(bridge)
    assert processes_under(ws) == []
