"""deploy/docker: the Dockerfile passes hadolint (the real linter, from PyPI) and a structural
check (stages, non-root user, `prvng` entry point, sources that exist and are not ignored);
compose.yml passes ``docker-compose config`` (the real Compose CLI from PyPI validates it
against the Compose specification; no Docker daemon is needed) and fits the platform: health
checks, `prvng` command lines the CLI accepts, settings-only environments, start order,
volumes, hardening, a NATS configuration ``nats-server -t`` accepts. Nothing is built or run
here: there is no Docker daemon (docs/deploy.md says so)."""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from provisioning.workspace.extensions import builtin_dir
from tests.deploy.artifacts import (
    DEFAULT_PORTS,
    DEPLOY,
    REPO,
    check_env,
    parse_cli,
    run,
    show,
    tool,
)

DOCKER = DEPLOY / "docker"
PRVNG_SERVICES = {
    "control-center": "control-center",
    "orchestrator-1": "orchestrator",
    "orchestrator-2": "orchestrator",
    "ops-keeper": "ops-keeper",
    "ops-controller": "ops-controller",
    "audit-mirror": "audit-mirror",
}


# ------------------------------------------------------------------ Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    config = DOCKER / ".hadolint.yaml"
    return run([tool("hadolint"), "--no-color", "--config", str(config), str(dockerfile)])


def test_hadolint_passes() -> None:
    proc = hadolint(DOCKER / "Dockerfile")
    assert proc.returncode == 0 and not proc.stdout.strip(), show(proc)


def test_hadolint_refuses_an_image_running_as_root(tmp_path: Path) -> None:
    text = (DOCKER / "Dockerfile").read_text("utf-8")
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace("USER 10001:10001", "USER 0"), "utf-8")
    proc = hadolint(broken)
    assert proc.returncode != 0 and "DL3002" in proc.stdout, show(proc)


def test_dockerfile_builds_in_stages_and_runs_prvng_as_a_user(tmp_path: Path) -> None:
    text = (DOCKER / "Dockerfile").read_text("utf-8")
    builder, runtime = stages(text)
    assert builder[0][1].endswith(" AS builder") and runtime[0][1].endswith(" AS runtime")
    everything = instructions(text)
    assert not any(k == "ADD" for k, _ in everything), "COPY, never ADD (no URLs, no tarballs)"
    [user] = [v for k, v in runtime if k == "USER"]
    assert user.split(":")[0] not in {"root", "0"}
    [entry] = [v for k, v in runtime if k == "ENTRYPOINT"]
    assert json.loads(entry) == ["prvng"]
    [cmd] = [v for k, v in runtime if k == "CMD"]
    assert parse_cli(json.loads(cmd))[0] == "prvng platform start"
    assert any(k == "COPY" and v.startswith("--from=builder ") for k, v in runtime)
    runs = " ".join(v for k, v in runtime if k == "RUN")
    installed = set(re.search(r"apt-get install ([^&]*)", runs).group(1).split())  # type: ignore[union-attr]
    assert {"git", "openssh-client"} <= installed
    [expose] = [v for k, v in runtime if k == "EXPOSE"]
    assert {int(p) for p in expose.split()} == set(DEFAULT_PORTS.values())
    env: dict[str, str] = {}
    for k, v in runtime:
        if k == "ENV":
            for word in shlex.split(v):
                key, _, value = word.partition("=")
                env[key] = value
    settings = check_env(env, tmp_path, "Dockerfile ENV")
    assert settings.orchestrator.host == settings.control_center.host == "0.0.0.0"
    assert env["PRVNG_HOME"] == "/var/lib/prvng"


def test_dockerfile_installs_the_wheel_pinned_by_the_lock_with_the_builtin_extensions() -> None:
    builder = stages((DOCKER / "Dockerfile").read_text("utf-8"))[0]
    copied = [v.split()[:-1] for k, v in builder if k == "COPY"]
    sources = [s for srcs in copied for s in srcs]
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    runs = " ".join(v for k, v in builder if k == "RUN")
    assert "--constraint requirements.lock" in runs and "uv build --wheel" in runs
    # An installed package finds its built-in extensions in provisioning/_extensions.
    assert "/_extensions" in runs and '"_extensions"' in inspect.getsource(builtin_dir)
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text("utf-8").splitlines()
    kept = {ln[1:].split("/")[0] for ln in ignore if ln.startswith("!")}
    assert "**" in ignore and {s.rstrip("/") for s in sources} <= kept


# ------------------------------------------------------------------ compose.yml


def compose(*args: str, password: str | None = "s3cret") -> Any:
    env = {k: v for k, v in os.environ.items() if k not in {"POSTGRES_PASSWORD", "COMPOSE_FILE"}}
    if password is not None:
        env["POSTGRES_PASSWORD"] = password
    return run([tool("docker-compose"), "-f", str(DOCKER / "compose.yml"), *args], env=env)


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    proc = compose("config", "--format", "json")
    assert proc.returncode == 0, show(proc)
    return dict(json.loads(proc.stdout))


def test_docker_compose_config_validates_the_file() -> None:
    proc = compose("config", "--quiet")
    assert proc.returncode == 0 and not proc.stderr.strip(), show(proc)


