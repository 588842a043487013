"""Infrastructure (``/ui/infrastructure``): the servers' inventory with their task services,
asked of the orchestrator (``GET /servers``) with the user's own token, so it authorizes
``server:read`` again; filtered by infra like ``prvng server list --infra``."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

if TYPE_CHECKING:
    from provisioning.control_center.ui.app import WebUI

__all__ = ["build_infra_router"]

_INFRA = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def build_infra_router(ui: WebUI) -> APIRouter:
    r = APIRouter()

    async def servers(session: Any, infra: str) -> dict[str, Any]:
        async with ui.backends.orchestrator(session.token) as orch:
            rows = await orch.list_servers(**({"infra": infra} if infra else {}))
        infras = sorted({str(s["infra"]) for s in rows})
        workspaces = sorted({str(s.get("workspace_name") or s["workspace"]) for s in rows})
        return {"servers": rows, "infra": infra, "infras": infras, "workspaces": workspaces}

    @r.get("/infrastructure")
    async def infrastructure(request: Request) -> Response:
        session = await ui.require(request, "server:read")
        infra = request.query_params.get("infra", "")
        infra = infra if _INFRA.fullmatch(infra) else ""
        return ui.page(
            request,
            "users/infrastructure.html",
            session,
            title="Infrastructure",
            active="infrastructure",
            **await servers(session, infra),
        )

    return r
