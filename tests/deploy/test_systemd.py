"""deploy/systemd: every unit passes ``systemd-analyze verify`` (any warning fails), keeps its
sandbox (``systemd-analyze security --offline`` rates it), runs a command line the CLI
accepts, and prvng.target starts them all after NATS and PostgreSQL. The sysusers and tmpfiles
snippets are applied by ``systemd-sysusers`` and ``systemd-tmpfiles`` to a scratch root."""

from __future__ import annotations

import os
import shlex
import socket
from collections import defaultdict
from pathlib import Path

import pytest

from tests.deploy.artifacts import (
    DEFAULT_PORTS,
    DEPLOY,
    VENV_BIN,
    check_env,
    parse_cli,
    run,
    show,
    tool,
)

UNITS = DEPLOY / "systemd"
BINARY = "/opt/prvng/bin/prvng"
#: unit to verify (the template as one instance) -> the `prvng` command its ExecStart runs.
SERVICES = {
    "prvng-control-center.service": "prvng serve control-center",
    "prvng-orchestrator@8080.service": "prvng serve orchestrator",
    "prvng-ops-keeper.service": "prvng serve ops-keeper",
    "prvng-ops-controller.service": "prvng serve ops-controller",
    "prvng-audit-mirror.service": "prvng serve audit-mirror",
    "prvng-platform.service": "prvng platform start",
    "prvng-dns-export.service": "prvng dns export",
}
DISTRIBUTED = [
    u for u in SERVICES if u not in ("prvng-platform.service", "prvng-dns-export.service")
]

Unit = dict[str, dict[str, list[str]]]


def unit_file(unit: str) -> Path:
    """The file behind ``unit`` (``x@8080.service`` is the template ``x@.service``)."""
    name = unit.split("@")[0] + "@.service" if "@" in unit else unit
    for folder in (UNITS, DEPLOY / "coredns"):
        if (folder / name).is_file():
            return folder / name
    raise AssertionError(f"no unit file for {unit}")


def parse_unit(path: Path) -> Unit:
    """Sections -> key -> every value assigned, in order (systemd.syntax(7))."""
    unit: Unit = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        unit[section][key.strip()].append(value.strip())
    return unit


def words(unit: Unit, section: str, key: str) -> list[str]:
    return [w for value in unit[section][key] for w in value.split()]


