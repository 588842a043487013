#!/usr/bin/env python3
"""Task service ``dnsmasq``: DNS for the infra, answering on the server's address.

Settings: ``port`` (53), ``domain`` (``prvng.internal``). It writes ``etc/dns.hosts`` in the
server's folder, a line ``<address> <hostname> <hostname>.<domain>`` for every server of
``context.inventory`` (and this one), and runs dnsmasq with no other source of names: no
``/etc/dnsmasq.conf``, no ``/etc/hosts``, no upstream servers; names under the domain that are
not known answer NXDOMAIN.

* ``install`` writes the hosts file, starts dnsmasq unless it runs with the same address, port
  and domain (then a changed hosts file is reloaded with HUP), and waits until every name
  resolves;
* ``check`` sends real DNS A queries over UDP from here for every name and compares the answers;
* ``remove`` stops it (TERM, then KILL after 10 s) and deletes the hosts file.
"""

from __future__ import annotations

import re
from typing import Any

from provisioning.workspace.sdk import Failure, Request, run, wait_until
from provisioning.workspace.sdk_net import (
    DAEMON_SH,
    address_of,
    dns_query_a,
    inventory,
    parse_kv,
    port_setting,
    resolves_to,
)

DEFAULT_PORT = 53
DEFAULT_DOMAIN = "prvng.internal"
START_WAIT_S = 15.0
STOP_WAIT_S = 10
_DOMAIN = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")

_PREPARE_SH = (
    DAEMON_SH
    + r"""
set -e
mkdir -p etc run log
echo "root=$(pwd)"
printf '%s' "$2" > etc/dns.hosts.new
if cmp -s etc/dns.hosts.new etc/dns.hosts; then
  rm -f etc/dns.hosts.new
  changed=0
else
  mv -f etc/dns.hosts.new etc/dns.hosts
  changed=1
fi
if pid=$(pid_of run/dnsmasq.pid dnsmasq) && [ "$(cat run/dnsmasq.spec 2>/dev/null)" = "$1" ]; then
  echo "state=running"
  echo "pid=$pid"
  if [ "$changed" = 1 ]; then kill -HUP "$pid"; echo "reloaded=1"; fi
else
  stop run/dnsmasq.pid dnsmasq "$3"
  printf '%s' "$1" > run/dnsmasq.spec
  echo "state=stopped"
fi
"""
)

_REMOVE_SH = (
    DAEMON_SH
    + r"""
stop run/dnsmasq.pid dnsmasq "$1"
rm -f etc/dns.hosts etc/dns.hosts.new run/dnsmasq.spec
echo "root=$(pwd)"
"""
)

_LOG_TAIL_SH = "tail -n 5 log/dnsmasq.log log/dnsmasq.out 2>/dev/null"


def _where(req: Request) -> tuple[str, str, int, str]:
    host = str(req.server.get("hostname"))
    domain = req.settings.get("domain", DEFAULT_DOMAIN)
    if not isinstance(domain, str) or not _DOMAIN.match(domain.lower()):
        raise Failure(
            f"settings.domain must be a DNS domain such as prvng.internal, got {domain!r}"
        )
    return host, address_of(req.server), port_setting(req.settings, DEFAULT_PORT), domain.lower()


def _entries(req: Request) -> list[tuple[str, str]]:
    """``(hostname, address)`` of the inventory, this server included."""
    entries = inventory(req.context)
    me = req.server
    if me.get("hostname") not in {h for h, _ in entries}:
        entries.append((str(me["hostname"]), address_of(me)))
    return entries


def _names(entries: list[tuple[str, str]], domain: str) -> list[tuple[str, str]]:
    """Every name to ask for, with the address it must resolve to."""
    out: list[tuple[str, str]] = []
    for host, addr in entries:
        out += [(host, addr), (f"{host}.{domain}", addr)]
    return out


