"""`prvng dns export`: the servers of the inventory as DNS records.

Every server the inventory knows with an address becomes one record ``<hostname>.<infra>.
<domain>`` (``A`` or ``AAAA``), printed as an RFC 1035 zone file (for CoreDNS's ``file`` plugin
or BIND) or as a hosts file (CoreDNS's ``hosts`` plugin, ``/etc/hosts``). The inventory comes
from the orchestrator (``GET /servers``, what ``prvng server list`` shows) or, with ``--from``,
from the JSON that ``prvng --output json server list`` printed. ``deploy/coredns/`` serves it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from provisioning.cli.output import OutputFormat, err_console, render
from provisioning.cli.state import run, state_of
from provisioning.core.errors import Conflict, ValidationError

__all__ = ["DnsFormat", "Record", "app", "hosts_file", "records_of", "zone_file"]

app = typer.Typer(help="DNS records of the servers' inventory.", no_args_is_help=True)

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_SERIAL = re.compile(r"^\s*(\d+)\s*;\s*serial\s*$", re.MULTILINE)
#: SOA timers: refresh, retry, expire (seconds); only secondaries read them.
_REFRESH, _RETRY, _EXPIRE = 3600, 600, 604800


class DnsFormat(StrEnum):
    ZONE = "zone"
    HOSTS = "hosts"


@dataclass(frozen=True, order=True)
class Record:
    """One server's name (relative to the domain: ``<hostname>.<infra>``) and address."""

    name: str
    rtype: str
    address: str
    hostname: str
    infra: str
    workspace: str


def _domain(text: str) -> str:
    """``text`` as a lower-case domain without the trailing dot.

    Raises:
        ValidationError: a label is empty, too long or holds other than letters, digits, '-'.
    """
    domain = text.strip().rstrip(".").lower()
    labels = domain.split(".")
    if not domain or len(domain) > 200 or not all(_LABEL.match(label) for label in labels):
        raise ValidationError(
            f"--domain {text!r} is not a domain name: use labels of letters, digits and '-' "
            "joined by dots (e.g. internal, prvng.example.com)",
            field="domain",
        )
    return domain


def records_of(rows: list[dict[str, Any]]) -> tuple[list[Record], list[str]]:
    """The records of the inventory ``rows``, sorted, and notes on servers left out.

    A server without an address yet (being created) is left out with a note. Two servers of
    different workspaces with the same infra and hostname share a name: one record when their
    addresses agree.

    Raises:
        ValidationError: a row lacks hostname or infra, or they are not DNS labels.
        Conflict: one name would point at two different addresses.
    """
    notes: list[str] = []
    by_name: dict[str, Record] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValidationError(f"inventory entry {i} is not an object")
        hostname, infra = str(row.get("hostname") or ""), str(row.get("infra") or "")
        for field, value in (("hostname", hostname), ("infra", infra)):
            if not _LABEL.match(value):
                raise ValidationError(
                    f"inventory entry {i}: {field} {value!r} is not a DNS label (letters, "
                    "digits and '-', at most 63)",
                    field=field,
                )
        name = f"{hostname}.{infra}"
        raw = row.get("address")
        if not raw:
            notes.append(f"{name}: no address yet ({row.get('status') or 'unknown'}), left out")
            continue
        try:
            address = ipaddress.ip_interface(str(raw).strip()).ip
        except ValueError:
            notes.append(f"{name}: address {raw!r} is not an IP address, left out")
            continue
        rec = Record(
            name=name,
            rtype="A" if address.version == 4 else "AAAA",
            address=str(address),
            hostname=hostname,
            infra=infra,
            workspace=str(row.get("workspace_name") or row.get("workspace") or ""),
        )
        seen = by_name.get(name)
        if seen is not None and seen.address != rec.address:
            raise Conflict(
                f"{name} would point at {seen.address} (workspace {seen.workspace or '?'}) and "
                f"at {rec.address} (workspace {rec.workspace or '?'}); export one workspace "
                "with --workspace, or one infra with --infra",
                name=name,
            )
        by_name.setdefault(name, rec)
    return sorted(by_name.values()), notes


def zone_file(records: list[Record], *, domain: str, ttl: int, serial: int, ns_address: str) -> str:
    """An RFC 1035 master file for ``domain``: SOA, one NS (``ns.<domain>`` at
    ``ns_address``, the address the DNS server answers on) and the records."""
    ns = ipaddress.ip_address(ns_address)
    lines = [
        f"; {domain}: {len(records)} servers of the provisioning inventory.",
        "; Generated by `prvng dns export --format zone`; regenerate it rather than edit it.",
        f"$ORIGIN {domain}.",
        f"$TTL {ttl}",
        f"@\tIN\tSOA\tns.{domain}. hostmaster.{domain}. (",
        f"\t\t{serial} ; serial",
        f"\t\t{_REFRESH} ; refresh",
        f"\t\t{_RETRY} ; retry",
        f"\t\t{_EXPIRE} ; expire",
        f"\t\t{ttl} ) ; negative answers",
        f"@\tIN\tNS\tns.{domain}.",
        f"ns\tIN\t{'A' if ns.version == 4 else 'AAAA'}\t{ns}",
    ]
    lines += [f"{r.name}\tIN\t{r.rtype}\t{r.address}" for r in records]
    return "\n".join(lines) + "\n"


