"""Run one extension operation against a workspace target, as ``prvng extension run`` does.

Builds the protocol request from the workspace (the server as the infra declares it, its
provider's merged settings, what the inventory knows: address and provider id; the infra's
inventory in ``context.inventory``), runs the extension, checks the answer, and keeps the
inventory current: a created server is recorded, a deleted one forgotten, an installed task
service added to its server, a removed one taken off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from provisioning.core.errors import ExtensionError, ValidationError
from provisioning.core.store import Database
from provisioning.workspace.extensions import Extension, request, resolve, run_operation
from provisioning.workspace.inventory import Inventory
from provisioning.workspace.model import Infra, Workspace

__all__ = ["Operator"]


class Operator:
    """Runs operations for one workspace and infra, recording into ``db``'s inventory."""

    def __init__(self, ws: Workspace, infra: str, db: Database) -> None:
        self.ws = ws
        self.infra: Infra = ws.infra(infra)
        self.inventory = Inventory(db)
        self._known: dict[str, dict[str, Any]] = {}

    async def _load_inventory(self) -> None:
        await self.inventory.migrate()
        rows = await self.inventory.list(workspace=str(self.ws.path), infra=self.infra.name)
        self._known = {r["hostname"]: r for r in rows}

    def server_record(self, hostname: str) -> dict[str, Any]:
        """The server as extensions see it (see docs/reference/extensions.md)."""
        s = self.infra.server(hostname)
        known = self._known.get(hostname) or {}
        return {
            **s,
            "provider_settings": self.ws.provider_settings(self.infra, s),
            "address": known.get("address"),
            "provider_id": known.get("provider_id"),
        }

    def _context_inventory(self) -> list[dict[str, Any]]:
        return [
            {"hostname": h, "address": r.get("address")}
            for h, r in sorted(self._known.items())
            if r.get("address")
        ]

    async def run(
        self,
        ref: str,
        operation: str,
        target: str | None,
        *,
        command: Sequence[str] | None = None,
        wait_running_s: float | None = None,
        stderr: TextIO | None = None,
    ) -> dict[str, Any]:
        """Run ``operation`` of extension ``ref`` on ``target`` (a hostname; a cluster name for
        clusters; nothing for a provider's ``list``).

        Raises:
            NotFound: unknown extension, server or cluster.
            ValidationError: a missing target or command.
            ExtensionError: the extension failed, or a check answered ``ok: false``.
        """
        await self._load_inventory()
        ext = resolve(ref, self.ws.path, self.infra.name)
        if ext.kind == "taskserv" and operation == "remove" and target not in self._known:
            # Nothing of it can be on a server that was never made (or is gone already).
            return {"ok": True, "details": {"skipped": f"server {target} is not in the inventory"}}
        body, _ = self._request(ext, operation, target, command)
        body["context"]["inventory"] = self._context_inventory()
        answer = await asyncio.to_thread(run_operation, ext, operation, body, stderr_sink=stderr)
        if ext.kind == "provider" and operation == "status" and wait_running_s:
            answer = await self._wait_running(ext, body, answer, wait_running_s, stderr)
        await self._record(ext, operation, target, answer)
        if "ok" in answer and answer["ok"] is False:
            reason = answer.get("reason") or "the extension answered ok: false"
            raise ExtensionError(
                f"extension {ext.ref} ({ext.layer} layer) failed in {operation}: {reason}",
                extension=ext.ref,
                operation=operation,
            )
        return answer

    def _request(
        self, ext: Extension, operation: str, target: str | None, command: Sequence[str] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        settings: dict[str, Any]
        if ext.kind == "provider" and operation == "list":
            servers = [
                self.server_record(s["hostname"])
                for s in self.infra.servers
                if s["provider"] == ext.name
            ]
            tgt: dict[str, Any] = {"kind": "servers", "servers": servers}
            settings = dict(servers[0]["provider_settings"]) if servers else {}
        elif ext.kind == "cluster":
            if not target:
                raise ValidationError("name the cluster with --target", field="target")
            c = self.infra.cluster(target)
            if c["kind"] != ext.name:
                raise ValidationError(f"cluster {target} is a {c['kind']}, not a {ext.name}")
            members = [
                {"role": m["role"], "server": self.server_record(m["server"])} for m in c["members"]
            ]
            tgt = {"kind": "cluster", "name": c["name"], "members": members}
            settings = dict(c.get("settings") or {})
        else:
            if not target:
                raise ValidationError("name the server with --target", field="target")
            server = self.server_record(target)
            if ext.kind == "provider":
                if server["provider"] != ext.name:
                    raise ValidationError(
                        f"server {target} uses provider {server['provider']}, not {ext.name}"
                    )
                tgt = {"kind": "server", "server": server}
                settings = dict(server["provider_settings"])
                if operation == "exec":
                    if not command:
                        raise ValidationError("exec needs a command after --", field="command")
                    settings.update(command=list(command))
            else:
                entry = next((t for t in server["taskservs"] if t["name"] == ext.name), None)
                tgt = {"kind": "taskserv", "server": server, "name": ext.name}
                settings = dict((entry or {}).get("settings") or {})
        body = request(tgt, settings, workspace=self.ws.path, infra=self.infra.name, ext=ext)
        return body, settings

    async def _wait_running(
        self,
        ext: Extension,
        body: dict[str, Any],
        answer: dict[str, Any],
        limit_s: float,
        stderr: TextIO | None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + limit_s
        while answer["server"]["status"] != "running":
            if time.monotonic() > deadline:
                raise ExtensionError(
                    f"server {answer['server']['hostname']} is {answer['server']['status']}, "
                    f"not running, after {limit_s:g} s",
                    extension=ext.ref,
                    operation="status",
                )
            await asyncio.sleep(0.5)
            answer = await asyncio.to_thread(run_operation, ext, "status", body, stderr_sink=stderr)
        return answer

    async def _record(
        self, ext: Extension, operation: str, target: str | None, answer: dict[str, Any]
    ) -> None:
        ws, infra = str(self.ws.path), self.infra.name
        if ext.kind == "provider" and operation in ("create", "status") and target:
            srv = answer["server"]
            if srv["status"] == "absent":
                if operation == "status" and target in self._known:
                    await self.inventory.forget_server(ws, infra, target)
                return
            await self.inventory.record_server(
                workspace=ws,
                workspace_name=self.ws.name,
                infra=infra,
                hostname=target,
                provider=ext.name,
                provider_id=srv.get("provider_id"),
                address=srv.get("address"),
                status=srv["status"],
            )
        elif ext.kind == "provider" and operation == "delete" and target:
            await self.inventory.forget_server(ws, infra, target)
        elif ext.kind == "taskserv" and operation in ("install", "remove") and target:
            installed = operation == "install"
            await self.inventory.set_taskserv(ws, infra, target, ext.name, installed)


def open_workspace(path: Path | None) -> Workspace:
    """The workspace at ``path`` or around the current directory."""
    from provisioning.workspace.model import find_workspace

    return Workspace.open(path if path is not None else find_workspace())