def install(req: Request) -> dict[str, Any]:
    host, address, port, domain = _where(req)
    entries = _entries(req)
    if req.context.get("dry_run"):
        return {"ok": True, "details": {"dry_run": True, "names": len(entries)}}
    hosts = "".join(f"{addr} {name} {name}.{domain}\n" for name, addr in entries)
    spec = f"{address}:{port}/{domain}"
    out = req.exec(
        ["sh", "-c", _PREPARE_SH, "sh", spec, hosts, str(STOP_WAIT_S)], timeout_s=STOP_WAIT_S + 20
    )
    state = parse_kv(out.check(f"writing etc/dns.hosts on {host}").stdout)
    root = state.get("root", "")
    if not root.startswith("/"):  # every path below is under it: never guess
        raise Failure(f"the server's folder is unknown (pwd answered {root!r})")
    started = state.get("state") != "running"
    if started:
        req.progress(f"dnsmasq: starting dnsmasq on {host} at {address}:{port} ({domain})")
        argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={root}/etc/dns.hosts",
            f"--listen-address={address}",
            "--bind-interfaces",
            "--port", str(port),
            f"--pid-file={root}/run/dnsmasq.pid",
            "--user=root",
            f"--local=/{domain}/",
            f"--log-facility={root}/log/dnsmasq.log",
        ]  # fmt: skip
        req.exec(
            ["sh", "-c", 'exec "$@" >>log/dnsmasq.out 2>&1', "sh", *argv], background=True
        ).check(f"starting dnsmasq on {host}")
    elif state.get("reloaded"):
        req.progress(f"dnsmasq: etc/dns.hosts changed on {host}; reloaded (pid {state.get('pid')})")
    names = _names(entries, domain)
    try:
        wait_until(
            f"dnsmasq answering on {address}:{port}",
            lambda: not resolves_to(address, port, names),
            timeout_s=START_WAIT_S,
        )
    except Failure:
        problems = "; ".join(resolves_to(address, port, names))
        tail = req.exec(["sh", "-c", _LOG_TAIL_SH], timeout_s=15).stdout.strip()
        raise Failure(
            f"dnsmasq on {host} did not resolve every name on {address}:{port} within "
            f"{START_WAIT_S:g} s ({problems}); its log ends:\n{tail or '(empty)'}"
        ) from None
    return {
        "ok": True,
        "details": {
            "address": address,
            "port": port,
            "domain": domain,
            "names": len(entries),
            "started": started,
            "reloaded": state.get("reloaded") == "1",
            "root": root,
        },
    }


def check(req: Request) -> dict[str, Any]:
    host, address, port, domain = _where(req)
    names = _names(_entries(req), domain)
    problems = resolves_to(address, port, names)
    if problems:
        raise Failure(f"dnsmasq on {host} ({address}:{port}): {'; '.join(problems)}")
    return {
        "ok": True,
        "details": {"address": address, "port": port, "resolved": [n for n, _ in names]},
    }


def _answers(address: str, port: int) -> bool:
    try:
        dns_query_a(address, port, "prvng-probe.invalid", timeout_s=0.3, tries=1)
    except (OSError, ValueError):
        return False
    return True


def remove(req: Request) -> dict[str, Any]:
    host, address, port, _ = _where(req)
    if req.context.get("dry_run"):
        return {"ok": True, "details": {"dry_run": True}}
    req.progress(f"dnsmasq: stopping dnsmasq on {host} and deleting etc/dns.hosts")
    out = req.exec(["sh", "-c", _REMOVE_SH, "sh", str(STOP_WAIT_S)], timeout_s=STOP_WAIT_S + 20)
    state = parse_kv(out.check(f"stopping dnsmasq on {host}").stdout)
    try:
        wait_until(
            f"{address}:{port} silent",
            lambda: not _answers(address, port),
            timeout_s=STOP_WAIT_S,
        )
    except Failure:
        raise Failure(
            f"dnsmasq on {host}: something still answers DNS on {address}:{port} after stopping"
        ) from None
    return {"ok": True, "details": {"stopped": state.get("stopped"), "root": state.get("root")}}


if __name__ == "__main__":
    run({"install": install, "remove": remove, "check": check})
