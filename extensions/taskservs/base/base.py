#!/usr/bin/env python3
"""Task service ``base``: what every other task service expects of a server.

* ``install``: the layout ``etc srv log run`` in the server's folder (the provider's ``exec``
  runs there), loopback up, and ``etc/hosts`` naming every server of ``context.inventory``;
* ``check``: the server runs a command, the layout is there and loopback is up;
* ``remove``: ``etc/hosts`` and the layout folders that are empty (what other task services
  left, such as logs, stays).
"""

from __future__ import annotations

from typing import Any

from provisioning.workspace.sdk import Failure, Request, run
from provisioning.workspace.sdk_net import inventory, parse_kv

LAYOUT = ("etc", "srv", "log", "run")

# Brings loopback up only when it is down: in a network namespace that is the server's own; on
# a host it is always up already, so nothing of the host is touched.
_LOOPBACK_SH = r"""
lo=unknown
if command -v ip >/dev/null 2>&1; then
  if ip -o link show dev lo 2>/dev/null | grep -q '[<,]UP[,>]'; then
    lo=up
  elif [ "$want_up" = 1 ] && ip link set dev lo up 2>/dev/null; then
    lo=up
  else
    lo=down
  fi
fi
echo "loopback=$lo"
"""

_INSTALL_SH = (
    r"""
set -e
mkdir -p etc srv log run
printf '%s' "$1" > etc/hosts.new
mv -f etc/hosts.new etc/hosts
echo "root=$(pwd)"
want_up=1
"""
    + _LOOPBACK_SH
)

_CHECK_SH = (
    r"""
missing=""
for d in etc srv log run; do [ -d "$d" ] || missing="$missing $d"; done
[ -f etc/hosts ] || missing="$missing etc/hosts"
echo "missing=$missing"
echo "root=$(pwd)"
if [ -f etc/hosts ] && [ "$(cat etc/hosts)" = "$(printf '%s' "$1")" ]; then
  echo "hosts_current=1"
fi
want_up=0
"""
    + _LOOPBACK_SH
)

_REMOVE_SH = r"""
rm -f etc/hosts etc/hosts.new
for d in etc srv log run; do
  if [ -d "$d" ] && rmdir "$d" 2>/dev/null; then echo "removed_$d=1"; fi
done
echo "root=$(pwd)"
"""


def hosts_file(req: Request) -> str:
    """``etc/hosts``: loopback, then each server of the inventory (this one included)."""
    lines = ["127.0.0.1\tlocalhost"]
    entries = inventory(req.context)
    me = req.server
    if me.get("address") and me.get("hostname") not in {h for h, _ in entries}:
        entries.append((str(me["hostname"]), str(me["address"])))
    lines += [f"{addr}\t{host}" for host, addr in entries]
    return "\n".join(lines) + "\n"


def _script(req: Request, script: str, *args: str, what: str) -> dict[str, str]:
    out = req.exec(["sh", "-c", script, "sh", *args], timeout_s=30)
    out.check(f"{what} on {req.server.get('hostname')}")
    return parse_kv(out.stdout)


def install(req: Request) -> dict[str, Any]:
    host = req.server.get("hostname")
    if req.context.get("dry_run"):
        return {"ok": True, "details": {"dry_run": True, "layout": list(LAYOUT)}}
    req.progress(f"base: preparing {host}: layout {' '.join(LAYOUT)}, loopback, etc/hosts")
    hosts = hosts_file(req)
    state = _script(req, _INSTALL_SH, hosts, what="preparing the layout")
    if state.get("loopback") == "down":
        raise Failure(f"base: loopback of {host} is down and could not be brought up")
    return {
        "ok": True,
        "details": {
            "root": state.get("root"),
            "layout": list(LAYOUT),
            "loopback": state.get("loopback"),
            "hosts": hosts.count("\n") - 1,
        },
    }


def check(req: Request) -> dict[str, Any]:
    host = req.server.get("hostname")
    state = _script(req, _CHECK_SH, hosts_file(req), what="checking the layout")
    missing = state.get("missing", "").split()
    if missing:
        raise Failure(f"base: {host} lacks {', '.join(missing)} in its folder: install base")
    if state.get("loopback") == "down":
        raise Failure(f"base: loopback of {host} is down")
    return {
        "ok": True,
        "details": {
            "root": state.get("root"),
            "layout": list(LAYOUT),
            "loopback": state.get("loopback"),
            "hosts_current": state.get("hosts_current") == "1",
        },
    }


def remove(req: Request) -> dict[str, Any]:
    if req.context.get("dry_run"):
        return {"ok": True, "details": {"dry_run": True}}
    req.progress(
        f"base: removing etc/hosts and the empty layout folders of {req.server.get('hostname')}"
    )
    state = _script(req, _REMOVE_SH, what="removing the layout")
    removed = [d for d in LAYOUT if state.get(f"removed_{d}") == "1"]
    return {"ok": True, "details": {"root": state.get("root"), "removed": removed}}


if __name__ == "__main__":
    run({"install": install, "remove": remove, "check": check})
