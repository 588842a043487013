"""Workspaces: init, validation with Nickel's own diagnostics, layering, and compiling requests
into workflows (order, rollbacks, batches, cycles) — with real Nickel and real executables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provisioning.core.errors import Conflict, NickelError, NotFound, ValidationError
from provisioning.orchestrator.api import WorkflowSpec
from provisioning.workspace.model import Workspace
from provisioning.workspace.plan import Planner, describe, split
from provisioning.workspace.templates import init_workspace
from tests.fake_workspace import ext, make_fake_workspace

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return make_fake_workspace(tmp_path / "ws")


def names(spec: dict[str, Any]) -> list[str]:
    return [t["name"] for t in spec["tasks"]]


def deps(spec: dict[str, Any], task: str) -> list[str]:
    found = next(t.get("depends_on", []) for t in spec["tasks"] if t["name"] == task)
    return [d if isinstance(d, str) else d["task"] for d in found]


def test_servers_create_installs_dependencies_first_with_rollbacks(ws: Path) -> None:
    spec = Planner(Workspace.open(ws), "prod").servers_create()

    assert names(spec) == [
        "create:a1", "ready:a1", "install:os@a1", "install:db@a1", "install:app@a1",
        "create:b1", "ready:b1", "install:os@b1", "install:db@b1",
    ]  # fmt: skip
    assert deps(spec, "install:app@a1") == ["ready:a1", "install:db@a1", "install:os@a1"]
    create = spec["tasks"][0]
    assert create["command"][-9:] == [
        "extension", "run", "providers/fake", "create",
        "--workspace", str(ws.resolve()), "--infra", "prod", "--target", "a1",
    ][-9:]  # fmt: skip
    assert create["rollback"][create["rollback"].index("run") + 2] == "delete"
    assert create["concurrency_key"] == "provider:fake"
    install = spec["tasks"][4]
    assert install["rollback"][install["rollback"].index("run") + 1 :][:2] == [
        "taskservs/app",
        "remove",
    ]
    body, does = split(spec)
    WorkflowSpec.model_validate(body)  # the orchestrator accepts it as is
    assert does["install:db@b1"] == "install task service db 1.2.3 on b1"
    assert body["kind"] == "servers.create"


def test_provider_settings_layer_workspace_infra_server(ws: Path) -> None:
    w = Workspace.open(ws)
    infra = w.infra("prod")
    assert w.provider_settings(infra, infra.server("a1")) == {"zone_default": "a", "level": 3}
    assert w.provider_settings(infra, infra.server("b1")) == {"zone_default": "a", "level": 2}


def test_a_cluster_waits_for_its_members_and_what_it_requires(ws: Path) -> None:
    spec = Planner(Workspace.open(ws), "prod").cluster_create("dbs")
    last = spec["tasks"][-1]
    assert last["name"] == "cluster:dbs"
    assert set(last["depends_on"]) == {"install:app@a1", "install:db@a1", "install:db@b1"}
    assert "clusters/pair" in last["command"] and "delete" in last["rollback"]


def test_a_batch_honours_depends_on_parallel_limit_and_on_failure(ws: Path) -> None:
    spec = Planner(Workspace.open(ws), "prod").batch("all")
    body, _ = split(spec)
    assert body["parallel_limit"] == 2
    assert names(spec)[:2] == ["srv/create:a1", "srv/ready:a1"]  # dependencies first
    assert "srv/install:app@a1" in deps(spec, "cl/cluster:dbs")
    assert set(deps(spec, "gone/remove:db@b1")) >= {"cl/cluster:dbs", "cl/create:b1"}
    assert deps(spec, "gone/delete:b1")[0] == "gone/remove:os@b1"  # after its task services
    assert all("rollback" not in t for t in body["tasks"])  # rollback_enabled = false
    assert {t["on_failure"] for t in body["tasks"] if t["name"].startswith("srv/")} == {"fail"}
    assert {t["on_failure"] for t in body["tasks"] if t["name"].startswith("gone/")} == {"continue"}
    WorkflowSpec.model_validate(body)


def test_the_plan_says_what_each_task_does_and_is_submittable(ws: Path) -> None:
    plan = describe(Planner(Workspace.open(ws), "prod").taskserv_create("db", ["b1"]))
    assert [t["does"] for t in plan["tasks"]] == [
        "create server b1 with provider fake",
        "wait until b1 runs",
        "install task service os 1.2.3 on b1",
        "install task service db 1.2.3 on b1",
    ]
    removal = Planner(Workspace.open(ws), "prod").taskserv_create("db", operation="remove")
    assert names(removal) == ["remove:db@b1"]  # the servers that list it


def test_a_dependency_cycle_is_refused_with_the_cycle_named(ws: Path) -> None:
    shutil.rmtree(ws / "extensions" / "taskservs" / "os")
    ext(ws, "taskserv", "os", requires=["app"])
    with pytest.raises(ValidationError, match=r"cycle: app -> db -> os -> app"):
        Planner(Workspace.open(ws), "prod").servers_create(["a1"])
    problems = Workspace.open(ws).validate("prod")
    assert any("cycle" in p and "a1" in p for p in problems), problems


def test_unknown_references_are_named(ws: Path) -> None:
    w = Workspace.open(ws)
    with pytest.raises(NotFound, match=r"no server 'zz' in infra prod; servers: a1, b1"):
        Planner(w, "prod").servers_create(["zz"])
    with pytest.raises(NotFound, match=r"no infra 'qa'.*infras: prod"):
        w.infra("qa")
    (ws / "infra" / "prod" / "settings.ncl").write_text(
        '{ servers = [{ hostname = "c1", provider = "cloud", taskservs = [{ name = "ghost" }] }] }'
    )
    problems = w.validate("prod")
    assert "infra/prod/settings.ncl: server c1: no provider 'cloud'" in problems
    assert any("no task service 'ghost'" in p for p in problems)


def test_a_contract_error_is_reported_by_nickel_at_the_line_of_the_file(ws: Path) -> None:
    (ws / "infra" / "prod" / "settings.ncl").write_text(
        '{\n  servers = [\n    { hostname = "Bad_Name", provider = "fake" },\n  ],\n}\n'
    )
    with pytest.raises(NickelError) as err:
        Workspace.open(ws).infra("prod")
    text = err.value.message
    assert "settings.ncl:3:" in text and "hostname" in text
    assert "\x1b[" not in text  # plain for JSON; the colours are kept for terminals
    (ws / "infra" / "prod" / "settings.ncl").write_text('{ servers = [], colour = "red" }')
    with pytest.raises(NickelError, match="colour"):
        Workspace.open(ws).infra("prod")


def test_init_makes_a_workspace_that_validates(tmp_path: Path) -> None:
    files = init_workspace(tmp_path / "w", "acme", template="local", infra="dev")
    assert tmp_path / "w" / ".gitignore" in files
    assert (tmp_path / "w" / ".gitignore").read_text() == "runtime/\n"
    w = Workspace.open(tmp_path / "w")
    assert w.name == "acme" and w.infra_names() == ["dev"]
    assert w.validate() == []
    with pytest.raises(Conflict):
        init_workspace(tmp_path / "w", "acme")
    init_workspace(tmp_path / "s", "remote", template="ssh")
    assert Workspace.open(tmp_path / "s").validate() == []
    with pytest.raises(ValidationError):
        init_workspace(tmp_path / "x", "Bad Name")


def prvng(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRVNG_")}
    env["PRVNG_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "provisioning.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_shell_example_extension_runs_through_the_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert prvng("workspace", "init", "demo", cwd=tmp_path, home=home).returncode == 0
    ws = tmp_path / "demo"
    shutil.copytree(
        REPO / "examples" / "extensions" / "hello-shell",
        ws / "extensions" / "taskservs" / "hello-shell",
    )

    listed = prvng("-o", "json", "component", "list", cwd=ws, home=home)
    assert listed.returncode == 0, listed.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(listed.stdout)}
    assert rows[("taskserv", "hello-shell")]["layer"] == "workspace"
    assert rows[("provider", "local")]["layer"] == "builtin"

    run = prvng(
        "extension",
        "run",
        "taskservs/hello-shell",
        "install",
        "--target",
        "web-01",
        cwd=ws,
        home=home,
    )
    assert run.returncode == 0, run.stderr
    assert "greeting web-01" in run.stderr
    assert (ws / "runtime" / "hello-shell" / "web-01.txt").read_text() == "hello, web-01\n"
    check = prvng(
        "extension",
        "run",
        "taskservs/hello-shell",
        "check",
        "--target",
        "web-01",
        cwd=ws,
        home=home,
    )
    assert json.loads(check.stdout)["details"]["greeting"] == "hello, web-01"
    remove = ["extension", "run", "taskservs/hello-shell", "remove", "--target", "web-01"]
    removed = prvng(*remove, cwd=ws, home=home)
    # web-01 was never created: nothing of a task service can be on it, so remove is skipped.
    assert "not in the inventory" in json.loads(removed.stdout)["details"]["skipped"]
    (ws / "runtime" / "hello-shell" / "web-01.txt").unlink()
    failed = prvng(
        "extension",
        "run",
        "taskservs/hello-shell",
        "check",
        "--target",
        "web-01",
        cwd=ws,
        home=home,
    )
    assert failed.returncode == 1
    assert "extension taskservs/hello-shell (workspace layer) failed in check" in failed.stderr
    assert "no greeting for web-01" in failed.stderr

    bad = prvng("workspace", "validate", cwd=ws, home=home)
    assert bad.returncode == 0, bad.stderr
    (ws / "infra" / "main" / "settings.ncl").write_text("{ servers = [{ hostname = 1 }] }")
    bad = prvng("workspace", "validate", cwd=ws, home=home)
    assert bad.returncode == 2
    assert "settings.ncl:1:" in bad.stderr
