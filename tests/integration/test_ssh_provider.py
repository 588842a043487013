"""The built-in ``ssh`` provider against a real sshd on 127.0.0.1 (tests/sshd.py), driven the way
the platform drives it: ``resolve`` + ``request`` + ``run_operation``."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioning.core.errors import ExtensionError
from provisioning.workspace.extensions import Extension, request, resolve, run_operation
from tests.sshd import Sshd, free_port, running_sshd


@pytest.fixture
def sshd() -> Iterator[Sshd]:
    with running_sshd() as server:
        yield server


@pytest.fixture
def provider(tmp_path: Path) -> Extension:
    ext = resolve("providers/ssh", workspace=tmp_path)
    assert ext.layer == "builtin"
    return ext


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Processes a test started on the 'remote' (this machine); killed afterwards."""
    started: list[int] = []
    yield started
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def server(hostname: str = "web-01") -> dict[str, Any]:
    return {
        "hostname": hostname,
        "provider": "ssh",
        "plan": None,
        "zone": None,
        "labels": {},
        "taskservs": [],
        "provider_settings": {},
        "address": None,
        "provider_id": None,
    }


def call(
    ext: Extension,
    workspace: Path,
    operation: str,
    settings: dict[str, Any],
    *,
    hostname: str = "web-01",
    **extra: Any,
) -> dict[str, Any]:
    if operation == "list":
        target: dict[str, Any] = {"kind": "servers", "servers": [server(hostname)]}
    else:
        target = {"kind": "server", "server": server(hostname)}
    body = request(target, {**settings, **extra}, workspace=workspace, infra="demo", ext=ext)
    return run_operation(ext, operation, body, timeout_s=60)


def record_path(workspace: Path, hostname: str = "web-01") -> Path:
    return workspace / "runtime" / "servers" / hostname / "server.json"


def failure(ext: Extension, ws: Path, operation: str, settings: dict[str, Any], **kw: Any) -> str:
    with pytest.raises(ExtensionError) as caught:
        call(ext, ws, operation, settings, **kw)
    message = caught.value.message
    assert "Traceback" not in message
    assert "PRIVATE KEY" not in message
    return message


