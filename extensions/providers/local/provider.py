#!/usr/bin/env python3
"""The built-in ``local`` provider: a server is an isolated host on this machine.

* ``netns`` mode (as root with ``ip``): a Linux network namespace with its own address on a
  bridge the provider manages; ``exec`` runs ``ip netns exec <ns> ...`` (``local_netns.py``).
* ``sandbox`` mode (otherwise): a folder under ``runtime/servers/<host>`` and the processes
  started in it, each marked in its environment (``local_sandbox.py``).

Settings (all optional): ``mode`` = ``auto`` (netns when root and ``ip`` exists, else sandbox) |
``netns`` | ``sandbox``; ``bridge`` (default ``prvng0``); ``subnet`` (default ``10.209.0.0/24``:
the bridge gets ``.1``, servers ``.2`` upward).

Operations answer as ``docs/reference/extensions.md`` says. ``create`` is idempotent per
hostname (and repairs a half-made server); ``delete`` kills everything started on the server and
removes everything the provider made for it (the bridge too, with its last server) and answers
``{"deleted": false}`` when there was nothing. State lives under the workspace's runtime folder
(see ``local_common.py``); ``create`` and ``delete`` hold a lock there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from local_common import (
    MARKER,
    Ctx,
    Mode,
    Record,
    Settings,
    all_records,
    check_hostname,
    execute,
    load_record,
    parse_exec,
    parse_settings,
    release,
    remove_tree,
    save_record,
    workspace_lock,
)
from local_netns import NETNS, ns_exists
from local_sandbox import SANDBOX, kill_marked

from provisioning.workspace.sdk import Failure, Request, run

MODES: dict[str, Mode] = {"netns": NETNS, "sandbox": SANDBOX}


def _mode_of(rec: Record) -> Mode:
    mode = MODES.get(str(rec.get("mode")))
    if mode is None:
        raise Failure(f"server {rec.get('hostname')}: unknown mode {rec.get('mode')!r} on record")
    return mode


def _choose(settings: Settings, rec: Record | None) -> Mode:
    """The record's mode for an existing server; else the setting (``auto``: netns if it can)."""
    if rec is not None:
        mode = _mode_of(rec)
        if settings.mode not in ("auto", mode.name):
            raise Failure(
                f"server {rec['hostname']} exists in {mode.name} mode, not {settings.mode}: "
                "delete it first to change its mode"
            )
        return mode
    if settings.mode == "auto":
        return NETNS if NETNS.available() else SANDBOX
    return MODES[settings.mode]


def _view(rec: Record, status: str) -> dict[str, Any]:
    """A server as the protocol answers it (with the mode's details as extra fields)."""
    view: dict[str, Any] = {
        "hostname": rec["hostname"],
        "provider_id": rec.get("provider_id"),
        "address": rec.get("address"),
        "status": status,
        "mode": rec.get("mode"),
    }
    for key in ("namespace", "veth", "bridge", "subnet", "gateway", "root"):
        if key in rec:
            view[key] = rec[key]
    return view


def _absent(host: str) -> dict[str, Any]:
    return {"hostname": host, "provider_id": None, "address": None, "status": "absent"}


def create(req: Request) -> Mapping[str, Any]:
    ctx = Ctx.from_request(req)
    host = check_hostname(req.server)
    settings = parse_settings(req.settings)
    with workspace_lock(ctx):
        rec = load_record(ctx, host)
        mode = _choose(settings, rec)
        if ctx.dry_run:
            now = _view(rec, mode.status(ctx, rec)) if rec else _absent(host)
            ctx.progress(f"dry run: would create {host} ({mode.name} mode)")
            return {"server": now, "dry_run": True}
        rec = mode.create(ctx, host, settings, rec)
    return {"server": _view(rec, "running")}


def delete(req: Request) -> Mapping[str, Any]:
    ctx = Ctx.from_request(req)
    host = check_hostname(req.server)
    folder = ctx.server_dir(host)
    with workspace_lock(ctx):
        rec = load_record(ctx, host)
        if ctx.dry_run:
            ctx.progress(f"dry run: would delete {host}" if rec else f"{host} does not exist")
            return {"deleted": rec is not None, "dry_run": True}
        if rec is None:
            # Nothing made, or leftovers without a record (a lost or hand-edited runtime folder):
            # processes carrying this server's marker are its own; anything else is not touched.
            existed = kill_marked(ctx, ctx.provider_id(host)) > 0
            if folder.exists():
                remove_tree(folder)
                existed = True
            existed = release(ctx, host) or existed
            if NETNS.available() and ns_exists(ctx.provider_id(host)):
                ctx.progress(
                    f"namespace {ctx.provider_id(host)} exists but has no record here: not "
                    "touching it (remove it with `ip netns delete` if it is stale)"
                )
            return {"deleted": existed}
        mode = _mode_of(rec)
        rec["state"] = "deleting"
        save_record(ctx, rec)
        ctx.progress(f"deleting {host} ({mode.name} mode)")
        mode.teardown(ctx, rec)
        remove_tree(folder)
        release(ctx, host)
        mode.after_removal(ctx, rec)
    return {"deleted": True}


def status(req: Request) -> Mapping[str, Any]:
    ctx = Ctx.from_request(req)
    host = check_hostname(req.server)
    rec = load_record(ctx, host)
    if rec is None:
        return {"server": _absent(host)}
    return {"server": _view(rec, _mode_of(rec).status(ctx, rec))}


def list_servers(req: Request) -> Mapping[str, Any]:
    ctx = Ctx.from_request(req)
    return {"servers": [_view(r, _mode_of(r).status(ctx, r)) for r in all_records(ctx)]}


def exec_(req: Request) -> Mapping[str, Any]:
    ctx = Ctx.from_request(req)
    host = check_hostname(req.server)
    what = parse_exec(req.settings)
    rec = load_record(ctx, host)
    if rec is None:
        raise Failure(f"server {host} does not exist in {ctx.runtime_dir}: create it first")
    if rec.get("state") != "ready":
        raise Failure(f"server {host} is half-made (state {rec.get('state')}): create repairs it")
    prefix, cwd = _mode_of(rec).exec_target(ctx, rec)
    markers = {
        MARKER: str(rec["provider_id"]),
        "PRVNG_LOCAL_HOSTNAME": host,
        "PRVNG_LOCAL_ADDRESS": str(rec["address"]),
    }
    return execute(what, prefix, cwd, markers, ctx.server_dir(host) / "logs")


if __name__ == "__main__":
    run(
        {
            "create": create,
            "delete": delete,
            "status": status,
            "list": list_servers,
            "exec": exec_,
        }
    )