def test_docker_compose_refuses_to_start_without_a_database_password() -> None:
    proc = compose("config", "--quiet", password=None)
    assert proc.returncode != 0 and "POSTGRES_PASSWORD" in proc.stderr, show(proc)


def test_docker_compose_catches_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yml"
    text = (DOCKER / "compose.yml").read_text("utf-8")
    broken.write_text(text.replace("    healthcheck:\n", "    healthchek:\n", 1), "utf-8")
    (tmp_path / "nats.conf").write_bytes((DOCKER / "nats.conf").read_bytes())
    env = {**os.environ, "POSTGRES_PASSWORD": "x"}
    proc = run([tool("docker-compose"), "-f", str(broken), "config", "--quiet"], env=env)
    assert proc.returncode != 0 and "healthchek" in proc.stdout + proc.stderr, show(proc)


def test_every_service_has_a_health_check(model: dict[str, Any]) -> None:
    for name, svc in model["services"].items():
        hc = svc.get("healthcheck")
        assert hc and not hc.get("disable") and hc["test"][0] in {"CMD", "CMD-SHELL"}, name


@pytest.mark.parametrize("name", list(PRVNG_SERVICES))
def test_each_platform_service_runs_its_command_checked_on_its_own_port(
    model: dict[str, Any], name: str, tmp_path: Path
) -> None:
    svc = model["services"][name]
    service = PRVNG_SERVICES[name]
    path, params = parse_cli(svc["command"])
    assert path == f"prvng serve {service}" and params["host"] == "0.0.0.0"
    health = " ".join(svc["healthcheck"]["test"])
    assert f"http://127.0.0.1:{DEFAULT_PORTS[service]}/health" in health
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert svc["user"].split(":")[0] not in {"root", "0"}
    assert "no-new-privileges:true" in svc["security_opt"]
    assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert (Path(svc["build"]["context"]) / svc["build"]["dockerfile"]).is_file()
    settings = check_env(svc["environment"], tmp_path, f"compose service {name}")
    names = set(model["services"]) | {
        alias
        for s in model["services"].values()
        for net in (s.get("networks") or {}).values()
        for alias in (net or {}).get("aliases", [])
    }
    for url in (settings.control_center_url, settings.orchestrator_url, settings.ops_keeper.url):
        assert urlsplit(url).hostname in names, url
    assert {urlsplit(u).hostname for u in settings.nats_servers} == {"nats-1", "nats-2", "nats-3"}
    if service != "audit-mirror":
        assert urlsplit(settings.state.url).hostname == "postgres"
    else:
        assert settings.state.url == "", "the audit-mirror needs no database password"


def test_services_start_in_order_once_what_they_need_is_healthy(model: dict[str, Any]) -> None:
    services = model["services"]
    after = {n: set(s.get("depends_on", {})) for n, s in services.items()}
    for name, svc in services.items():
        for dep, how in svc.get("depends_on", {}).items():
            assert dep in services and how["condition"] == "service_healthy", (name, dep)
    assert {"postgres", "nats-1"} <= after["control-center"]
    for name in ("orchestrator-1", "orchestrator-2", "ops-keeper"):
        assert {"postgres", "control-center"} <= after[name], name
    assert {"ops-keeper", "orchestrator-1"} <= after["ops-controller"]
    assert "nats-1" in after["audit-mirror"]
    seen: set[str] = set()  # no cycle: every service starts after its dependencies
    while len(seen) < len(services):
        ready = {n for n in services if n not in seen and after[n] <= seen}
        assert ready, f"a dependency cycle among {set(services) - seen}"
        seen |= ready


def test_state_lives_in_named_volumes(model: dict[str, Any]) -> None:
    services = model["services"]

    def mounts(name: str) -> dict[str, str]:
        return {
            v["target"]: v["source"]
            for v in services[name].get("volumes", [])
            if v["type"] == "volume"
        }

    for name in (
        "control-center",
        "ops-keeper",
        "audit-mirror",
        "orchestrator-1",
        "orchestrator-2",
    ):
        assert mounts(name)["/var/lib/prvng"] in model["volumes"], name
    assert mounts("postgres")["/var/lib/postgresql/data"] in model["volumes"]
    for n in (1, 2, 3):
        assert mounts(f"nats-{n}")["/data"] in model["volumes"]
    assert model["services"]["ops-controller"]["deploy"]["replicas"] == 2


def test_the_nats_cluster_configuration_is_one_nats_server_accepts(
    model: dict[str, Any], tmp_path: Path
) -> None:
    conf = (DOCKER / "nats.conf").read_text("utf-8")
    assert "sync_interval: always" in conf
    for n in (1, 2, 3):
        svc = model["services"][f"nats-{n}"]
        assert f"nats://nats-{n}:6222" in conf
        assert svc["environment"]["SERVER_NAME"] == f"nats-{n}"
        [bind] = [v for v in svc["volumes"] if v["type"] == "bind"]
        assert Path(bind["source"]) == DOCKER / "nats.conf" and bind["read_only"]
        proc = run(
            [tool("nats-server"), "-t", "-c", str(DOCKER / "nats.conf")],
            env={"SERVER_NAME": f"nats-{n}"},
        )
        assert proc.returncode == 0 and "is valid" in proc.stdout + proc.stderr, show(proc)
