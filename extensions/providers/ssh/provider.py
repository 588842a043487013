#!/usr/bin/env python3
"""Built-in provider ``ssh``: existing hosts reached over SSH with asyncssh.

``create`` connects (key authentication, the host key checked against ``known_hosts``), runs
``uname -n`` to verify the host, and registers it in
``<runtime_dir>/servers/<hostname>/server.json``;
``status`` is ``running`` (registered and reachable), ``stopped`` (registered, unreachable) or
``absent``; ``list`` answers the registered servers; ``delete`` unregisters (the host itself is
never touched); ``exec`` runs a command on a registered host (a program that is not there is an
error, its non-zero exit an answer). Settings: see ``ssh_settings.py``; the
protocol: ``docs/reference/extensions.md``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from ssh_registry import Registry
from ssh_settings import Conn, check_hostname, conn_from

from provisioning.workspace.sdk import Failure, Request, run

_VERIFY_TIMEOUT_S = 30.0
_LIST_CONCURRENCY = 16  # servers probed at once by list
# ssh_client (asyncssh: half a second to import) is imported only by the operations that connect,
# so delete, and status/list of what is not registered, answer at once.


def _registry(req: Request) -> Registry:
    return Registry(req.context.get("runtime_dir"))


def _conn(req: Request, server: Mapping[str, Any], record: Mapping[str, Any] | None) -> Conn:
    return conn_from(server, req.settings, record=record, workspace=req.context.get("workspace"))


def _state(hostname: str, status: str, conn: Conn | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "hostname": hostname,
        "provider_id": conn.provider_id if conn else None,
        "address": conn.host if conn else None,
        "status": status,
        **extra,
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------- operations


def create(req: Request) -> dict[str, Any]:
    hostname = check_hostname(req.server)
    registry = _registry(req)
    record = registry.read(hostname, foreign_ok=False)
    conn = _conn(req, req.server, record)
    dry_run = bool(req.context.get("dry_run"))
    req.progress(f"ssh: connecting to {conn.where}")

    from ssh_client import SshFailure, connect, run_command

    async def verify() -> str:
        async with connect(conn) as ssh:
            out = await run_command(ssh, conn, ["uname", "-n"], timeout_s=_VERIFY_TIMEOUT_S)
        if out.exit_code != 0:
            raise SshFailure(
                f"ssh {conn.where}: verifying with `uname -n` failed (exit code "
                f"{out.exit_code}): {out.stderr.strip() or out.stdout.strip()}"
            )
        return out.stdout.strip()

    remote_name = asyncio.run(verify())
    req.progress(f"ssh: {conn.where} answers as {remote_name!r}")
    if dry_run:
        return {"server": _state(hostname, "running", conn, dry_run=True, registered=False)}
    path = registry.write(
        hostname,
        {
            "hostname": hostname,
            "provider_id": conn.provider_id,
            "address": conn.host,
            **conn.settings(),
            "remote_hostname": remote_name,
            "infra": req.context.get("infra"),
            "registered_at": (record or {}).get("registered_at") or _now(),
            "verified_at": _now(),
        },
    )
    req.progress(f"ssh: {hostname} {'re-' if record else ''}registered in {path}")
    return {"server": _state(hostname, "running", conn, remote_hostname=remote_name)}


async def _probe(conn: Conn) -> dict[str, Any]:
    """``running`` or ``stopped`` (with the reason) for a registered server.

    Raises:
        SshFailure: reached but not usable (host key, authentication): a setup problem, not a
            stopped server.
    """
    from ssh_client import SshFailure, connect

    try:
        async with connect(conn):
            pass
    except SshFailure as exc:
        if not exc.unreachable:
            raise
        return _state(conn.hostname, "stopped", conn, reason=str(exc))
    return _state(conn.hostname, "running", conn)


def status(req: Request) -> dict[str, Any]:
    hostname = check_hostname(req.server)
    record = _registry(req).read(hostname)
    if record is None:
        return {"server": _state(hostname, "absent")}
    conn = _conn(req, req.server, record)
    return {"server": asyncio.run(_probe(conn))}


def list_servers(req: Request) -> dict[str, Any]:
    records, problems = _registry(req).all()
    for problem in problems:
        req.progress(f"ssh: skipped: {problem}")
    declared = {
        s.get("hostname"): s for s in req.target.get("servers") or [] if isinstance(s, Mapping)
    }

    async def one(record: dict[str, Any]) -> dict[str, Any]:
        hostname = str(record["hostname"])
        server = declared.get(hostname) or {"hostname": hostname}
        try:
            conn = _conn(req, server, record)
            return await _probe(conn)
        except Failure as exc:  # one bad host does not hide the others
            return {
                "hostname": hostname,
                "provider_id": record.get("provider_id"),
                "address": record.get("address"),
                "status": "stopped",
                "reason": str(exc),
            }

    async def every() -> list[dict[str, Any]]:
        gate = asyncio.Semaphore(_LIST_CONCURRENCY)

        async def gated(record: dict[str, Any]) -> dict[str, Any]:
            async with gate:
                return await one(record)

        return list(await asyncio.gather(*(gated(r) for r in records)))

    return {"servers": asyncio.run(every()) if records else []}


def delete(req: Request) -> dict[str, Any]:
    hostname = check_hostname(req.server)
    registry = _registry(req)
    if req.context.get("dry_run"):
        return {"deleted": registry.read(hostname) is not None, "dry_run": True}
    deleted = registry.remove(hostname)
    req.progress(
        f"ssh: {hostname} unregistered (the host itself is untouched)"
        if deleted
        else f"ssh: {hostname} was not registered; nothing to delete"
    )
    return {"deleted": deleted}


def exec_command(req: Request) -> dict[str, Any]:
    hostname = check_hostname(req.server)
    settings = req.settings
    argv = settings.get("command")
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str) for a in argv)
        or not argv[0]
    ):
        raise Failure(f"exec on {hostname}: settings.command must be a non-empty list of strings")
    input_text = settings.get("input")
    if input_text is not None and not isinstance(input_text, str):
        raise Failure(f"exec on {hostname}: settings.input must be a string")
    from ssh_client import check_env, connect, run_command, start_background

    env = check_env(settings.get("env"), hostname)
    # Commands run in the server's own folder (task services keep their files there), like
    # the local provider's: `workdir`, default ~/.prvng/servers/<hostname> on the host.
    workdir = settings.get("workdir") or f".prvng/servers/{hostname}"
    if not isinstance(workdir, str) or "\n" in workdir:
        raise Failure(f"exec on {hostname}: settings.workdir must be a path")
    env = {**env, "PRVNG_WORKDIR": workdir}
    timeout = settings.get("timeout_s")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        raise Failure(f"exec on {hostname}: settings.timeout_s must be a positive number")
    background = settings.get("background", False)
    if not isinstance(background, bool):
        raise Failure(f"exec on {hostname}: settings.background must be true or false")
    log = settings.get("log")
    if log is not None and (not isinstance(log, str) or not log):
        raise Failure(f"exec on {hostname}: settings.log must be a path on the server")
    if background and input_text:
        raise Failure(f"exec on {hostname}: settings.input cannot be used with background")
    record = _registry(req).read(hostname)
    if record is None:
        raise Failure(
            f"exec on {hostname}: the ssh provider has not registered {hostname}; create it first"
        )
    conn = _conn(req, req.server, record)
    limit = float(timeout) if timeout is not None else None

    async def go() -> dict[str, Any]:
        async with connect(conn) as ssh:
            if background:
                pid, log_path = await start_background(
                    ssh, conn, argv, env=env, log=log, timeout_s=limit
                )
                return {"exit_code": 0, "stdout": "", "stderr": "", "pid": pid, "log": log_path}
            done = await run_command(ssh, conn, argv, input=input_text, env=env, timeout_s=limit)
            answer: dict[str, Any] = {
                "exit_code": done.exit_code,
                "stdout": done.stdout,
                "stderr": done.stderr,
            }
            if done.signal:
                answer["signal"] = done.signal
            return answer

    return asyncio.run(go())


if __name__ == "__main__":
    run(
        {
            "create": create,
            "delete": delete,
            "status": status,
            "list": list_servers,
            "exec": exec_command,
        }
    )
