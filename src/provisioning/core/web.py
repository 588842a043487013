"""HTTP plumbing shared by every service: the JSON envelope, error mapping, body limits.

Success answers are ``{"success": true, "data": ...}``; errors are
``{"success": false, "error": {"code", "message", "details"}}`` with the status the error
tree maps the code to. Request validation failures answer 422 naming every bad field, never 500.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from provisioning.core.errors import LimitExceeded, ProvisioningError
from provisioning.core.logging import get_logger

__all__ = [
    "BodyLimitMiddleware",
    "envelope",
    "error_response",
    "health_app",
    "install_error_handlers",
]

log = get_logger("web")


def _encode_other(obj: Any) -> Any:
    # What the C encoder does not know (datetime, Enum, pydantic models, sets, paths…) goes
    # through FastAPI's encoder; the plain dicts, lists and strings that make up nearly every
    # answer never do. Walking a 500-task workflow with ``jsonable_encoder`` took ~35 % of the
    # time of the UI's DAG page (docs/performance.md). Datetimes, the most common, go straight.
    if isinstance(obj, datetime):
        return obj.isoformat()
    return jsonable_encoder(obj)


class EnvelopeResponse(JSONResponse):
    """JSON as ``JSONResponse`` writes it, encoded in one pass by the C encoder."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content,
            ensure_ascii=False,
            allow_nan=False,
            indent=None,
            separators=(",", ":"),
            default=_encode_other,
        ).encode("utf-8")


def envelope(data: Any, status: int = 200) -> JSONResponse:
    """A success answer."""
    return EnvelopeResponse({"success": True, "data": data}, status_code=status)


def error_response(err: ProvisioningError) -> JSONResponse:
    """An error answer with the status mapped from the error's code."""
    headers = {}
    if err.http_status == 429 and "retry_after" in err.details:
        headers["Retry-After"] = str(err.details["retry_after"])
    if err.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        {"success": False, "error": jsonable_encoder(err.to_wire())},
        status_code=err.http_status,
        headers=headers,
    )


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "request"


def _field(e: Any) -> dict[str, str]:
    loc = list(e.get("loc", ()))
    where = str((loc or ["body"])[0])
    if e.get("type") == "json_invalid":
        # FastAPI puts the character offset where a field name would be.
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        reason = (e.get("ctx") or {}).get("error", e.get("msg"))
        return {"field": where, "in": where, "message": f"malformed JSON{at}: {reason}"}
    message = str(e.get("msg")).removeprefix("Value error, ")
    return {"field": _loc(loc[1:] or loc), "in": where, "message": message}


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the envelope: typed errors by code, validation to 422, the rest 500."""

    @app.exception_handler(ProvisioningError)
    async def _typed(_req: Request, exc: ProvisioningError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        fields = [_field(e) for e in errors]
        message = "invalid request: " + "; ".join(
            f"{f['in']}: {f['message']}"
            if f["field"] == f["in"]
            else f"{f['in']} {f['field']}: {f['message']}"
            for f in fields
        )
        from provisioning.core.errors import ValidationError

        return error_response(ValidationError(message[:4000], fields=fields[:50]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "usage_error", 413: "limit_exceeded"}.get(
            exc.status_code, "usage_error" if exc.status_code < 500 else "internal"
        )
        return JSONResponse(
            {"success": False, "error": {"code": code, "message": str(exc.detail), "details": {}}},
            status_code=exc.status_code,
        )

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": req.url.path})
        return error_response(ProvisioningError())


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, reading at most ``max_bytes`` of one."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sized = False
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                sized = True
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(send)
                    return
        if not sized:
            # A chunked body has no size up front. Raising from `receive` would reach the app as
            # a body it could not parse (400), so read it here, at most max_bytes, then replay it.
            buffered: list[Message] = []
            total = 0
            while True:
                msg = await receive()
                buffered.append(msg)
                if msg["type"] != "http.request":
                    break
                total += len(msg.get("body", b""))
                if total > self.max_bytes:
                    await self._refuse(send)
                    return
                if not msg.get("more_body", False):
                    break

            async def replay() -> Message:
                return buffered.pop(0) if buffered else await receive()

            await self.app(scope, replay, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise LimitExceeded(
                        f"request body is larger than {self.max_bytes} bytes "
                        "(orchestrator.max_body_bytes)"
                    )
            return msg

        await self.app(scope, limited, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "success": False,
                "error": {
                    "code": "limit_exceeded",
                    "message": f"request body is larger than {self.max_bytes} bytes",
                    "details": {"max_bytes": self.max_bytes},
                },
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def health_app(
    *,
    title: str,
    description: str,
    version: str,
    status: Callable[[], dict[str, Any]],
    metrics: Callable[[], Awaitable[bytes]],
    health_summary: str = "Liveness and state",
) -> FastAPI:
    """The app of a service that serves only ``GET /health`` (``status()`` in the envelope)
    and ``GET /metrics`` (``metrics()``: the Prometheus exposition, refreshed on each call)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    app = FastAPI(title=title, version=version, description=description)
    install_error_handlers(app)
    r = APIRouter()

    @r.get("/health", tags=["system"], summary=health_summary)
    async def health() -> Response:
        return envelope(status())

    @r.get("/metrics", tags=["system"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(await metrics(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(r)
    return app
