"""deploy/coredns and `prvng dns export`.

CoreDNS has no Debian or PyPI package, so the Corefiles are checked by a parser of their
syntax (server blocks, plugins CoreDNS ships, the zone file being the one `prvng dns export
--write` writes, the zone the block serves being the domain exported); where a ``coredns``
binary is on the PATH it is also started and queried. The zone `prvng dns export` prints,
from a real orchestrator's inventory over HTTP, is checked by BIND's ``named-checkzone``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn

from provisioning.cli.commands.dns import Record, hosts_file, records_of, zone_file
from provisioning.core.errors import Conflict, ValidationError
from provisioning.orchestrator.app import OrchestratorService
from provisioning.workspace.inventory import Inventory
from tests.conftest import free_port, make_settings, open_guard
from tests.deploy.artifacts import DEPLOY, REPO, run, show, tool

COREDNS = DEPLOY / "coredns"
#: The plugins CoreDNS ships (coredns.io/plugins); anything else needs a custom build.
PLUGINS = {
    "acl", "any", "auto", "autopath", "bind", "bufsize", "cache", "cancel", "chaos", "debug",
    "dns64", "dnssec", "dnstap", "erratic", "errors", "etcd", "file", "forward", "geoip",
    "grpc", "header", "health", "hosts", "import", "kubernetes", "loadbalance", "local", "log",
    "loop", "metadata", "minimal", "nsid", "pprof", "prometheus", "ready", "reload", "rewrite",
    "root", "secondary", "sign", "template", "timeouts", "tls", "trace", "transfer", "tsig",
    "view", "whoami",
}  # fmt: skip
_DURATION = re.compile(r"^\d+(ms|s|m|h)$")

SERVERS = [
    # (workspace, infra, hostname, address)
    ("/srv/ws/demo", "demo", "web-01", "10.77.0.2"),
    ("/srv/ws/demo", "demo", "web-02", "10.77.0.3"),
    ("/srv/ws/demo", "prod", "db-01", "fd00:77::5"),
    ("/srv/ws/demo", "prod", "db-02", None),  # being created: no address yet
]


# ------------------------------------------------------------------ a Corefile parser


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] = field(default_factory=list)


@dataclass
class ServerBlock:
    keys: list[str]
    directives: list[Directive]


def _tokens(text: str) -> list[list[str]]:
    """Lines of tokens, comments dropped, quoted strings kept whole."""
    lines = []
    for raw in text.splitlines():
        lexer = shlex.shlex(raw, posix=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        toks = list(lexer)
        if toks:
            lines.append(toks)
    return lines


def parse_corefile(text: str) -> list[ServerBlock]:
    """Caddyfile syntax as CoreDNS reads it. Raises AssertionError on a syntax error."""
    lines = _tokens(text)
    pos = 0

    def block() -> list[Directive]:
        nonlocal pos
        out: list[Directive] = []
        while pos < len(lines):
            toks = lines[pos]
            pos += 1
            if toks == ["}"]:
                return out
            assert "}" not in toks[:-1] and "{" not in toks[:-1], f"bad line {toks}"
            if toks[-1] == "{":
                out.append(Directive(toks[0], toks[1:-1], block()))
            else:
                out.append(Directive(toks[0], toks[1:]))
        raise AssertionError("a block is not closed")

    servers = []
    while pos < len(lines):
        toks = lines[pos]
        pos += 1
        assert toks[-1] == "{", f"a server block must open with '{{': {toks}"
        servers.append(ServerBlock(toks[:-1], block()))
    return servers


def zone_and_port(key: str) -> tuple[str, int]:
    zone, _, port = key.rpartition(":") if ":" in key else (key, "", "53")
    return zone.rstrip(".") or ".", int(port or 53)


#: The options a block of these plugins may hold (their CoreDNS documentation).
OPTIONS = {"file": {"reload"}, "hosts": {"ttl", "no_reverse", "reload", "fallthrough"}}


def check_plugins(server: ServerBlock) -> None:
    for d in server.directives:
        assert d.name in PLUGINS, f"{server.keys}: {d.name} is not a CoreDNS plugin"
        for sub in d.block:
            assert sub.name in OPTIONS.get(d.name, {sub.name}), f"{d.name}: no option {sub.name}"
            if sub.name == "reload":
                assert len(sub.args) == 1 and _DURATION.match(sub.args[0]), sub.args


def export_argv(unit: Path) -> list[str]:
    [line] = [ln for ln in unit.read_text("utf-8").splitlines() if ln.startswith("ExecStart=")]
    binary, *argv = shlex.split(line.removeprefix("ExecStart="))
    assert binary == "/opt/prvng/bin/prvng"
    return argv


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_corefile_serves_the_zone_the_export_unit_writes() -> None:
    servers = parse_corefile((COREDNS / "Corefile").read_text("utf-8"))
    argv = export_argv(COREDNS / "prvng-dns-export.service")
    assert argv[:2] == ["dns", "export"] and option(argv, "--format") == "zone"
    domain, written = option(argv, "--domain"), option(argv, "--write")
    by_zone = {zone_and_port(k): s for s in servers for k in s.keys}
    internal = by_zone[(domain, 53)]
    [file] = [d for d in internal.directives if d.name == "file"]
    assert file.args == [written, domain]
    assert [s.name for s in file.block] == ["reload"]
    assert by_zone[(".", 53)].directives[0].name == "forward"
    for server in servers:
        check_plugins(server)


def test_hosts_corefile_reads_the_file_the_documented_command_writes() -> None:
    text = (COREDNS / "Corefile.hosts").read_text("utf-8")
    [command] = [ln.lstrip("# ").strip() for ln in text.splitlines() if "prvng dns export" in ln]
    argv = shlex.split(command)[1:]
    servers = parse_corefile(text)
    for server in servers:
        check_plugins(server)
    [internal] = [s for s in servers if zone_and_port(s.keys[0])[0] == option(argv, "--domain")]
    [hosts] = [d for d in internal.directives if d.name == "hosts"]
    assert hosts.args == [option(argv, "--write"), option(argv, "--domain")]
    assert option(argv, "--format") == "hosts"


def test_the_parser_refuses_an_unclosed_block() -> None:
    with pytest.raises(AssertionError, match="not closed"):
        parse_corefile("internal {\n  file db.internal\n")


# ------------------------------------------------------------------ prvng dns export


@contextlib.asynccontextmanager
async def orchestrator_with_inventory(home: Path) -> AsyncIterator[str]:
    """An orchestrator (SQLite, authentication off) whose inventory holds SERVERS, served over
    real HTTP on a free loopback port; yields its URL."""
    svc = OrchestratorService(
        make_settings(home, f"sqlite:///{home / 'state.db'}"), worker_id="dns", guard=open_guard()
    )
    await svc.start()
    inv = Inventory(svc.store.db)
    await inv.migrate()
    for workspace, infra, hostname, address in SERVERS:
        await inv.record_server(
            workspace=workspace,
            workspace_name="demo",
            infra=infra,
            hostname=hostname,
            provider="local",
            provider_id=f"ns-{hostname}",
            address=address,
            status="running" if address else "creating",
        )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(svc.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert not serving.done() and time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)
        await svc.stop(kill_running=True)


async def prvng(home: Path, url: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRVNG_")}
    env["XDG_CONFIG_HOME"] = str(home / "config-home")  # no stored login
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provisioning.cli.main", "--data-dir", str(home), "--url", url,
        *args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def named_checkzone(domain: str, zone: Path) -> str:
    proc = run([tool("named-checkzone"), "-k", "fail", "-n", "fail", domain, str(zone)])
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), show(proc)
    return proc.stdout


async def test_dns_export_of_a_live_inventory_is_a_zone_named_checkzone_loads(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    async with orchestrator_with_inventory(home) as url:
        code, zone, err = await prvng(home, url, "dns", "export", "--serial", "2024010101")
        assert code == 0, err
        code, hosts, _ = await prvng(home, url, "dns", "export", "-f", "hosts", "--infra", "demo")
        assert code == 0
        code, as_json, _ = await prvng(home, url, "-o", "json", "dns", "export", "--domain", "x.y")
        assert code == 0
    assert "db-02.prod: no address yet (creating), left out" in err
    path = tmp_path / "db.internal"
    path.write_text(zone, "utf-8")
    assert "loaded serial 2024010101" in named_checkzone("internal", path)
    records = {tuple(ln.split("\t")) for ln in zone.splitlines() if "\tIN\t" in ln}
    assert {
        ("web-01.demo", "IN", "A", "10.77.0.2"),
        ("web-02.demo", "IN", "A", "10.77.0.3"),
        ("db-01.prod", "IN", "AAAA", "fd00:77::5"),
    } <= records
    assert not any(r[0].startswith("db-02") for r in records)
    assert [ln for ln in hosts.splitlines() if not ln.startswith("#")] == [
        "10.77.0.2\tweb-01.demo.internal web-01.demo",
        "10.77.0.3\tweb-02.demo.internal web-02.demo",
    ]
    assert '"name": "web-01.demo.x.y"' in as_json


def test_named_checkzone_catches_a_broken_zone(tmp_path: Path) -> None:
    rec = Record("web-01.demo", "A", "10.77.0.2", "web-01", "demo", "demo")
    text = zone_file([rec], domain="internal", ttl=300, serial=1, ns_address="127.0.0.1")
    broken = tmp_path / "db.internal"
    broken.write_text(text.replace("10.77.0.2", "10.77.0.256"), "utf-8")
    proc = run([tool("named-checkzone"), "internal", str(broken)])
    assert proc.returncode != 0, show(proc)


def test_written_zone_keeps_its_serial_while_the_inventory_is_unchanged(tmp_path: Path) -> None:
    inventory = tmp_path / "servers.json"
    rows = [
        {"workspace": ws, "workspace_name": "demo", "infra": i, "hostname": h, "address": a}
        for ws, i, h, a in SERVERS
    ]
    inventory.write_text(json.dumps(rows), "utf-8")
    zone = tmp_path / "db.internal"
    argv = [sys.executable, "-m", "provisioning.cli.main", "--data-dir", str(tmp_path / "h")]
    export = [*argv, "dns", "export", "--from", str(inventory), "--write", str(zone)]
    first = run(export)
    assert first.returncode == 0, show(first)
    serial = re.search(r"(\d+) ; serial", zone.read_text("utf-8"))
    assert serial and "3 records written" in first.stderr
    again = run(export)
    assert again.returncode == 0 and "unchanged" in again.stderr, show(again)
    assert zone.read_text("utf-8").count(f"{serial.group(1)} ; serial") == 1
    inventory.write_text(json.dumps(rows[:1]), "utf-8")
    changed = run(export)
    assert changed.returncode == 0, show(changed)
    new = re.search(r"(\d+) ; serial", zone.read_text("utf-8"))
    assert new and int(new.group(1)) > int(serial.group(1))
    named_checkzone("internal", zone)
    assert oct(zone.stat().st_mode & 0o777) == "0o644"


def test_records_of_refuses_two_addresses_for_one_name_and_bad_labels() -> None:
    row = {"workspace": "/a", "infra": "demo", "hostname": "web-01", "address": "10.0.0.1"}
    with pytest.raises(Conflict, match=r"web-01\.demo would point at 10\.0\.0\.1"):
        records_of([row, {**row, "workspace": "/b", "address": "10.0.0.2"}])
    same, _ = records_of([row, {**row, "workspace": "/b"}])
    assert len(same) == 1
    with pytest.raises(ValidationError, match="hostname 'Web_01' is not a DNS label"):
        records_of([{**row, "hostname": "Web_01"}])
    records, notes = records_of([{**row, "address": "not-an-ip"}])
    assert records == [] and "is not an IP address" in notes[0]


def test_hosts_file_lists_full_and_short_names() -> None:
    rec = Record("web-01.demo", "AAAA", "fd00::1", "web-01", "demo", "demo")
    assert hosts_file([rec], domain="internal").splitlines()[-1] == (
        "fd00::1\tweb-01.demo.internal web-01.demo"
    )


# ------------------------------------------------------------------ CoreDNS itself, if any


@pytest.mark.skipif(
    not any(Path(p, "coredns").is_file() for p in os.environ.get("PATH", "").split(":")),
    reason="no coredns binary (neither Debian nor PyPI ships one); the parser tests stand in",
)
def test_coredns_answers_from_the_exported_zone(tmp_path: Path) -> None:
    rec = Record("web-01.demo", "A", "10.77.0.2", "web-01", "demo", "demo")
    zone = tmp_path / "db.internal"
    zone.write_text(
        zone_file([rec], domain="internal", ttl=300, serial=1, ns_address="127.0.0.1"), "utf-8"
    )
    port = free_port()
    text = (COREDNS / "Corefile").read_text("utf-8")
    text = text.replace("/etc/coredns/zones/db.internal", str(zone)).replace(":53 {", f":{port} {{")
    text = text.replace("forward . /etc/resolv.conf", "whoami")
    corefile = tmp_path / "Corefile"
    corefile.write_text(text, "utf-8")
    proc = subprocess.Popen(
        ["coredns", "-conf", str(corefile)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            dig = run(
                [tool("dig"), "+short", "-p", str(port), "@127.0.0.1", "web-01.demo.internal"]
            )
            if dig.stdout.strip() or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert ipaddress.ip_address(dig.stdout.strip()) == ipaddress.ip_address("10.77.0.2")
    finally:
        proc.terminate()
        proc.wait(10)
