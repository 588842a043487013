"""``netns`` mode: a server is a Linux network namespace on a bridge the provider manages.

For server ``web-01`` of a workspace whose runtime folder hashes to ``1a2b3c4d``:

* namespace ``prvng-1a2b3c4d-web-01`` (also the ``provider_id``);
* a veth pair: ``pv<10 hex>`` on the host, enslaved to the bridge, and ``eth0`` inside the
  namespace with the server's address; ``lo`` up; default route via the bridge's address;
* the bridge (``prvng0`` by default) carries the subnet's first address, so the host reaches
  every server; it is created when absent (and then marked with the alias
  ``prvng-local bridge ...``), and deleted with the provider's last server on it.

Only what the records (and link aliases) say the provider made is ever changed or deleted.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from local_common import (
    ALIAS,
    Ctx,
    Record,
    Settings,
    all_pids,
    all_records,
    allocate,
    kill_processes,
    read_json,
    save_record,
    write_json,
)

from provisioning.workspace.sdk import Failure

#: Where iproute2 keeps named namespaces (its NETNS_RUN_DIR).
NETNS_DIR = Path("/var/run/netns")
IP_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------- ip


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``. Raises: Failure with the command and its stderr when it fails."""
    argv = ["ip", *args]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=IP_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise Failure("the `ip` command (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise Failure(f"`{' '.join(argv)}` did not finish within {IP_TIMEOUT_S:g} s") from None
    if check and done.returncode != 0:
        raise Failure(
            f"`{' '.join(argv)}` failed (exit code {done.returncode}): "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    return done


def _json(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    text = done.stdout.strip()
    if not text:
        return []
    data = json.loads(text)
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def link(name: str, netns: str | None = None) -> dict[str, Any] | None:
    """The link ``name`` (``ip -d -j link show``), or None when it does not exist."""
    where = ["-n", netns] if netns else []
    done = ip(*where, "-d", "-j", "link", "show", "dev", name, check=False)
    if done.returncode != 0:
        if "does not exist" in done.stderr or "Cannot find device" in done.stderr:
            return None
        raise Failure(f"`ip {' '.join(where)} link show dev {name}` failed: {done.stderr.strip()}")
    found = _json(done)
    return found[0] if found else None


def ipv4_addresses(name: str, netns: str | None = None) -> list[str]:
    """``address/prefix`` of every IPv4 address on link ``name``."""
    where = ["-n", netns] if netns else []
    done = ip(*where, "-j", "-4", "addr", "show", "dev", name, check=False)
    if done.returncode != 0:
        return []
    return [
        f"{a['local']}/{a['prefixlen']}"
        for entry in _json(done)
        for a in entry.get("addr_info", [])
        if "local" in a
    ]


def ns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _ns_identity(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _pid_netns(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:  # gone, or a zombie
        return None
    return (st.st_dev, st.st_ino)


# ---------------------------------------------------------------------- names and aliases


def veth_name(ctx: Ctx, host: str) -> str:
    return f"pv{ctx.short_hash(host)}"  # 12 characters: within IFNAMSIZ


def _veth_alias(ctx: Ctx, rec: Record) -> str:
    return f"{ALIAS} ws={ctx.ws_id} host={rec['hostname']} addr={rec['address']}"


def _bridge_alias(ctx: Ctx) -> str:
    return f"{ALIAS} bridge ws={ctx.ws_id}"


def _alias(info: dict[str, Any]) -> str:
    return str(info.get("ifalias") or "")


# ---------------------------------------------------------------------- the bridge


def _bridges_path(ctx: Ctx) -> Path:
    return ctx.provider_dir / "bridges.json"


def _bridges(ctx: Ctx) -> dict[str, dict[str, Any]]:
    data = read_json(_bridges_path(ctx)) or {}
    return {str(k): dict(v) for k, v in data.items() if isinstance(v, dict)}


def _save_bridges(ctx: Ctx, data: dict[str, dict[str, Any]]) -> None:
    write_json(_bridges_path(ctx), data)


def _provider_made(ctx: Ctx, name: str, info: dict[str, Any]) -> bool:
    """Whether this provider created bridge ``name``: its alias says so, or (alias not yet set:
    a crash right after creating it) this workspace's record does."""
    alias = _alias(info)
    if alias:
        return alias.startswith(f"{ALIAS} bridge")
    return bool(_bridges(ctx).get(name, {}).get("created_by_provider"))


def _check_overlap(bridge: str, subnet: ipaddress.IPv4Network) -> None:
    for entry in _json(ip("-j", "-4", "addr", "show")):
        if entry.get("ifname") == bridge:
            continue
        for a in entry.get("addr_info", []):
            if "local" not in a:
                continue
            net = ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
            if net.overlaps(subnet):
                raise Failure(
                    f"subnet {subnet} overlaps {a['local']}/{a['prefixlen']} on "
                    f"{entry.get('ifname')}; choose another `subnet` setting"
                )


def ensure_bridge(ctx: Ctx, name: str, subnet: ipaddress.IPv4Network) -> None:
    """The bridge exists, is up and carries the subnet's first address. Created (and recorded)
    when absent; a bridge the provider did not create is used but never changed."""
    gateway = f"{subnet.network_address + 1}/{subnet.prefixlen}"
    info = link(name)
    if info is None:
        _check_overlap(name, subnet)
        records = _bridges(ctx)
        records[name] = {"created_by_provider": True, "subnet": str(subnet)}
        _save_bridges(ctx, records)  # before creating it: a crash leaves it known as ours
        ctx.progress(f"creating bridge {name} with {gateway}")
        ip("link", "add", "name", name, "type", "bridge")
        ip("link", "set", "dev", name, "alias", _bridge_alias(ctx))
        info = link(name)
        if info is None:
            raise Failure(f"bridge {name} vanished right after it was created")
    kind = info.get("linkinfo", {}).get("info_kind")
    if kind != "bridge":
        raise Failure(f"link {name} exists and is not a bridge ({kind}); choose another `bridge`")
    ours = _provider_made(ctx, name, info)
    if ours and not _alias(info):
        ip("link", "set", "dev", name, "alias", _bridge_alias(ctx))
    if gateway not in ipv4_addresses(name):
        if not ours:
            raise Failure(
                f"bridge {name} exists, was not created by this provider and does not carry "
                f"{gateway}; add it yourself or choose another `bridge` or `subnet`"
            )
        _check_overlap(name, subnet)
        ip("addr", "add", gateway, "dev", name)
    if "UP" not in info.get("flags", []):
        if not ours:
            raise Failure(f"bridge {name} is down and was not created by this provider")
        ip("link", "set", "dev", name, "up")
    records = _bridges(ctx)
    if name not in records or records[name].get("created_by_provider") != ours:
        records[name] = {"created_by_provider": ours, "subnet": str(subnet)}
        _save_bridges(ctx, records)


def remove_bridge_if_unused(ctx: Ctx, name: str) -> None:
    """Delete the bridge when the provider created it and no server uses it any more (none of
    this workspace's records, no port of any workspace)."""
    if any(r.get("mode") == "netns" and r.get("bridge") == name for r in all_records(ctx)):
        return
    records = _bridges(ctx)
    info = link(name)
    if info is not None and _provider_made(ctx, name, info):
        ports = [str(p.get("ifname")) for p in _json(ip("-j", "link", "show", "master", name))]
        if ports:
            ctx.progress(f"keeping bridge {name}: other servers use it ({', '.join(ports)})")
            return
        ctx.progress(f"deleting bridge {name}")
        ip("link", "del", "dev", name)
    if records.pop(name, None) is not None:
        _save_bridges(ctx, records)


def _addresses_in_use(bridge: str) -> set[str]:
    """Addresses other servers on this bridge hold (any workspace: from the aliases of its
    ports) and every address of the host."""
    taken: set[str] = set()
    for port in _json(ip("-d", "-j", "link", "show", "master", bridge, check=False)):
        for word in _alias(port).split():
            if word.startswith("addr="):
                taken.add(word[5:])
    for entry in _json(ip("-j", "-4", "addr", "show")):
        for a in entry.get("addr_info", []):
            if "local" in a:
                taken.add(str(a["local"]))
    return taken


def _candidates(subnet: ipaddress.IPv4Network) -> Iterator[str]:
    gateway = subnet.network_address + 1
    for address in subnet.hosts():
        if address != gateway:
            yield str(address)


# ---------------------------------------------------------------------- the mode


class NetnsMode:
    name = "netns"

    def available(self) -> bool:
        return os.geteuid() == 0 and shutil.which("ip") is not None

    def create(self, ctx: Ctx, host: str, settings: Settings, rec: Record | None) -> Record:
        if not self.available():
            raise Failure("mode netns needs root and the `ip` command (iproute2)")
        if rec is None:
            rec = self._new_record(ctx, host, settings)
        elif rec.get("state") == "ready" and self._healthy(rec):
            if rec.get("bridge") != settings.bridge or rec.get("subnet") != str(settings.subnet):
                ctx.progress(
                    f"{host} exists on bridge {rec.get('bridge')} ({rec.get('subnet')}); "
                    "settings changed since: delete and create it to apply them"
                )
            return rec
        else:
            why = "damaged" if rec.get("state") == "ready" else f"half-made ({rec.get('state')})"
            ctx.progress(f"{host}: repairing the server: it is {why}")
            rec["state"] = "creating"
            save_record(ctx, rec)
        self._build(ctx, rec)
        rec["state"] = "ready"
        save_record(ctx, rec)
        return rec

    def _new_record(self, ctx: Ctx, host: str, settings: Settings) -> Record:
        ns = ctx.provider_id(host)
        veth = veth_name(ctx, host)
        if ns_exists(ns):
            raise Failure(
                f"network namespace {ns} exists but this workspace has no record of it (was "
                f"{ctx.runtime_dir} removed?); not touching it: if it is stale, remove it with "
                f"`ip netns delete {ns}`"
            )
        stray = link(veth)
        if stray is not None:
            raise Failure(
                f"link {veth} exists but this workspace has no record of it "
                f"(alias {_alias(stray)!r}); not touching it: if it is stale, remove it with "
                f"`ip link delete {veth}`"
            )
        subnet = settings.subnet
        address = allocate(
            ctx,
            f"netns:{settings.bridge}",
            host,
            _candidates(subnet),
            _addresses_in_use(settings.bridge),
            f"subnet {subnet} on bridge {settings.bridge}",
        )
        rec: Record = {
            "hostname": host,
            "provider_id": ns,
            "mode": "netns",
            "address": address,
            "prefixlen": subnet.prefixlen,
            "gateway": str(subnet.network_address + 1),
            "subnet": str(subnet),
            "bridge": settings.bridge,
            "namespace": ns,
            "veth": veth,
            "state": "creating",
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        save_record(ctx, rec)  # before anything is made: a crash leaves it known as ours
        return rec

    def _build(self, ctx: Ctx, rec: Record) -> None:
        """Every step is idempotent, so this both creates and repairs."""
        ns, veth, bridge = str(rec["namespace"]), str(rec["veth"]), str(rec["bridge"])
        ensure_bridge(ctx, bridge, ipaddress.IPv4Network(str(rec["subnet"])))
        if not ns_exists(ns):
            ctx.progress(f"creating network namespace {ns}")
            ip("netns", "add", ns)
        host_end = link(veth)
        inner = link("eth0", ns)
        if host_end is not None and inner is None:  # a broken pair: make it again
            ip("link", "del", "dev", veth)
            host_end = None
        if host_end is None:
            if inner is not None:
                ip("-n", ns, "link", "del", "dev", "eth0")
            ctx.progress(f"creating veth {veth} <-> {ns}:eth0 on {bridge}")
            ip("link", "add", "name", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", "dev", veth, "alias", _veth_alias(ctx, rec))
        ip("link", "set", "dev", veth, "master", bridge, "up")
        ip("-n", ns, "link", "set", "dev", "lo", "up")
        ip("-n", ns, "addr", "replace", f"{rec['address']}/{rec['prefixlen']}", "dev", "eth0")
        ip("-n", ns, "link", "set", "dev", "eth0", "up")
        ip("-n", ns, "route", "replace", "default", "via", str(rec["gateway"]))

    def _healthy(self, rec: Record) -> bool:
        ns, veth, bridge = str(rec["namespace"]), str(rec["veth"]), str(rec["bridge"])
        if not ns_exists(ns):
            return False
        host_end = link(veth)
        if host_end is None or host_end.get("master") != bridge:
            return False
        if "UP" not in host_end.get("flags", []):
            return False
        if f"{rec['address']}/{rec['prefixlen']}" not in ipv4_addresses("eth0", ns):
            return False
        gateway = f"{rec['gateway']}/{rec['prefixlen']}"
        return gateway in ipv4_addresses(bridge)

    def status(self, ctx: Ctx, rec: Record) -> str:
        ready = rec.get("state") == "ready" and ns_exists(str(rec["namespace"]))
        return "running" if ready else "stopped"

    def teardown(self, ctx: Ctx, rec: Record) -> None:
        ns, veth = str(rec["namespace"]), str(rec["veth"])
        identity = _ns_identity(ns)
        if identity is not None:

            def scan() -> list[int]:
                return [p for p in all_pids() if _pid_netns(p) == identity]

            n = kill_processes(scan, lambda p: _pid_netns(p) == identity, f"namespace {ns}")
            if n:
                ctx.progress(f"killed {n} process(es) in {ns}")
        host_end = link(veth)
        if host_end is not None:
            alias = _alias(host_end)
            if alias and alias != _veth_alias(ctx, rec):
                raise Failure(
                    f"link {veth} carries alias {alias!r}, not this server's; not deleting it"
                )
            ip("link", "del", "dev", veth)
        if ns_exists(ns):
            ctx.progress(f"deleting network namespace {ns}")
            ip("netns", "del", ns)

    def after_removal(self, ctx: Ctx, rec: Record) -> None:
        remove_bridge_if_unused(ctx, str(rec["bridge"]))

    def exec_target(self, ctx: Ctx, rec: Record) -> tuple[list[str], Path]:
        ns = str(rec["namespace"])
        if not ns_exists(ns):
            raise Failure(
                f"server {rec['hostname']} is not running: namespace {ns} is missing "
                "(`create` repairs it)"
            )
        return ["ip", "netns", "exec", ns], ctx.server_dir(str(rec["hostname"]))


NETNS = NetnsMode()