def hosts_file(records: list[Record], *, domain: str) -> str:
    """A hosts file: each address with its full name and its short ``<hostname>.<infra>``."""
    lines = [
        f"# {domain}: {len(records)} servers of the provisioning inventory.",
        "# Generated by `prvng dns export --format hosts`; regenerate it rather than edit it.",
    ]
    lines += [f"{r.address}\t{r.name}.{domain} {r.name}" for r in records]
    return "\n".join(lines) + "\n"


def _read_rows(source: Path) -> list[dict[str, Any]]:
    """The inventory as ``prvng --output json server list`` prints it, from a file or stdin."""
    try:
        text = sys.stdin.read() if str(source) == "-" else source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"--from {source}: {exc.strerror or exc}", field="from") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValidationError(
            f"--from {source}: not JSON ({exc}); give what `prvng --output json server list` "
            "prints",
            field="from",
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]  # the API's envelope
    if not isinstance(data, list):
        raise ValidationError(f"--from {source}: expected a JSON list of servers", field="from")
    return data


def _note(text: str) -> None:
    """One line on stderr, never folded (scripts grep it)."""
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one rename, so a DNS server reloading it never reads half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@app.command("export")
def export(
    ctx: typer.Context,
    fmt: Annotated[
        DnsFormat,
        typer.Option("--format", "-f", help="zone: an RFC 1035 zone file; hosts: a hosts file."),
    ] = DnsFormat.ZONE,
    domain: Annotated[
        str, typer.Option(help="Domain under which each server is <hostname>.<infra>.")
    ] = "internal",
    infra: Annotated[str | None, typer.Option("--infra", "-i", help="Only this infra.")] = None,
    workspace: Annotated[
        Path | None,
        typer.Option("--workspace", "-w", help="Only this workspace folder (as the API knows it)."),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Read the inventory from this file (`-`: stdin) as `prvng --output json server "
            "list` prints it, instead of asking the orchestrator.",
        ),
    ] = None,
    write: Annotated[
        Path | None,
        typer.Option(
            "--write",
            help="Write to this file (atomically) instead of stdout; an unchanged zone keeps its "
            "serial, so the DNS server reloads only on a change.",
        ),
    ] = None,
    ttl: Annotated[int, typer.Option(min=1, max=2147483647, help="TTL of the records (s).")] = 300,
    serial: Annotated[
        int | None,
        typer.Option(min=1, max=4294967295, help="SOA serial; default: the time (Unix seconds)."),
    ] = None,
    ns_address: Annotated[
        str,
        typer.Option(help="Address of ns.<domain>, the zone's name server (the DNS server's)."),
    ] = "127.0.0.1",
) -> None:
    """Print the servers of the inventory as DNS records: <hostname>.<infra>.<domain> → address.
    Servers without an address yet are left out (noted on stderr). With the global
    `--output json|yaml` the records are printed as data instead."""
    st = state_of(ctx)
    dom = _domain(domain)
    try:
        ipaddress.ip_address(ns_address)
    except ValueError:
        raise ValidationError(
            f"--ns-address {ns_address!r} is not an IP address", field="ns_address"
        ) from None
    ws = str(workspace.resolve()) if workspace else None
    if source is not None:
        rows = [
            r
            for r in _read_rows(source)
            if not isinstance(r, dict)  # records_of names it
            or (
                (infra is None or r.get("infra") == infra)
                and (ws is None or r.get("workspace") == ws)
            )
        ]
    else:

        async def go() -> list[dict[str, Any]]:
            async with st.client() as c:
                return await c.list_servers(workspace=ws, infra=infra)

        rows = run(go())
    records, notes = records_of(rows)
    for note in notes:
        _note(f"note: {note}")
    if st.output is not OutputFormat.TABLE:
        render(
            [
                {
                    "name": f"{r.name}.{dom}",
                    "type": r.rtype,
                    "address": r.address,
                    "hostname": r.hostname,
                    "infra": r.infra,
                    "workspace": r.workspace,
                }
                for r in records
            ],
            st.output,
        )
        return
    if fmt is DnsFormat.HOSTS:
        text = hosts_file(records, domain=dom)
    else:

        def zone(n: int) -> str:
            return zone_file(records, domain=dom, ttl=ttl, serial=n, ns_address=ns_address)

        number = serial or int(time.time())
        if write is not None and serial is None and write.is_file():
            old = write.read_text(encoding="utf-8")
            found = _SERIAL.search(old)
            if found and zone(int(found.group(1))) == old:
                _note(f"{write}: unchanged ({len(records)} records)")
                return
            if found:  # secondaries and reloaders only take a larger serial
                number = max(number, int(found.group(1)) + 1)
        text = zone(number)
    if write is None:
        sys.stdout.write(text)
        return
    _write_atomically(write, text)
    _note(f"{write}: {len(records)} records written")
