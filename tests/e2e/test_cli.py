"""The `prvng` CLI end to end, as a user runs it, against a real background platform.

Every command runs in its own process (``python -m provisioning.cli.main``, what the `prvng`
console script calls) with `--data-dir` in a temp dir; the platform is started with
`prvng platform start --background --port P` on a free 127.0.0.1 port and stopped with
`prvng platform stop` (then SIGKILL if it is still alive).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.conftest import free_port
from tests.e2e.platform_proc import REPO, Platform, prvng, running_platform, show

EXAMPLES = REPO / "examples" / "workflows"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with running_platform(tmp_path_factory.mktemp("cli") / "home") as plat:
        yield plat


@pytest.fixture(scope="module")
def hello(platform: Platform) -> dict[str, Any]:
    """examples/workflows/hello.ncl submitted with --wait: the finished workflow as JSON."""
    done = prvng(
        "workflow",
        "submit",
        str(EXAMPLES / "hello.ncl"),
        "--wait",
        data_dir=platform.data_dir,
        url=platform.url,
    )
    assert done.returncode == 0, show(done)
    assert "Completed" in done.stdout, show(done)
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("workflow ")]
    wf_id = line.split()[1]
    shown = prvng(
        "--output", "json", "workflow", "show", wf_id, data_dir=platform.data_dir, url=platform.url
    )
    assert shown.returncode == 0, show(shown)
    return dict(json.loads(shown.stdout))


def test_submitting_hello_with_wait_exits_0_and_prints_completed(hello: dict[str, Any]) -> None:
    assert hello["name"] == "hello"
    assert hello["status"] == "Completed"
    assert {t["name"]: t["status"] for t in hello["tasks"]} == {
        "make-id": "Completed",
        "greet": "Completed",
        "nap": "Completed",
        "report": "Completed",
    }


def test_workflow_list_as_json_is_a_list_holding_the_workflow(
    platform: Platform, hello: dict[str, Any]
) -> None:
    listed = prvng(
        "--output", "json", "workflow", "list", data_dir=platform.data_dir, url=platform.url
    )
    assert listed.returncode == 0, show(listed)
    rows = json.loads(listed.stdout)
    assert isinstance(rows, list)
    [row] = [r for r in rows if r["id"] == hello["id"]]
    assert (row["name"], row["status"]) == ("hello", "Completed")


def test_workflow_counts_agree_with_the_listing(platform: Platform, hello: dict[str, Any]) -> None:
    run = {"data_dir": platform.data_dir, "url": platform.url}
    listed = prvng("--output", "json", "workflow", "list", "--limit", "1000", **run)
    counted = prvng("--output", "json", "workflow", "counts", **run)
    table = prvng("workflow", "counts", "--since", hello["created_at"], **run)
    assert listed.returncode == counted.returncode == table.returncode == 0, show(table)
    by_status: dict[str, int] = {}
    for row in json.loads(listed.stdout):
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    data = json.loads(counted.stdout)
    assert data == {"total": sum(by_status.values()), "by_status": by_status}
    assert "Completed" in table.stdout and "total" in table.stdout, show(table)


def test_workflow_show_prints_the_workflow_and_its_tasks(
    platform: Platform, hello: dict[str, Any]
) -> None:
    shown = prvng("workflow", "show", hello["id"], data_dir=platform.data_dir, url=platform.url)
    assert shown.returncode == 0, show(shown)
    out = shown.stdout
    assert hello["id"] in out and "Completed" in out, show(shown)
    for name in ("make-id", "greet", "nap", "report"):
        assert name in out, show(shown)
    assert "nap (soft)" in out, show(shown)


def test_task_list_as_yaml_holds_the_workflows_tasks(
    platform: Platform, hello: dict[str, Any]
) -> None:
    listed = prvng(
        "--output",
        "yaml",
        "task",
        "list",
        "--workflow",
        hello["id"],
        data_dir=platform.data_dir,
        url=platform.url,
    )
    assert listed.returncode == 0, show(listed)
    rows = yaml.safe_load(listed.stdout)
    assert isinstance(rows, list)
    assert {r["name"] for r in rows} == {"make-id", "greet", "nap", "report"}
    assert {r["workflow_id"] for r in rows} == {hello["id"]}
    assert {r["status"] for r in rows} == {"Completed"}


def test_submitting_a_workflow_that_rolls_back_with_wait_exits_1(platform: Platform) -> None:
    done = prvng(
        "workflow",
        "submit",
        str(EXAMPLES / "rollback-demo.ncl"),
        "--wait",
        data_dir=platform.data_dir,
        url=platform.url,
    )
    assert done.returncode == 1, show(done)
    assert "RolledBack" in done.stdout, show(done)
    assert "operation_failed" in done.stderr and "RolledBack" in done.stderr, show(done)


def test_a_closed_port_exits_3_saying_the_orchestrator_is_not_reachable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    listed = prvng("workflow", "list", data_dir=tmp_path / "home", url=url)
    assert listed.returncode == 3, show(listed)
    assert f"orchestrator at {url} is not reachable" in listed.stderr, show(listed)
    assert "prvng platform status" in listed.stderr, show(listed)
    assert listed.stdout == ""


def test_submitting_a_missing_file_exits_2_naming_it(tmp_path: Path) -> None:
    done = prvng("workflow", "submit", "nonexistent.ncl", data_dir=tmp_path / "home")
    assert done.returncode == 2, show(done)
    assert "usage_error" in done.stderr and "nonexistent.ncl" in done.stderr, show(done)
    assert "not found" in done.stderr, show(done)


def test_platform_status_exits_0_while_running_and_3_after_stop(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with running_platform(home) as plat:
        up = prvng("--output", "json", "platform", "status", data_dir=home, url=plat.url)
        assert up.returncode == 0, show(up)
        rows = {r["service"]: r for r in json.loads(up.stdout)}
        assert set(rows) == {
            "orchestrator",
            "control-center",
            "ops-keeper",
            "ops-controller",
            "audit-mirror",
            "nats",
        }, show(up)
        for row in rows.values():
            assert (row["status"], row["pid"]) == ("ok", plat.pid()), show(up)
        pid = plat.pid()
        assert pid is not None
        stopped = prvng("platform", "stop", data_dir=home)
        assert stopped.returncode == 0, show(stopped)
        assert f"platform stopped (pid {pid})" in stopped.stdout, show(stopped)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        down = prvng("--output", "json", "platform", "status", data_dir=home, url=plat.url)
        assert down.returncode == 3, show(down)
        for row in json.loads(down.stdout):
            assert (row["status"], row["pid"]) == ("down", None), show(down)
        assert "not running" in down.stderr, show(down)


def test_commands_without_url_find_the_port_the_platform_was_started_on(
    platform: Platform, hello: dict[str, Any]
) -> None:
    # `platform start --port P` then plain `platform status` / `workflow list` on the same data
    # dir: the user should not have to repeat the port (the default would be 8080).
    status = prvng("--output", "json", "platform", "status", data_dir=platform.data_dir)
    assert status.returncode == 0, show(status)
    row = {r["service"]: r for r in json.loads(status.stdout)}["orchestrator"]
    assert (row["status"], row["url"]) == ("ok", platform.url)
    listed = prvng("--output", "json", "workflow", "list", data_dir=platform.data_dir)
    assert listed.returncode == 0, show(listed)
    assert hello["id"] in {r["id"] for r in json.loads(listed.stdout)}


# Runs `main(argv)` — the console script's entry point — for `--help` of every command in one
# interpreter (a fresh one per command would take a few seconds each) and reports each command's
# exit code, help text, options and sub-commands as JSON.
HELP_DRIVER = """
import contextlib, io, json
import typer
from provisioning.cli.main import app, main