@pytest.fixture(scope="module")
def unit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units as installed in a unit folder, ExecStart pointing at this venv's `prvng`
    (systemd-analyze checks that the program exists and is executable)."""
    folder = tmp_path_factory.mktemp("systemd") / "system"
    folder.mkdir()
    sources = [
        *UNITS.glob("*.service"),
        *UNITS.glob("*.target"),
        *(DEPLOY / "coredns").glob("*.service"),
        *(DEPLOY / "coredns").glob("*.timer"),
    ]
    for src in sources:
        text = src.read_text(encoding="utf-8")
        if src.suffix == ".service":
            assert f"ExecStart={BINARY} " in text, f"{src.name}: ExecStart must run {BINARY}"
        (folder / src.name).write_text(text.replace(BINARY, str(VENV_BIN / "prvng")), "utf-8")
    return folder


def verify(folder: Path, *units: str) -> None:
    # The trailing ':' keeps systemd's own search path (sysinit.target & co) after ours.
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{folder}:"}
    argv = [tool("systemd-analyze"), "verify", "--man=no", *(str(folder / u) for u in units)]
    proc = run(argv, env=env)
    # verify exits 0 on an unknown key or section ("…, ignoring."): any output is a failure.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), show(proc)


@pytest.mark.parametrize(
    "unit", [*SERVICES, "prvng.target", "prvng-dns-export.timer", "prvng-orchestrator@8088.service"]
)
def test_unit_passes_systemd_analyze_verify_without_a_warning(unit_dir: Path, unit: str) -> None:
    verify(unit_dir, unit)


def test_verify_reports_a_misspelt_directive(unit_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "prvng-ops-keeper.service"
    text = (unit_dir / broken.name).read_text(encoding="utf-8")
    broken.write_text(text.replace("ProtectSystem=", "ProtectSytem="), "utf-8")
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    proc = run([tool("systemd-analyze"), "verify", "--man=no", str(broken)], env=env)
    assert "ProtectSytem" in proc.stdout + proc.stderr, show(proc)


@pytest.mark.parametrize("unit", [*DISTRIBUTED, "prvng-platform.service"])
def test_service_runs_sandboxed_as_the_prvng_user(unit_dir: Path, unit: str) -> None:
    u = parse_unit(unit_file(unit))
    svc = u["Service"]
    for key, want in {
        "User": "prvng",
        "Group": "prvng",
        "StateDirectory": "prvng",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictNamespaces": "yes",
        "Restart": "on-failure",
    }.items():
        assert svc[key] == [want], f"{unit}: {key}={svc[key]}, want {want}"
    assert svc["CapabilityBoundingSet"] == [""], f"{unit}: must drop every capability"
    assert svc["AmbientCapabilities"] == [""]
    assert set(words(u, "Service", "RestrictAddressFamilies")) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "/var/lib/prvng" in words(u, "Service", "ReadWritePaths")
    assert "PRVNG_HOME=/var/lib/prvng" in words(u, "Service", "Environment")
    assert [e.lstrip("-") for e in svc["EnvironmentFile"]] == ["/etc/prvng/prvng.env"]
    # The whole sandbox, rated by systemd itself: exposure at most 2.0 ("OK").
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}
    argv = [tool("systemd-analyze"), "security", "--offline=yes", "--threshold=20", "--no-pager"]
    proc = run([*argv, str(unit_dir / unit)], env=env)
    assert proc.returncode == 0, show(proc)


def test_netns_drop_in_verifies_and_grants_only_what_namespaces_need(
    unit_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "system"
    folder.mkdir()
    for src in unit_dir.iterdir():
        (folder / src.name).write_bytes(src.read_bytes())
    drop_in = folder / "prvng-orchestrator@.service.d"
    drop_in.mkdir()
    conf = UNITS / "local-provider-netns.conf"
    (drop_in / conf.name).write_bytes(conf.read_bytes())
    verify(folder, "prvng-orchestrator@8080.service")
    d = parse_unit(conf)
    assert d["Service"]["User"] == ["root"]
    caps = set(words(d, "Service", "CapabilityBoundingSet"))
    assert {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"} <= caps and "CAP_SYS_MODULE" not in caps
    assert "AF_NETLINK" in words(d, "Service", "RestrictAddressFamilies")
    assert d["Service"]["NoNewPrivileges"] == [], "the drop-in must keep NoNewPrivileges"


@pytest.mark.parametrize("unit", list(SERVICES))
def test_exec_start_is_a_command_line_the_cli_accepts(unit: str) -> None:
    u = parse_unit(unit_file(unit))
    [exec_start] = u["Service"]["ExecStart"]
    instance = unit.split("@")[1].split(".")[0] if "@" in unit else ""
    expanded = (
        exec_start.replace("%%", "\0")
        .replace("%i", instance)
        .replace("%H", socket.gethostname())
        .replace("\0", "%")
    )
    assert "%" not in expanded, f"{unit}: unexpanded specifier in {exec_start}"
    binary, *argv = shlex.split(expanded)
    assert binary == BINARY
    path, params = parse_cli(argv)
    assert path == SERVICES[unit]
    if "orchestrator" in unit:
        assert params["port"] == int(instance) and params["worker_id"]
    if unit == "prvng-orchestrator@8080.service":
        assert params["port"] == DEFAULT_PORTS["orchestrator"]


def test_target_starts_every_service_after_nats_and_postgresql() -> None:
    target = parse_unit(UNITS / "prvng.target")
    wants = set(words(target, "Unit", "Wants"))
    after = set(words(target, "Unit", "After"))
    assert set(DISTRIBUTED) <= wants
    assert {"nats-server.service", "postgresql.service"} <= wants & after
    assert "prvng-platform.service" in words(target, "Unit", "Conflicts")
    for unit in DISTRIBUTED:
        u = parse_unit(unit_file(unit))
        assert u["Unit"]["PartOf"] == ["prvng.target"], unit
        assert u["Install"]["WantedBy"] == ["prvng.target"], unit
        assert "nats-server.service" in words(u, "Unit", "After"), unit
    order = {unit: set(words(parse_unit(unit_file(unit)), "Unit", "After")) for unit in SERVICES}
    assert "prvng-control-center.service" in order["prvng-orchestrator@8080.service"]
    assert "prvng-control-center.service" in order["prvng-ops-keeper.service"]
    assert {"prvng-ops-keeper.service", "prvng-orchestrator@8080.service"} <= order[
        "prvng-ops-controller.service"
    ]
    assert parse_unit(unit_file("prvng-orchestrator@8080.service"))["Install"][
        "DefaultInstance"
    ] == [str(DEFAULT_PORTS["orchestrator"])]


def test_environment_file_example_holds_settings_only(tmp_path: Path) -> None:
    env = {}
    for line in (UNITS / "prvng.env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            env[key] = value
    settings = check_env(env, tmp_path, "prvng.env.example")
    assert settings.state.url.startswith("postgresql://")
    assert len(settings.nats_servers) == 3
    assert settings.control_center_url.endswith(f":{DEFAULT_PORTS['control-center']}")
    assert settings.orchestrator_url.endswith(f":{DEFAULT_PORTS['orchestrator']}")
    assert settings.ops_keeper.url.endswith(f":{DEFAULT_PORTS['ops-keeper']}")
    assert not settings.ops_controller.embedded and not settings.audit_mirror.embedded


def test_sysusers_and_tmpfiles_make_the_user_and_folders(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n", "utf-8")
    (root / "etc" / "group").write_text("root:x:0:\n", "utf-8")
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).write_text("", "utf-8")
    sysusers = UNITS / "prvng.sysusers.conf"
    proc = run([tool("systemd-sysusers"), f"--root={root}", str(sysusers)])
    assert proc.returncode == 0, show(proc)
    [entry] = [
        ln.split(":")
        for ln in (root / "etc" / "passwd").read_text("utf-8").splitlines()
        if ln.startswith("prvng:")
    ]
    assert entry[5] == "/var/lib/prvng" and entry[6] == "/usr/sbin/nologin"
    uid = int(entry[2])
    assert 0 < uid < 1000, "a system user"
    tmpfiles = UNITS / "prvng.tmpfiles.conf"
    proc = run([tool("systemd-tmpfiles"), f"--root={root}", "--create", str(tmpfiles)])
    assert proc.returncode == 0, show(proc)
    for folder in ("srv/prvng", "srv/prvng/workspaces"):
        st = (root / folder).stat()
        assert (st.st_uid, oct(st.st_mode & 0o777)) == (uid, "0o750"), folder
    etc = (root / "etc" / "prvng").stat()
    assert (etc.st_uid, oct(etc.st_mode & 0o777)) == (0, "0o750")
