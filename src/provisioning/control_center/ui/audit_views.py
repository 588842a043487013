"""Audit pages: search the control center's audit log (the ``/audit`` route's filters: action,
actor, result, object, service, time range), page through it, export what matches as JSON lines
(``audit:export``), and the result of checking its hash chain. Reading needs ``audit:read``, as
on the API."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

if TYPE_CHECKING:
    from provisioning.control_center.ui.app import WebUI

__all__ = ["AuditFilters", "build_audit_router"]

PAGE = 50
RESULTS = ("success", "denied", "failure", "error")
_TEXT = re.compile(r"[^\x00-\x1f]{1,200}")


def _when(value: str) -> datetime | None:
    """A ``datetime-local`` (or ISO) value as UTC; anything else is ignored."""
    try:
        at = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


@dataclass(frozen=True)
class AuditFilters:
    """The search, from the query string; a value that is not valid is ignored."""

    action: str = ""
    actor: str = ""
    result: str = ""
    object_type: str = ""
    object_id: str = ""
    service: str = ""
    since: str = ""
    until: str = ""
    offset: int = 0

    @classmethod
    def of(cls, request: Request) -> AuditFilters:
        q = request.query_params

        def text(name: str, limit: int = 200) -> str:
            value = q.get(name, "").strip()[:limit]
            return value if _TEXT.fullmatch(value) else ""

        try:
            offset = max(0, min(int(q.get("offset", "0")), 10_000_000))
        except ValueError:
            offset = 0
        since, until = q.get("since", "")[:40], q.get("until", "")[:40]
        return cls(
            action=text("action", 100),
            actor=text("actor"),
            result=q.get("result", "") if q.get("result", "") in RESULTS else "",
            object_type=text("object_type", 100),
            object_id=text("object_id"),
            service=text("service", 100),
            since=since if _when(since) else "",
            until=until if _when(until) else "",
            offset=offset,
        )

    def service_filters(self) -> dict[str, Any]:
        return {
            "action": self.action or None,
            "actor": self.actor or None,
            "result": self.result or None,
            "object_type": self.object_type or None,
            "object_id": self.object_id or None,
            "service": self.service or None,
            "since": _when(self.since) if self.since else None,
            "until": _when(self.until) if self.until else None,
        }

    def query(self, **changes: Any) -> str:
        values = {**self.__dict__, **changes}
        return urlencode({k: v for k, v in values.items() if v not in ("", 0, None)})


def build_audit_router(ui: WebUI) -> APIRouter:
    r = APIRouter()

    @r.get("/audit")
    async def audit(request: Request) -> Response:
        session = await ui.require(request, "audit:read")
        f = AuditFilters.of(request)
        rows = await ui.identity.audit_query(
            limit=PAGE + 1, offset=f.offset, newest_first=True, **f.service_filters()
        )
        return ui.page(
            request,
            "audit/audit.html",
            session,
            title="Audit",
            active="audit",
            rows=rows[:PAGE],
            more=len(rows) > PAGE,
            filters=f,
            results=RESULTS,
            page=PAGE,
            exportable=ui.may(session.identity, "audit:export"),
        )

    @r.get("/audit/verify")
    async def verify(request: Request) -> Response:
        session = await ui.require(request, "audit:read")
        res = await ui.identity.audit_verify()
        return ui.page(request, "audit/_verify.html", session, res=res)

    @r.get("/audit/export")
    async def export(request: Request) -> Response:
        await ui.require(request, "audit:export")
        f = AuditFilters.of(request)
        lines = await ui.identity.audit_export(**f.service_filters())
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return Response(
            "".join(lines),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.jsonl"'},
        )

    return r