def walk(cmd, path):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from walk(sub, [*path, name])

report = []
for path, cmd in walk(typer.main.get_command(app), []):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([*path, "--help"])
    options = [o for p in cmd.params if p.param_type_name == "option" for o in p.opts]
    report.append({"argv": path, "code": code, "help": buf.getvalue(),
                   "options": [o for o in options if o.startswith("--")],
                   "commands": sorted(getattr(cmd, "commands", {}))})
print(json.dumps(report))
"""


def test_the_prvng_console_script_help_exits_0_and_lists_global_options_and_nouns() -> None:
    script = Path(sys.executable).parent / "prvng"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRVNG_")}
    helped = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env
    )
    assert helped.returncode == 0, show(helped)
    for text in ("--output", "--url", "--data-dir", "platform", "serve", "workflow", "task"):
        assert text in helped.stdout, show(helped)


def test_every_command_help_exits_0_and_mentions_its_options_and_sub_commands() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRVNG_")}
    proc = subprocess.run(
        [sys.executable, "-c", HELP_DRIVER],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, show(proc)
    report = json.loads(proc.stdout)
    seen = {" ".join(r["argv"]) for r in report}
    # The commands DESIGN §9 and the brief name are all there.
    assert {
        "",
        "platform start",
        "platform stop",
        "platform status",
        "serve orchestrator",
        "workflow submit",
        "workflow list",
        "workflow show",
        "workflow logs",
        "workflow cancel",
        "workflow pause",
        "workflow resume",
        "workflow retry",
        "workflow rollback",
        "task list",
        "task show",
        "task logs",
    } <= seen
    for r in report:
        where = f"prvng {' '.join(r['argv'])} --help"
        assert r["code"] == 0, (where, r["help"])
        assert "Usage:" in r["help"], (where, r["help"])
        for option in [*r["options"], *r["commands"]]:
            assert option in r["help"], (where, option, r["help"])


def test_workflow_submit_help_names_the_formats_and_wait(tmp_path: Path) -> None:
    helped = prvng("workflow", "submit", "--help", data_dir=tmp_path / "home")
    assert helped.returncode == 0, show(helped)
    for text in (".ncl", ".json", ".yaml", "--wait", "--idempotency-key"):
        assert text in helped.stdout, show(helped)


def test_mfa_enroll_shows_the_secret_then_confirms_the_code_typed_in(tmp_path: Path) -> None:
    import pyotp

    home = tmp_path / "home"
    with running_platform(home):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRVNG_")}
        env.update(XDG_CONFIG_HOME=str(tmp_path / "config-home"), PYTHONUNBUFFERED="1")
        argv = [sys.executable, "-m", "provisioning.cli.main", "--data-dir", str(home)]
        proc = subprocess.Popen(
            [*argv, "mfa", "enroll"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            shown: dict[str, str] = {}
            for _ in range(10):  # the secret and its URI are printed before the prompt
                words = proc.stdout.readline().split()
                if words[:1] in (["secret"], ["uri"]):
                    shown[words[0]] = words[-1]
                if "uri" in shown:
                    break
            assert shown.get("secret") and shown["uri"].startswith("otpauth://totp/"), shown
            secret = shown["secret"]
            proc.stdin.write(pyotp.TOTP(secret).now() + "\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert proc.returncode == 0, (shown, out, err)
        assert "MFA enabled" in out, (shown, out, err)
        # The login that enrolled goes on (until it is renewed with a code).
        who = prvng("--output", "json", "whoami", data_dir=home)
        assert who.returncode == 0, show(who)
        assert json.loads(who.stdout)["username"] == "admin"
