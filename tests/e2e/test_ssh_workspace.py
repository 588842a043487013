"""The demo flow through the `ssh` provider: a server that is this machine reached over a real
sshd on a loopback port (key auth, known-hosts checking). `prvng server create --wait` registers
it and installs base → redis and nginx over SSH; the test reaches both from outside; `prvng
server delete --wait` removes the task services (the ssh provider only forgets the host) and
nothing keeps running."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.platform_proc import Platform, prvng, running_platform, show
from tests.e2e.test_demo_workspace import processes_under
from tests.sshd import Sshd, running_sshd


def ncl(record: dict[str, object]) -> str:
    """A flat record in Nickel syntax."""
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in record.items()) + " }"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with running_platform(tmp_path_factory.mktemp("ssh") / "home") as plat:
        yield plat


@pytest.fixture
def sshd() -> Iterator[Sshd]:
    with running_sshd() as server:
        yield server


def test_the_flow_runs_through_the_ssh_provider(
    platform: Platform, sshd: Sshd, tmp_path: Path
) -> None:
    ws = tmp_path / "remote"
    workdir = tmp_path / "remote-host"  # where the "remote" host keeps the server's files
    redis_port, web_port = free_port(), free_port()
    settings = {**sshd.provider_settings(), "workdir": str(workdir)}
    (ws / "config").mkdir(parents=True)
    (ws / "config" / "workspace.ncl").write_text(
        f'{{ name = "remote", providers = {{ ssh = {ncl(settings)} }} }}'
    )
    (ws / "infra" / "lab").mkdir(parents=True)
    (ws / "infra" / "lab" / "settings.ncl").write_text(
        f"""{{
  servers = [{{
    hostname = "ssh-01",
    provider = "ssh",
    taskservs = [
      {{ name = "redis", settings = {{ port = {redis_port} }} }},
      {{ name = "nginx", settings = {{ port = {web_port}, content = "served over ssh" }} }},
    ],
  }}],
}}"""
    )
    cli = lambda *a: prvng(*a, "--workspace", str(ws), data_dir=platform.data_dir, timeout=600)  # noqa: E731

    try:
        _create_use_and_delete(cli, sshd, workdir, redis_port, web_port)
    finally:
        # Whatever failed above, nothing the task services started may outlive the test.
        if processes_under(workdir):
            cli("server", "delete", "--infra", "lab", "--wait")
        for line in processes_under(workdir):
            subprocess.run(["kill", "-9", line.split(":", 1)[0]], check=False)


def _create_use_and_delete(
    cli: Any, sshd: Sshd, workdir: Path, redis_port: int, web_port: int
) -> None:
    created = cli("server", "create", "--infra", "lab", "--wait")
    assert created.returncode == 0, show(created)

    listed = cli("-o", "json", "server", "list", "--infra", "lab")
    (server,) = json.loads(listed.stdout)
    assert server["provider"] == "ssh" and server["status"] == "running"
    assert server["provider_id"] == f"ssh://root@127.0.0.1:{sshd.port}"
    assert server["taskservs"][0] == "base"  # what the others require comes first
    assert set(server["taskservs"]) == {"base", "redis", "nginx"}
    ping = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(redis_port), "ping"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert ping.stdout.strip() == "PONG"
    page = httpx.get(f"http://127.0.0.1:{web_port}/", timeout=10)
    assert "served over ssh" in page.text
    assert (workdir / "srv").is_dir()  # the task services' files are in the server's folder

    deleted = cli("server", "delete", "--infra", "lab", "--wait")
    assert deleted.returncode == 0, show(deleted)
    listed = cli("-o", "json", "server", "list", "--infra", "lab")
    assert json.loads(listed.stdout) == []
    assert processes_under(workdir) == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{web_port}/", timeout=2)
