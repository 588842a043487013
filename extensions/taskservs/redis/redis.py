#!/usr/bin/env python3
"""Task service ``redis``: Debian's ``redis-server`` on the server's address.

Settings: ``port`` (6379). Everything it writes is in the server's folder: data in
``srv/redis``, ``run/redis.pid``, ``log/redis.log`` (and the process's own output in
``log/redis.out``); no snapshot, no append-only file.

* ``install`` starts it in the background unless it already runs with the same address and port
  (a stale pid file, or other settings, means stop and start again), then waits for ``PONG``;
* ``check`` speaks RESP to ``address:port`` from here: ``PING``, then a ``SET``/``GET`` round
  trip of a unique key (a ``GET`` on a replica, which refuses writes);
* ``remove`` stops it (TERM, then KILL after 10 s) and deletes ``srv/redis``.
"""

from __future__ import annotations

import secrets
from typing import Any

from provisioning.workspace.sdk import Failure, Request, run, wait_until
from provisioning.workspace.sdk_net import (
    DAEMON_SH,
    RespClient,
    RespError,
    address_of,
    info_fields,
    parse_kv,
    port_open,
    port_setting,
    resp_command,
)

DEFAULT_PORT = 6379
START_WAIT_S = 15.0
STOP_WAIT_S = 10

_PREPARE_SH = (
    DAEMON_SH
    + r"""
mkdir -p srv/redis run log || exit 1
echo "root=$(pwd)"
if pid=$(pid_of run/redis.pid redis-server) && [ "$(cat run/redis.spec 2>/dev/null)" = "$1" ]; then
  echo "state=running"
  echo "pid=$pid"
else
  stop run/redis.pid redis-server "$2"
  printf '%s' "$1" > run/redis.spec
  echo "state=stopped"
fi
"""
)

_REMOVE_SH = (
    DAEMON_SH
    + r"""
stop run/redis.pid redis-server "$1"
rm -rf srv/redis run/redis.spec
echo "root=$(pwd)"
"""
)

_LOG_TAIL_SH = "tail -n 5 log/redis.log log/redis.out 2>/dev/null"


def _where(req: Request) -> tuple[str, str, int]:
    return (
        str(req.server.get("hostname")),
        address_of(req.server),
        port_setting(req.settings, DEFAULT_PORT),
    )


def _script(req: Request, script: str, *args: str, what: str) -> dict[str, str]:
    out = req.exec(["sh", "-c", script, "sh", *args], timeout_s=STOP_WAIT_S + 20)
    out.check(f"{what} on {req.server.get('hostname')}")
    return parse_kv(out.stdout)


def _pong(address: str, port: int) -> bool:
    return resp_command(address, port, "PING", timeout_s=1.0) == "PONG"


def install(req: Request) -> dict[str, Any]:
    host, address, port = _where(req)
    if req.context.get("dry_run"):
        return {"ok": True, "details": {"dry_run": True, "address": address, "port": port}}
    state = _script(req, _PREPARE_SH, f"{address}:{port}", str(STOP_WAIT_S), what="preparing redis")
    root = state.get("root", "")
    if not root.startswith("/"):  # every path below is under it: never guess
        raise Failure(f"the server's folder is unknown (pwd answered {root!r})")
    started = state.get("state") != "running"
    if started:
        req.progress(f"redis: starting redis-server on {host} at {address}:{port}")
        argv = [
            "redis-server",
            "--bind", address,
            "--port", str(port),
            "--dir", f"{root}/srv/redis",
            "--pidfile", f"{root}/run/redis.pid",
            "--logfile", f"{root}/log/redis.log",
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--daemonize", "no",
        ]  # fmt: skip
        # Absolute paths: redis-server changes into --dir before it writes the pid file and log.
        req.exec(
            ["sh", "-c", 'exec "$@" >>log/redis.out 2>&1', "sh", *argv], background=True
        ).check(f"starting redis-server on {host}")
    else:
        req.progress(f"redis: already running on {host} (pid {state.get('pid')})")
    try:
        wait_until(
            f"redis-server answering PING on {address}:{port}",
            lambda: _pong(address, port),
            timeout_s=START_WAIT_S,
        )
    except Failure:
        tail = req.exec(["sh", "-c", _LOG_TAIL_SH], timeout_s=15).stdout.strip()
        raise Failure(
            f"redis-server on {host} did not answer PING on {address}:{port} within "
            f"{START_WAIT_S:g} s; its log ends:\n{tail or '(empty)'}"
        ) from None
    return {
        "ok": True,
        "details": {"address": address, "port": port, "started": started, "root": root},
    }


def check(req: Request) -> dict[str, Any]:
    host, address, port = _where(req)
    where = f"redis on {host} ({address}:{port})"
    try:
        with RespClient(address, port, timeout_s=3.0) as redis:
            pong = redis.command("PING")
            if pong != "PONG":
                raise Failure(f"{where} answered PING with {pong!r}, not PONG")
            role = info_fields(redis.command("INFO", "replication")).get("role", "?")
            key = f"prvng:check:{secrets.token_hex(8)}"
            if role == "slave":  # a replica refuses writes: a read round trip proves it serves
                if redis.command("GET", key) is not None:
                    raise Failure(f"{where} answered GET of a key that does not exist")
                round_trip = "GET"
            else:
                value = secrets.token_hex(8)
                if redis.command("SET", key, value, "EX", 60) != "OK":
                    raise Failure(f"{where} did not accept SET")
                got = redis.command("GET", key)
                redis.command("DEL", key)
                if got != value:
                    raise Failure(f"{where} answered GET with {got!r} after SET {value!r}")
                round_trip = "SET/GET"
    except RespError as exc:
        raise Failure(f"{where} answered with an error: {exc}") from None
    except OSError as exc:
        raise Failure(f"{where} does not answer: {exc.strerror or repr(exc)}") from None
    return {
        "ok": True,
        "details": {"address": address, "port": port, "role": role, "round_trip": round_trip},
    }


def remove(req: Request) -> dict[str, Any]:
    host, address, port = _where(req)
    if req.context.get("dry_run"):
        return {"ok": True, "details": {"dry_run": True}}
    req.progress(f"redis: stopping redis-server on {host} and deleting srv/redis")
    state = _script(req, _REMOVE_SH, str(STOP_WAIT_S), what="stopping redis-server")
    if port_open(address, port):
        # Its pid file is gone but it still serves (removed by hand?): ask it to stop.
        req.progress(f"redis: {address}:{port} still answers; sending SHUTDOWN NOSAVE")
        try:
            resp_command(address, port, "SHUTDOWN", "NOSAVE", timeout_s=2.0)
        except (OSError, RespError):
            pass  # the connection closes as it stops
    try:
        wait_until(
            f"{address}:{port} closed",
            lambda: not port_open(address, port, 0.5),
            timeout_s=STOP_WAIT_S,
        )
    except Failure:
        raise Failure(
            f"redis on {host}: something still listens on {address}:{port} after stopping"
        ) from None
    return {
        "ok": True,
        "details": {"stopped": state.get("stopped"), "root": state.get("root")},
    }


if __name__ == "__main__":
    run({"install": install, "remove": remove, "check": check})
