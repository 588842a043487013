"""`prvng platform init / start / status` end to end, each command in its own process."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

from pydantic import BaseModel

from provisioning.core.nickel import contract, evaluate_file
from provisioning.core.settings import Settings, load_settings
from tests.conftest import free_port
from tests.e2e.platform_proc import prvng, running_platform, show

SECRETS = {"admin_password", "service_api_key", "api_key"}


def _sections() -> dict[str, type[BaseModel]]:
    out = {}
    for name, field in Settings.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out[name] = field.annotation
    return out


def test_init_writes_a_platform_ncl_that_loads_as_the_defaults(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = prvng("platform", "init", data_dir=home)
    assert done.returncode == 0, show(done)
    path = home / "config" / "platform.ncl"
    assert str(path) in done.stdout, show(done)
    loaded = load_settings(home=home, env={})
    assert loaded.model_dump() == Settings(home=home).model_dump()
    # Against the shipped contract, as a user's file is checked at start.
    value = evaluate_file(path, wrap=f"({{file}}) | {contract('platform.ncl', 'Platform')}")
    assert set(value) == set(_sections())
    for section, model in _sections().items():
        assert set(value[section]) == set(model.model_fields) - SECRETS, section


def test_init_has_a_commented_line_for_every_setting(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert prvng("platform", "init", data_dir=home).returncode == 0
    text = (home / "config" / "platform.ncl").read_text(encoding="utf-8")
    blocks = dict(re.findall(r"^  (\w+) = \{\n(.*?)^  \},", text, re.M | re.S))
    assert set(blocks) == set(_sections()), "a section of Settings has no block"
    for section, model in _sections().items():
        for name, field in model.model_fields.items():
            prefix = "# " if name in SECRETS else ""
            line = re.search(rf"^    {prefix}{name} = .*,$", blocks[section], re.M)
            assert line, f"{section}.{name} has no line in platform.ncl"
            assert field.description
            first_words = " ".join(field.description.split()[:3])
            before = blocks[section][: line.start()]
            assert first_words in " ".join(before.replace("#", " ").split()), (
                f"{section}.{name}: its description is not above it"
            )


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = home / "config" / "platform.ncl"
    path.parent.mkdir(parents=True)
    path.write_text("{ orchestrator = { port = 9999 } }\n", encoding="utf-8")
    refused = prvng("platform", "init", data_dir=home)
    assert refused.returncode == 2, show(refused)
    assert str(path) in refused.stderr and "--force" in refused.stderr, show(refused)
    assert "9999" in path.read_text(encoding="utf-8")
    forced = prvng("platform", "init", "--force", data_dir=home)
    assert forced.returncode == 0, show(forced)
    assert load_settings(home=home, env={}).orchestrator.port == 8080


def test_init_and_status_take_the_data_dir_after_the_command_too(tmp_path: Path) -> None:
    # `prvng platform init --data-dir D`, as well as the global `prvng --data-dir D platform
    # init`; the command's own flag wins over the global one.
    home, other = tmp_path / "home", tmp_path / "elsewhere"
    done = prvng("platform", "init", "--data-dir", str(home), data_dir=other)
    assert done.returncode == 0, show(done)
    assert (home / "config" / "platform.ncl").is_file()
    assert not (other / "config" / "platform.ncl").exists()
    status = prvng("platform", "status", "--data-dir", str(home), data_dir=other)
    assert status.returncode == 3, show(status)  # nothing runs there
    assert "not running" in status.stderr, show(status)


def test_a_usage_error_is_a_message_and_exit_2_not_a_traceback(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cases = {
        ("workflow", "list", "--bogus"): "No such option: --bogus",
        ("workflow", "show"): "Missing argument",
        ("nosuchcommand",): "No such command 'nosuchcommand'",
        ("workflow", "list", "--limit", "many"): "Invalid value for '--limit'",
        # A check of the command's own (typer.BadParameter).
        ("workflow", "submit", "examples/workflows/hello.ncl", "--target", "dev/x"): (
            "Invalid value for --target: goes with --via-ops only"
        ),
    }
    for args, message in cases.items():
        done = prvng(*args, data_dir=home)
        assert done.returncode == 2, show(done)
        assert message in done.stderr, show(done)
        assert "Traceback" not in done.stderr and "Usage: prvng" in done.stderr, show(done)
        assert done.stdout == "", show(done)


def _config(home: Path, ports: dict[str, int]) -> None:
    (home / "config").mkdir(parents=True)
    body = ", ".join(f"{section} = {{ port = {port} }}" for section, port in ports.items())
    (home / "config" / "platform.ncl").write_text("{ " + body + " }\n", encoding="utf-8")


def test_start_on_a_busy_port_names_it_and_starts_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    sections = ("orchestrator", "control_center", "ops_keeper", "ops_controller", "audit_mirror")
    ports = {s: free_port() for s in (*sections, "nats")}
    _config(home, ports)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports["ops_keeper"]))
        squatter.listen()
        for mode in ((), ("--background",)):
            done = prvng("platform", "start", *mode, data_dir=home, timeout=60)
            assert done.returncode == 2, show(done)
            err = " ".join(done.stderr.split())
            assert f"port {ports['ops_keeper']}" in err and "ops_keeper.port" in err, show(done)
            assert f"pid {os.getpid()}" in err, show(done)
    assert not (home / "run" / "platform.pid").exists()
    for port in ports.values():  # nothing was left listening (nats-server included)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_status_shows_every_service_with_version_uptime_and_address(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with running_platform(home) as plat:
        up = prvng("--output", "json", "platform", "status", data_dir=home)
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
        assert rows["orchestrator"]["url"] == plat.url
        for name, row in rows.items():
            assert (row["status"], row["pid"]) == ("ok", plat.pid()), show(up)
            if name != "nats":
                assert row["version"] and row["uptime_s"] is not None, show(up)
        text = prvng("platform", "status", data_dir=home)
        assert text.returncode == 0 and "ops-keeper" in text.stdout, show(text)
        assert prvng("platform", "stop", data_dir=home).returncode == 0
        down = prvng("--output", "json", "platform", "status", data_dir=home)
        assert down.returncode == 3, show(down)
        assert all(r["status"] == "down" for r in json.loads(down.stdout)), show(down)
