"""The control center's configuration routes (``/config/…``) and their wire models.

Reading needs ``config:read``, writing and restoring ``config:write``, both decided by Cedar on
the platform and then on the workspace (``Workspace::"<id>"``, so a site policy can limit a role
to some workspaces). The logic is in :mod:`provisioning.control_center.workspace_config`;
docs/reference/config-management.md describes the API.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from provisioning.control_center.config_files import parse_workspaces
from provisioning.control_center.routes import actor_of
from provisioning.control_center.workspace_config import MAX_CONTENT_CHARS, WorkspaceConfig
from provisioning.core.auth import Guard, Identity
from provisioning.core.isolated import Limits
from provisioning.core.rbac import Resource
from provisioning.core.settings import ControlCenterSettings
from provisioning.core.store import Database
from provisioning.core.web import envelope

__all__ = [
    "FileRestore",
    "FileWrite",
    "ValidateRequest",
    "build_config_router",
    "config_router",
]

_SHA = r"^[0-9a-f]{64}$"
WsId = Annotated[str, PathParam(min_length=1, max_length=100, description="Workspace id.")]
FilePath = Annotated[
    str,
    PathParam(
        min_length=1, max_length=1024, description="Relative path of a .ncl file of the workspace."
    ),
]
Version = Annotated[int, PathParam(ge=0, le=2**31 - 1, description="Version number.")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ValidateRequest(_Model):
    """The workspace as it would be with ``path`` holding ``content``; both empty: as it is."""

    path: str | None = Field(None, min_length=1, max_length=1024)
    content: str | None = Field(None, max_length=MAX_CONTENT_CHARS)


class FileWrite(_Model):
    content: str = Field(max_length=MAX_CONTENT_CHARS)
    expected_sha256: str | None = Field(
        None,
        pattern=_SHA,
        description="sha256 of the file as read (409 if it changed); null: create a new file.",
    )
    message: str = Field(min_length=1, max_length=1000, description="Why: kept in the history.")


class FileRestore(_Model):
    version: int = Field(ge=0, le=2**31 - 1, description="The version whose content comes back.")
    expected_sha256: str | None = Field(
        None, pattern=_SHA, description="sha256 of the file as read (409 if it changed)."
    )
    message: str = Field("", max_length=1000, description="Default: `restore version N`.")


def config_router(db: Database, settings: ControlCenterSettings, guard: Guard) -> APIRouter:
    """The routes for the workspaces of ``settings.workspaces``, history kept in ``db``.

    Raises:
        ConfigError: ``control_center.workspaces`` has a bad entry.
    """
    cfg = WorkspaceConfig(db, parse_workspaces(settings.workspaces), limits=Limits.of(settings))
    return build_config_router(cfg, guard)


def build_config_router(cfg: WorkspaceConfig, guard: Guard) -> APIRouter:
    r = APIRouter(prefix="/config/workspaces", tags=["config"])
    read = Depends(guard.require("config:read"))
    write = Depends(guard.require("config:write"))

    async def allowed(request: Request, who: Identity, action: str, ws: str) -> None:
        cfg.root(ws)  # 404 for a workspace that is not managed here
        await guard.check_object(request, who, action, Resource("Workspace", ws))

    @r.get("", summary="The workspaces whose configuration is managed here")
    async def workspaces(who: Identity = read) -> Response:
        return envelope(
            [
                w
                for w in cfg.list_workspaces()
                if guard.allows(who, "config:read", Resource("Workspace", w["id"]))
            ]
        )

    @r.get("/{ws}/files", summary="The Nickel files of a workspace")
    async def files(ws: WsId, request: Request, who: Identity = read) -> Response:
        await allowed(request, who, "config:read", ws)
        return envelope(await cfg.list_files(ws))

    @r.post("/{ws}/validate", summary="Validate the workspace with one file replaced; no write")
    async def validate(
        ws: WsId, body: ValidateRequest, request: Request, who: Identity = read
    ) -> Response:
        await allowed(request, who, "config:read", ws)
        return envelope(await cfg.validate(ws, body.path, body.content))

    # The routes below the file's path come first: `{path:path}` would swallow their suffix.
    @r.get("/{ws}/files/{path:path}/history", summary="The versions of a file, newest first")
    async def history(ws: WsId, path: FilePath, request: Request, who: Identity = read) -> Response:
        await allowed(request, who, "config:read", ws)
        return envelope(await cfg.history(ws, path))

    @r.get("/{ws}/files/{path:path}/versions/{n}", summary="One version of a file, with content")
    async def version(
        ws: WsId, path: FilePath, n: Version, request: Request, who: Identity = read
    ) -> Response:
        await allowed(request, who, "config:read", ws)
        return envelope(await cfg.version(ws, path, n))

    @r.get("/{ws}/files/{path:path}/diff", summary="Unified diff between two versions")
    async def diff(
        ws: WsId,
        path: FilePath,
        request: Request,
        start: Annotated[
            int | None,
            Query(alias="from", ge=0, le=2**31 - 1, description="Default: the one before `to`."),
        ] = None,
        to: Annotated[
            int | None, Query(ge=0, le=2**31 - 1, description="Default: the current version.")
        ] = None,
        who: Identity = read,
    ) -> Response:
        await allowed(request, who, "config:read", ws)
        return envelope(await cfg.diff(ws, path, start, to))

    @r.post("/{ws}/files/{path:path}/restore", summary="Write an old version back (new version)")
    async def restore(
        ws: WsId, path: FilePath, body: FileRestore, request: Request, who: Identity = write
    ) -> Response:
        await allowed(request, who, "config:write", ws)
        doc = await cfg.restore(
            ws, path, body.version, body.expected_sha256, body.message, actor_of(request, who)
        )
        return envelope(doc)

    @r.get("/{ws}/files/{path:path}", summary="A file's content, sha256 and version")
    async def read_file(
        ws: WsId, path: FilePath, request: Request, who: Identity = read
    ) -> Response:
        await allowed(request, who, "config:read", ws)
        return envelope(await cfg.read(ws, path))

    @r.put("/{ws}/files/{path:path}", summary="Validate and write a file (optimistic concurrency)")
    async def write_file(
        ws: WsId, path: FilePath, body: FileWrite, request: Request, who: Identity = write
    ) -> Response:
        await allowed(request, who, "config:write", ws)
        doc = await cfg.write(
            ws, path, body.content, body.expected_sha256, body.message, actor_of(request, who)
        )
        return envelope(doc, status=201 if doc["created"] else 200)

    return r