def processes_running(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found


def unique_sleep() -> str:
    """A sleep duration no other process uses, to find (and reap) exactly this test's sleep."""
    return f"{100 + secrets.randbelow(800)}.{secrets.randbelow(10**6):06d}"


# ---------------------------------------------------------------------- create / status / list


def test_create_verifies_registers_and_is_idempotent(
    sshd: Sshd, provider: Extension, tmp_path: Path
) -> None:
    settings = sshd.provider_settings()
    first = call(provider, tmp_path, "create", settings)
    expected = {
        "hostname": "web-01",
        "provider_id": f"ssh://root@127.0.0.1:{sshd.port}",
        "address": "127.0.0.1",
        "status": "running",
    }
    assert {k: first["server"][k] for k in expected} == expected
    assert first["server"]["remote_hostname"] == socket.gethostname()
    text = record_path(tmp_path).read_text()
    record = json.loads(text)
    assert record["provider"] == "ssh"
    assert record["port"] == sshd.port
    assert record["identity_file"] == str(sshd.client_key)
    assert "PRIVATE KEY" not in text

    second = call(provider, tmp_path, "create", settings)
    assert {k: second["server"][k] for k in expected} == expected
    again = json.loads(record_path(tmp_path).read_text())
    assert again["registered_at"] == record["registered_at"]


def test_status_absent_then_running_and_list(
    sshd: Sshd, provider: Extension, tmp_path: Path
) -> None:
    settings = sshd.provider_settings()
    absent = call(provider, tmp_path, "status", settings)
    assert absent["server"]["status"] == "absent"
    assert call(provider, tmp_path, "list", {}) == {"servers": []}

    call(provider, tmp_path, "create", settings, hostname="web-01")
    call(provider, tmp_path, "create", settings, hostname="web-02")
    assert call(provider, tmp_path, "status", settings)["server"]["status"] == "running"
    # status works from the record alone, as the platform may send no settings
    assert call(provider, tmp_path, "status", {})["server"]["status"] == "running"

    listed = call(provider, tmp_path, "list", {})["servers"]
    assert [(s["hostname"], s["status"]) for s in listed] == [
        ("web-01", "running"),
        ("web-02", "running"),
    ]
    assert all(s["provider_id"] == f"ssh://root@127.0.0.1:{sshd.port}" for s in listed)


def test_delete_unregisters_without_touching_the_host(
    sshd: Sshd, provider: Extension, tmp_path: Path
) -> None:
    settings = sshd.provider_settings()
    call(provider, tmp_path, "create", settings)
    sshd.stop()  # delete never connects: it works with the host down
    assert call(provider, tmp_path, "delete", settings) == {"deleted": True}
    assert not record_path(tmp_path).exists()
    assert call(provider, tmp_path, "status", settings)["server"]["status"] == "absent"
    assert call(provider, tmp_path, "delete", settings) == {"deleted": False}


def test_status_of_a_registered_server_whose_sshd_stopped_is_stopped(
    sshd: Sshd, provider: Extension, tmp_path: Path
) -> None:
    settings = sshd.provider_settings()
    call(provider, tmp_path, "create", settings)
    sshd.stop()
    state = call(provider, tmp_path, "status", settings)["server"]
    assert state["status"] == "stopped"
    assert f"127.0.0.1:{sshd.port}" in state["reason"]
    listed = call(provider, tmp_path, "list", {})["servers"]
    assert [(s["hostname"], s["status"]) for s in listed] == [("web-01", "stopped")]
    sshd.start()
    assert call(provider, tmp_path, "status", settings)["server"]["status"] == "running"


# ---------------------------------------------------------------------- exec


def test_exec_answers_stdout_stderr_exit_code_and_uses_input_and_env(
    sshd: Sshd, provider: Extension, tmp_path: Path
) -> None:
    settings = sshd.provider_settings()
    message = failure(provider, tmp_path, "exec", settings, command=["true"])
    assert "create it first" in message  # only registered servers
    call(provider, tmp_path, "create", settings)

    ok = call(provider, tmp_path, "exec", settings, command=["sh", "-c", "echo out; echo err >&2"])
    assert ok == {"exit_code": 0, "stdout": "out\n", "stderr": "err\n"}

    failed = call(provider, tmp_path, "exec", settings, command=["sh", "-c", "echo no >&2; exit 3"])
    assert failed == {"exit_code": 3, "stdout": "", "stderr": "no\n"}

    quoted = call(
        provider,
        tmp_path,
        "exec",
        settings,
        command=["sh", "-c", 'printf "%s|" "$@" "$GREETING"', "sh", "a b", "it's", "$HOME", "`id`"],
        env={"GREETING": "hello 'there' $USER"},
    )
    assert quoted["stdout"] == "a b|it's|$HOME|`id`|hello 'there' $USER|"

    text = "line one\nline two ünïcode\n"
    fed = call(provider, tmp_path, "exec", settings, command=["cat"], input=text)
    assert (fed["exit_code"], fed["stdout"]) == (0, text)
    # without input, stdin is at EOF at once (a command reading it does not hang)
    empty = call(provider, tmp_path, "exec", settings, command=["cat"], timeout_s=10)
    assert (empty["exit_code"], empty["stdout"]) == (0, "")

    # a command that cannot run is an error, not an exit code
    message = failure(provider, tmp_path, "exec", settings, command=["/no/such/command-prvng"])
    assert "cannot run `/no/such/command-prvng`: /no/such/command-prvng: not found" in message


def test_exec_timeout_is_a_clear_error_and_kills_the_command(
    sshd: Sshd, provider: Extension, tmp_path: Path, pids: list[int]
) -> None:
    call(provider, tmp_path, "create", sshd.provider_settings())
    duration = unique_sleep()
    started = time.monotonic()
    message = failure(
        provider,
        tmp_path,
        "exec",
        sshd.provider_settings(),
        command=["sh", "-c", f"sleep {duration}; echo late"],
        timeout_s=1,
    )
    assert time.monotonic() - started < 15
    assert "did not finish within 1 s" in message
    assert f"127.0.0.1:{sshd.port}" in message
    deadline = time.monotonic() + 5
    while (left := processes_running(f"sleep {duration}")) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids.extend(left)
    assert left == [], "the timed-out command is still running on the server"


def test_background_exec_outlives_the_call(
    sshd: Sshd, provider: Extension, tmp_path: Path, pids: list[int]
) -> None:
    call(provider, tmp_path, "create", sshd.provider_settings())
    duration = unique_sleep()
    answer = call(
        provider,
        tmp_path,
        "exec",
        sshd.provider_settings(),
        command=["sh", "-c", f'echo "started $WHO"; exec sleep {duration}'],
        env={"WHO": "web"},
        background=True,
    )
    pid = answer["pid"]
    assert isinstance(pid, int)
    pids.append(pid)
    log = Path(answer["log"])  # the 'remote' is this machine
    try:
        assert answer["exit_code"] == 0
        deadline = time.monotonic() + 5
        while "started" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.read_text() == "started web\n"
        os.kill(pid, 0)  # alive after the call and its connection ended
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[:2] == [b"sleep", duration.encode()]
        assert os.getsid(pid) == pid  # detached, in a session of its own
    finally:
        os.kill(pid, signal.SIGKILL)
        log.unlink(missing_ok=True)

    custom = tmp_path / "bg.log"
    answer = call(
        provider,
        tmp_path,
        "exec",
        sshd.provider_settings(),
        command=["sh", "-c", "echo done"],
        background=True,
        log=str(custom),
    )
    assert answer["log"] == str(custom)
    deadline = time.monotonic() + 5
    while not (custom.is_file() and custom.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert custom.read_text() == "done\n"


# ---------------------------------------------------------------------- failures


def test_unknown_host_key_fails_verification(
    sshd: Sshd, provider: Extension, tmp_path: Path
) -> None:
    other = sshd.new_key("impostor")
    wrong = sshd.dir / "known_hosts.wrong"
    wrong.write_text(sshd.known_hosts_line(other) + "\n")
    message = failure(provider, tmp_path, "create", sshd.provider_settings(known_hosts=str(wrong)))
    assert "host key verification failed" in message
    assert f"127.0.0.1:{sshd.port}" in message
    assert "web-01" in message
    assert not record_path(tmp_path).exists()

    empty = sshd.dir / "known_hosts.empty"
    empty.write_text("")
    message = failure(provider, tmp_path, "create", sshd.provider_settings(known_hosts=str(empty)))
    assert "host key verification failed" in message
    assert "has no key for" in message


def test_unauthorized_client_key_is_an_auth_failure(
    sshd: Sshd, provider: Extension, tmp_path: Path
) -> None:
    stranger = sshd.new_key("stranger")
    message = failure(
        provider, tmp_path, "create", sshd.provider_settings(identity_file=str(stranger))
    )
    assert "authentication failed" in message
    assert f"root@127.0.0.1:{sshd.port}" in message
    assert str(stranger) in message


def test_refused_and_silent_ports_are_clear_errors(
    sshd: Sshd, provider: Extension, tmp_path: Path
) -> None:
    closed = free_port()
    message = failure(provider, tmp_path, "create", sshd.provider_settings(port=closed))
    assert f"connection refused by 127.0.0.1:{closed}" in message

    with socket.socket() as silent:  # accepts TCP connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        message = failure(
            provider, tmp_path, "create", sshd.provider_settings(port=port, connect_timeout_s=1)
        )
    assert time.monotonic() - started < 15
    assert f"127.0.0.1:{port} within 1 s" in message


def test_bad_settings_are_named(sshd: Sshd, provider: Extension, tmp_path: Path) -> None:
    settings = sshd.provider_settings()
    del settings["identity_file"]
    assert "identity_file: required" in failure(provider, tmp_path, "create", settings)
    message = failure(
        provider, tmp_path, "create", sshd.provider_settings(known_hosts=str(tmp_path / "nope"))
    )
    assert "known_hosts" in message and "is not a file" in message
    message = failure(provider, tmp_path, "exec", sshd.provider_settings(), command="uname -a")
    assert "settings.command must be a non-empty list of strings" in message
