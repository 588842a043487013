"""``sandbox`` mode (no root or no ``ip``): a server is a folder and the processes started in it.

* root folder ``<runtime_dir>/servers/<host>/root`` (the working folder of ``exec``);
* address: a loopback address ``127.X.Y.Z`` of its own (Linux answers on all of 127/8 without
  configuration), ``X`` and the first ``Y`` derived from the workspace, the rest from the
  allocation;
* every process ``exec`` starts carries ``PRVNG_LOCAL_SERVER=<provider_id>`` in its
  environment; ``delete`` kills every process carrying it, then removes the folder.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

from local_common import (
    MARKER,
    Ctx,
    Record,
    Settings,
    allocate,
    kill_processes,
    pids_with_env,
    save_record,
)

from provisioning.workspace.sdk import Failure


def _candidates(ctx: Ctx) -> Iterator[str]:
    """127.X.Y.Z with X in 64..191 and a first Y derived from the workspace (so two workspaces
    rarely share a /24), Z in 1..254; 65024 addresses in all."""
    h = int(ctx.ws_id, 16)
    second, third = 64 + h % 128, (h >> 8) % 256
    for i in range(254 * 256):
        yield f"127.{second}.{(third + i // 254) % 256}.{i % 254 + 1}"


def _env_has_marker(pid: int, value: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"{MARKER}={value}".encode() in fh.read().split(b"\0")
    except OSError:
        return False


def kill_marked(ctx: Ctx, provider_id: str) -> int:
    """Kill every process carrying ``PRVNG_LOCAL_SERVER=<provider_id>``."""
    return kill_processes(
        lambda: pids_with_env(MARKER, provider_id),
        lambda pid: _env_has_marker(pid, provider_id),
        f"sandbox {provider_id}",
    )


class SandboxMode:
    name = "sandbox"

    def available(self) -> bool:
        return True

    def create(self, ctx: Ctx, host: str, settings: Settings, rec: Record | None) -> Record:
        root = ctx.server_dir(host) / "root"
        if rec is None:
            address = allocate(
                ctx, "sandbox", host, _candidates(ctx), set(), "sandbox loopback range"
            )
            rec = {
                "hostname": host,
                "provider_id": ctx.provider_id(host),
                "mode": "sandbox",
                "address": address,
                "root": str(root),
                "state": "creating",
                "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            save_record(ctx, rec)
        elif rec.get("state") == "ready" and root.is_dir():
            return rec
        else:
            why = "damaged" if rec.get("state") == "ready" else f"half-made ({rec.get('state')})"
            ctx.progress(f"{host}: repairing the server: it is {why}")
        root.mkdir(parents=True, exist_ok=True)
        rec["state"] = "ready"
        save_record(ctx, rec)
        return rec

    def status(self, ctx: Ctx, rec: Record) -> str:
        ready = rec.get("state") == "ready" and Path(str(rec["root"])).is_dir()
        return "running" if ready else "stopped"

    def teardown(self, ctx: Ctx, rec: Record) -> None:
        n = kill_marked(ctx, str(rec["provider_id"]))
        if n:
            ctx.progress(f"killed {n} process(es) of {rec['hostname']}")

    def after_removal(self, ctx: Ctx, rec: Record) -> None:
        pass

    def exec_target(self, ctx: Ctx, rec: Record) -> tuple[list[str], Path]:
        root = Path(str(rec["root"]))
        if not root.is_dir():
            raise Failure(
                f"server {rec['hostname']} is not running: {root} is missing (`create` repairs it)"
            )
        return [], root


SANDBOX = SandboxMode()
