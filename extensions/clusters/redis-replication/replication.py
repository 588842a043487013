#!/usr/bin/env python3
"""Cluster ``redis-replication``: one primary, replicas following it (RESP over TCP from here).

Members: exactly one ``primary`` and one or more ``replica``, each a server running the ``redis``
task service. Settings: ``port`` (6379, the port of every member).

* ``create``: the primary replicates nobody (``REPLICAOF NO ONE`` if it did), each replica
  ``REPLICAOF <primary address> <port>``, then waits until each reports
  ``master_link_status:up``;
* ``check``: the primary reports ``connected_slaves:<replicas>``, a unique key written on the
  primary is read on every replica, and every replica refuses a write;
* ``delete``: ``REPLICAOF NO ONE`` on each replica (one that does not run is left alone).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from functools import partial
from typing import Any

from provisioning.workspace.sdk import Failure, Request, run, wait_until
from provisioning.workspace.sdk_net import (
    RespError,
    RespValue,
    address_of,
    info_fields,
    port_setting,
    resp_command,
)

DEFAULT_PORT = 6379
LINK_WAIT_S = 20.0
CHECK_WAIT_S = 5.0


@dataclass(frozen=True)
class Member:
    hostname: str
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.hostname} ({self.address}:{self.port})"

    def command(self, *args: str | int) -> RespValue:
        """One command.

        Raises:
            Failure: it does not answer, or answers with an error.
        """
        try:
            return resp_command(self.address, self.port, *args, timeout_s=3.0)
        except RespError as exc:
            raise Failure(f"redis on {self} refused {args[0]}: {exc}") from None
        except OSError as exc:
            raise Failure(
                f"redis on {self} does not answer: {exc.strerror or repr(exc)} "
                "(install the redis task service on it)"
            ) from None

    def replication(self) -> dict[str, str]:
        return info_fields(self.command("INFO", "replication"))


def members(req: Request) -> tuple[Member, list[Member]]:
    """The primary and the replicas.

    Raises:
        Failure: not exactly one primary, no replica, a role that is not known, or a member
            without an address.
    """
    port = port_setting(req.settings, DEFAULT_PORT)
    name = req.target.get("name", "?")
    raw = req.target.get("members")
    if not isinstance(raw, list):
        raise Failure(f"cluster {name}: the request's target has no members")
    primaries: list[Member] = []
    replicas: list[Member] = []
    for entry in raw:
        role = entry.get("role") if isinstance(entry, dict) else None
        server = entry.get("server") if isinstance(entry, dict) else None
        if not isinstance(server, dict):
            raise Failure(f"cluster {name}: a member has no server")
        member = Member(str(server.get("hostname")), address_of(server), port)
        if role == "primary":
            primaries.append(member)
        elif role == "replica":
            replicas.append(member)
        else:
            raise Failure(
                f"cluster {name}: member {member.hostname} has role {role!r}; "
                "roles are primary and replica"
            )
    if len(primaries) != 1 or not replicas:
        raise Failure(
            f"cluster {name}: needs exactly one primary and at least one replica, got "
            f"{len(primaries)} primary and {len(replicas)} replicas"
        )
    return primaries[0], replicas


def _linked(replica: Member, primary: Member) -> bool:
    info = replica.replication()
    return (
        info.get("role") == "slave"
        and info.get("master_host") == primary.address
        and info.get("master_port") == str(primary.port)
        and info.get("master_link_status") == "up"
    )


def _holds(replica: Member, key: str, value: str) -> bool:
    return replica.command("GET", key) == value


def create(req: Request) -> dict[str, Any]:
    primary, replicas = members(req)
    if req.context.get("dry_run"):
        return {"ok": True, "details": {"dry_run": True, "replicas": len(replicas)}}
    if primary.replication().get("role") != "master":
        req.progress(f"redis-replication: {primary} replicated another; REPLICAOF NO ONE")
        primary.command("REPLICAOF", "NO", "ONE")
    for replica in replicas:
        req.progress(f"redis-replication: {replica} REPLICAOF {primary.address} {primary.port}")
        replica.command("REPLICAOF", primary.address, primary.port)
    for replica in replicas:
        try:
            wait_until(
                f"{replica} linked", partial(_linked, replica, primary), timeout_s=LINK_WAIT_S
            )
        except Failure:
            info = replica.replication()
            raise Failure(
                f"replica {replica} did not report master_link_status:up with {primary} within "
                f"{LINK_WAIT_S:g} s (master_link_status:{info.get('master_link_status', '?')}); "
                "can it reach the primary's address?"
            ) from None
    return {
        "ok": True,
        "details": {
            "primary": primary.hostname,
            "replicas": [r.hostname for r in replicas],
            "port": primary.port,
        },
    }


def check(req: Request) -> dict[str, Any]:
    primary, replicas = members(req)
    want = len(replicas)
    try:
        wait_until(
            f"{primary} with {want} replicas",
            lambda: primary.replication().get("connected_slaves") == str(want),
            timeout_s=CHECK_WAIT_S,
        )
    except Failure:
        info = primary.replication()
        raise Failure(
            f"primary {primary} reports role:{info.get('role', '?')} "
            f"connected_slaves:{info.get('connected_slaves', '?')}, expected {want}"
        ) from None
    key, value = f"prvng:replication-check:{secrets.token_hex(8)}", secrets.token_hex(8)
    primary.command("SET", key, value, "EX", 120)
    try:
        for replica in replicas:
            try:
                wait_until(
                    f"{key} on {replica}",
                    partial(_holds, replica, key, value),
                    timeout_s=CHECK_WAIT_S,
                )
            except Failure:
                raise Failure(
                    f"replica {replica} did not get a key written on primary {primary} within "
                    f"{CHECK_WAIT_S:g} s"
                ) from None
            try:
                resp_command(replica.address, replica.port, "SET", key, "write", timeout_s=3.0)
            except RespError:
                continue  # READONLY: as it must
            except OSError as exc:
                raise Failure(f"redis on {replica} does not answer: {exc!r}") from None
            raise Failure(f"replica {replica} accepted a write: it must refuse them")
    finally:
        try:
            primary.command("DEL", key)
        except Failure:
            pass
    return {
        "ok": True,
        "details": {
            "primary": primary.hostname,
            "connected_slaves": want,
            "replicas": [r.hostname for r in replicas],
        },
    }


def delete(req: Request) -> dict[str, Any]:
    _, replicas = members(req)
    if req.context.get("dry_run"):
        return {"ok": True, "details": {"dry_run": True}}
    detached: list[str] = []
    absent: list[str] = []
    for replica in replicas:
        try:
            resp_command(replica.address, replica.port, "REPLICAOF", "NO", "ONE", timeout_s=3.0)
        except OSError:
            req.progress(f"redis-replication: {replica} does not answer; nothing to detach")
            absent.append(replica.hostname)
            continue
        except RespError as exc:
            raise Failure(f"redis on {replica} refused REPLICAOF NO ONE: {exc}") from None
        req.progress(f"redis-replication: {replica} REPLICAOF NO ONE")
        detached.append(replica.hostname)
    return {"ok": True, "details": {"detached": detached, "not_running": absent}}


if __name__ == "__main__":
    run({"create": create, "delete": delete, "check": check})
