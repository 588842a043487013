"""The extension protocol as the platform enforces it, with real executables (Python and sh):
layering, manifests, and every way an extension can fail — each error names the extension, the
operation and the reason (with the last stderr lines)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from provisioning.core.errors import ExtensionError, NickelError, NotFound, ValidationError
from provisioning.workspace.extensions import discover, request, resolve, run_operation

OPS = '{ install = "ts.sh", remove = "ts.sh", check = "ts.sh" }'
HEAD = '{ name = "bad", kind = "taskserv", version = "1.0.0", '


def make_ext(
    root: Path,
    name: str,
    script: str,
    *,
    kind: str = "taskserv",
    version: str = "1.0.0",
    requires: str = "[]",
    operations: str = OPS,
    manifest: str | None = None,
) -> Path:
    folder = root / "extensions" / f"{kind}s" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "extension.ncl").write_text(
        manifest
        or f'{{ name = "{name}", kind = "{kind}", version = "{version}", '
        f"requires = {requires}, operations = {operations}, timeout_s = 5 }}\n"
    )
    exe = folder / "ts.sh"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return folder


def call(ws: Path, name: str, operation: str = "install", **kw: Any) -> dict[str, Any]:
    ext = resolve(f"taskservs/{name}", ws)
    body = request(
        {"kind": "taskserv", "name": name, "server": {}}, {}, workspace=ws, infra=None, ext=ext
    )
    return run_operation(ext, operation, body, **kw)


def test_an_extension_gets_the_request_on_stdin_and_answers_on_stdout(tmp_path: Path) -> None:
    make_ext(
        tmp_path,
        "echoer",
        'req=$(cat)\necho "working" >&2\nprintf \'{"ok": true, "details": {"got": %s}}\' "$req"\n',
    )
    answer = call(tmp_path, "echoer", "check")
    got = answer["details"]["got"]
    assert got["operation"] == "check"
    assert got["target"]["kind"] == "taskserv"
    assert got["context"]["workspace"] == str(tmp_path)
    assert got["context"]["runtime_dir"] == str(tmp_path / "runtime")


def test_a_higher_layer_wins_and_component_listing_says_which(tmp_path: Path) -> None:
    make_ext(tmp_path, "tool", 'echo \'{"ok": true, "details": {"layer": "ws"}}\'', version="1.0.0")
    infra_root = tmp_path / "infra" / "prod"
    make_ext(
        infra_root, "tool", 'echo \'{"ok": true, "details": {"layer": "infra"}}\'', version="2.0.0"
    )

    assert resolve("taskservs/tool", tmp_path).version == "1.0.0"
    top = resolve("taskservs/tool", tmp_path, "prod")
    assert (top.version, top.layer) == ("2.0.0", "infra")
    cat = discover(tmp_path, "prod")
    assert cat.found[("taskserv", "tool")].layer == "infra"
    assert [e.layer for e in cat.shadowed if e.name == "tool"] == ["workspace"]


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ('echo "disk full on /srv" >&2\nexit 3\n', "exit code 3\n  disk full on /srv"),
        ("echo 'this is not json'\n", "is not JSON"),
        ("echo '[1, 2]'\n", "must be one JSON object"),
        ("echo '{\"details\": {}}'\n", "breaks the install schema: ok: Field required"),
        ("sleep 30\n", "no answer within 5 s"),
    ],
    ids=["non-zero exit", "not json", "not an object", "schema", "timeout"],
)
def test_each_failure_names_the_extension_the_operation_and_the_reason(
    tmp_path: Path, script: str, reason: str
) -> None:
    make_ext(tmp_path, "broken", script)
    with pytest.raises(ExtensionError) as err:
        call(tmp_path, "broken")
    msg = err.value.message
    assert msg.startswith("extension taskservs/broken (workspace layer) failed in install:"), msg
    import re

    assert re.search(reason, msg), msg
    assert err.value.details["extension"] == "taskservs/broken"
    assert err.value.details["operation"] == "install"


def test_a_timed_out_extension_is_killed_with_everything_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    make_ext(tmp_path, "slow", f"sleep 60 &\necho $! > {pidfile}\nwait\n")
    with pytest.raises(ExtensionError, match="no answer within"):
        call(tmp_path, "slow")
    pid = int(pidfile.read_text())
    assert (
        not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )


def test_a_background_child_holding_stdout_does_not_hang_the_call(tmp_path: Path) -> None:
    make_ext(tmp_path, "daemonish", "(sleep 20) &\necho '{\"ok\": true}'\n")
    assert call(tmp_path, "daemonish")["ok"] is True


@pytest.mark.parametrize(
    ("manifest", "problem", "error"),
    [
        (
            '{ name = "bad", kind = "taskserv", version = "one", operations = {} }',
            "semantic version",
            NickelError,
        ),
        (
            '{ name = "bad", kind = "robot", version = "1.0.0", operations = {} }',
            "provider",
            NickelError,
        ),
        (
            HEAD + 'operations = { install = "ts.sh" } }',
            "missing remove, check",
            ValidationError,
        ),
        (
            HEAD + 'operations = { install = "nope.sh", remove = "ts.sh", check = "ts.sh" } }',
            "nope.sh not found",
            ValidationError,
        ),
        (
            HEAD + 'operations = { install = "../x", remove = "ts.sh", check = "ts.sh" } }',
            "inside the extension folder",
            NickelError,
        ),
        (
            '{ name = "other", kind = "taskserv", version = "1.0.0", operations = ' + OPS + " }",
            "must be named 'other'",
            ValidationError,
        ),
        (
            '{ name = "bad", kind = "taskserv", version = "1.0.0", operations = '
            + OPS
            + ", colour = 1 }",
            "colour",
            NickelError,
        ),
    ],
    ids=["version", "kind", "missing op", "missing exe", "escape", "folder name", "unknown field"],
)
def test_a_malformed_manifest_is_refused_naming_the_problem(
    tmp_path: Path, manifest: str, problem: str, error: type[Exception]
) -> None:
    make_ext(tmp_path, "bad", "exit 0\n", manifest=manifest)
    with pytest.raises(error) as err:
        resolve("taskservs/bad", tmp_path)
    assert problem in str(err.value)
    cat = discover(tmp_path)
    assert ("taskserv", "bad") not in cat.found
    assert len([e for e in cat.errors if str(tmp_path) in e]) == 1


def test_a_non_executable_script_is_refused(tmp_path: Path) -> None:
    folder = make_ext(tmp_path, "noexec", "exit 0\n")
    (folder / "ts.sh").chmod(0o644)
    with pytest.raises(ValidationError, match="not executable"):
        resolve("taskservs/noexec", tmp_path)


def test_an_unknown_extension_lists_what_exists(tmp_path: Path) -> None:
    make_ext(tmp_path, "present", "exit 0\n")
    with pytest.raises(NotFound, match=r"known: .*present"):
        resolve("taskservs/absent", tmp_path)
    with pytest.raises(ValidationError, match="unknown extension kind"):
        resolve("gadgets/x", tmp_path)


def test_python_extensions_use_the_sdk_and_its_failures_read_well(tmp_path: Path) -> None:
    folder = tmp_path / "extensions" / "taskservs" / "pyext"
    folder.mkdir(parents=True)
    (folder / "extension.ncl").write_text(
        '{ name = "pyext", kind = "taskserv", version = "0.1.0", '
        'operations = { install = "main.py", remove = "main.py", check = "main.py" } }'
    )
    (folder / "main.py").write_text(
        "from provisioning.workspace.sdk import Failure, run\n"
        "def install(req):\n"
        "    req.progress('step 1')\n"
        "    return {'ok': True, 'details': {'settings': req.settings}}\n"
        "def check(req):\n"
        "    raise Failure('port 6379 is closed on web-01')\n"
        "def remove(req):\n"
        "    raise RuntimeError('boom')\n"
        "run({'install': install, 'check': check, 'remove': remove})\n"
    )
    ext = resolve("taskservs/pyext", tmp_path)
    body = request({"kind": "taskserv"}, {"port": 1}, workspace=tmp_path, infra=None, ext=ext)
    assert run_operation(ext, "install", body)["details"] == {"settings": {"port": 1}}
    with pytest.raises(ExtensionError, match="exit code 1\n  port 6379 is closed on web-01"):
        run_operation(ext, "check", body)
    with pytest.raises(ExtensionError, match="RuntimeError: boom"):
        run_operation(ext, "remove", body)
    sink = tmp_path / "log.txt"
    with sink.open("w") as fh:
        run_operation(ext, "install", body, stderr_sink=fh)
    assert "step 1" in sink.read_text()
    assert json.loads(json.dumps(body))  # the request is plain JSON
