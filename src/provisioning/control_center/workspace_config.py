"""Configuration management: read, validate, write and version the Nickel files of the
workspaces this control center manages (``control_center.workspaces``).

::

    control_center.workspaces = ["/srv/ws/demo", "prod=/srv/ws/production"]
    #                            id "demo"        id "prod"

The parts: :mod:`.config_files` (paths, disk), :mod:`.config_check` (validation),
:mod:`.config_history` (versions, the write transaction); this module puts them together.

* **Files** are the ``*.ncl`` files under the workspace folder, named by their path relative to
  it (``infra/demo/settings.ncl``). A path with ``..``, an absolute path, a hidden part
  (``.git/…``), anything under ``runtime/`` (provider state) or a name not ending in ``.ncl`` is
  refused (422), and so is a path that resolves, through a symbolic link, outside the folder.
* **Validation** is ``prvng workspace validate`` (infra by infra) run on a scratch copy of the
  workspace with the candidate file in place, after a parse and type check of the file itself.
  Nickel's diagnostics are mapped to a workspace file, line and column. It runs in a child
  process within ``limits`` (``control_center.nickel_timeout_s`` and ``nickel_memory_mb``): a
  content whose evaluation does not end in time, or needs more memory, is refused with a
  diagnostic naming the limit.
  A change is refused only for problems it brings: a problem the workspace already had is
  reported with ``preexisting: true`` and does not block.
* **Writes** check ``expected_sha256`` (the hash of the file the client read; ``None`` for a file
  that must not exist yet) inside the write transaction, under a per-file lock (SQLite's single
  writer, a transaction-scoped advisory lock on PostgreSQL): of two writers that read the same
  version, one wins and the other gets 409 naming both hashes. The file is replaced atomically
  (temporary file, fsync, rename, fsync of the folder) inside the transaction that records the
  version and its audit record, so a failed write records nothing.
* **History** (table ``cc_config_versions``): the first read of a file records it as version 0
  (author ``on-disk``, "found on disk"); a file changed on disk since its last version is
  recorded as a new ``on-disk`` version when it is next read, written, or its history asked
  for. Deleting files is not offered (yet).
"""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Row, func, select
from sqlalchemy.engine import Connection

from provisioning.control_center import audit_log
from provisioning.control_center import config_history as ch
from provisioning.control_center.config_check import check_workspace
from provisioning.control_center.config_files import (
    ConfigFile,
    decode_text,
    find_file,
    scan_files,
    sha256_of,
)
from provisioning.control_center.service import Actor
from provisioning.control_center.tables_config import config_versions as cv
from provisioning.core.errors import Conflict, NotFound, ValidationError
from provisioning.core.isolated import Limits
from provisioning.core.store import Database

__all__ = ["MAX_CONTENT_CHARS", "WorkspaceConfig"]

MAX_CONTENT_CHARS = 512 * 1024


def _now() -> datetime:
    return datetime.now(UTC)


class WorkspaceConfig:
    """See the module docstring. ``workspaces``: ``{id: folder}``
    (:func:`~provisioning.control_center.config_files.parse_workspaces`); ``limits``: of each
    validation's child process."""

    def __init__(
        self, db: Database, workspaces: Mapping[str, Path], *, limits: Limits | None = None
    ) -> None:
        self.db = db
        self.workspaces = dict(workspaces)
        self.limits = limits or Limits()
        self._checks = asyncio.Semaphore(2)  # validations are CPU-bound Nickel evaluations

    # ------------------------------------------------------------------ workspaces and paths

    def root(self, ws: str) -> Path:
        """Raises: NotFound naming the workspaces this control center manages."""
        root = self.workspaces.get(ws)
        if root is None:
            known = ", ".join(sorted(self.workspaces)) or "none (control_center.workspaces)"
            raise NotFound(f"workspace {ws!r} not found; workspaces: {known}")
        if not root.is_dir():
            raise NotFound(f"workspace {ws!r}: folder {root} does not exist")
        return root

    def list_workspaces(self) -> list[dict[str, Any]]:
        return [
            {
                "id": ws,
                "path": str(root),
                "available": (root / "config" / "workspace.ncl").is_file(),
            }
            for ws, root in sorted(self.workspaces.items())
        ]

    def file(self, ws: str, rel: str, *, for_write: bool = False) -> ConfigFile:
        """:func:`find_file` in workspace ``ws``. Raises: NotFound, ValidationError."""
        return find_file(ws, self.root(ws), rel, for_write=for_write)

    async def list_files(self, ws: str) -> list[dict[str, Any]]:
        """Every managed file with size, sha256, mtime and its current version (``None``
        until it is first read or written, or after it changed on disk)."""
        root = self.root(ws)
        found = await asyncio.to_thread(scan_files, root)
        latest = await self.db.run_read(lambda c: ch.latest_versions(c, ws))
        for doc in found:
            row = latest.get(doc["path"])
            doc["version"] = row[0] if row is not None and row[1] == doc["sha256"] else None
        return found

    # ------------------------------------------------------------------ reading

    async def read(self, ws: str, rel: str) -> dict[str, Any]:
        """The file's content, sha256 and current version (recorded first when needed).

        Raises:
            NotFound: no workspace or no such file. ValidationError: bad path, not UTF-8.
        """
        f = self.file(ws, rel)
        data = await asyncio.to_thread(f.read)
        if data is None:
            raise NotFound(f"{f.rel} not found in workspace {ws}")
        content = decode_text(data, f.rel)
        row = await self._recorded(f, data)
        st = await asyncio.to_thread(f.full.stat)
        return {
            "workspace": ws,
            "path": f.rel,
            "content": content,
            "sha256": row.sha256,
            "size": len(data),
            "version": row.version,
            "mtime": datetime.fromtimestamp(st.st_mtime, UTC),
        }

    async def _recorded(self, f: ConfigFile, data: bytes) -> Row[Any]:
        """The version row of ``data``, recording it (baseline or on-disk change) if new."""
        sha = sha256_of(data)
        row = await self.db.run_read(lambda c: ch.latest_version(c, f.ws, f.rel))
        if row is not None and row.sha256 == sha:
            return row
        now = _now()

        def body(conn: Connection) -> Row[Any]:
            ch.lock(conn, f)
            return ch.record_disk(conn, f, data, now)

        return await self.db.run_write(body)

    async def _sync(self, f: ConfigFile) -> None:
        data = await asyncio.to_thread(f.read)
        if data is not None:
            await self._recorded(f, data)

    async def history(self, ws: str, rel: str) -> list[dict[str, Any]]:
        """Every version, newest first (content left out). Raises: NotFound."""
        f = self.file(ws, rel)
        await self._sync(f)
        cols = [c for c in cv.c if c.name != "content"]
        q = (
            select(*cols)
            .where(cv.c.workspace == ws, cv.c.path == f.rel)
            .order_by(cv.c.version.desc())
        )
        rows = await self.db.run_read(lambda c: c.execute(q).all())
        if not rows:
            raise NotFound(f"{f.rel} not found in workspace {ws}, nor in its history")
        return [ch.version_doc(r) for r in rows]

    async def version(self, ws: str, rel: str, n: int) -> dict[str, Any]:
        """One version with its content. Raises: NotFound (names the versions that exist)."""
        f = self.file(ws, rel)
        await self._sync(f)
        return {**ch.version_doc(await self._get_version(f, n)), "workspace": ws}

    async def _get_version(self, f: ConfigFile, n: int) -> Row[Any]:
        def body(conn: Connection) -> tuple[Row[Any] | None, int | None]:
            row = conn.execute(
                select(cv).where(cv.c.workspace == f.ws, cv.c.path == f.rel, cv.c.version == n)
            ).first()
            last = conn.execute(
                select(func.max(cv.c.version)).where(cv.c.workspace == f.ws, cv.c.path == f.rel)
            ).scalar()
            return row, last

        row, last = await self.db.run_read(body)
        if row is None:
            have = "none" if last is None else f"0 to {last}"
            raise NotFound(f"{f.rel} has no version {n}; versions: {have}")
        return row

    async def diff(self, ws: str, rel: str, start: int | None, end: int | None) -> dict[str, Any]:
        """Unified diff from version ``start`` (default: the one before ``end``) to ``end``
        (default: the current one). Raises: NotFound."""
        f = self.file(ws, rel)
        await self._sync(f)
        if end is None:
            end = await self.db.run_read(
                lambda c: c.execute(
                    select(func.max(cv.c.version)).where(cv.c.workspace == ws, cv.c.path == f.rel)
                ).scalar()
            )
            if end is None:
                raise NotFound(f"{f.rel} not found in workspace {ws}, nor in its history")
        if start is None:
            start = max(end - 1, 0)
        a, b = await self._get_version(f, start), await self._get_version(f, end)
        lines = difflib.unified_diff(
            a.content.splitlines(keepends=True),
            b.content.splitlines(keepends=True),
            fromfile=f"a/{f.rel}@{start}",
            tofile=f"b/{f.rel}@{end}",
        )
        out = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
        return {"workspace": ws, "path": f.rel, "from": start, "to": end, "diff": out}

    # ------------------------------------------------------------------ validating

    async def validate(self, ws: str, rel: str | None, content: str | None) -> dict[str, Any]:
        """Check the workspace as it would be with ``rel`` holding ``content`` (or as it is,
        when both are ``None``), writing nothing. ``valid`` is false when the change brings a
        problem; each diagnostic says whether the workspace had it already (``preexisting``).

        Raises:
            NotFound: no such workspace. ValidationError: a bad path, or only one of the two.
        """
        if (rel is None) != (content is None):
            raise ValidationError("give both path and content, or neither", field="path")
        root = self.root(ws)
        target = self.file(ws, rel, for_write=True).rel if rel is not None else None
        async with self._checks:
            diags = await asyncio.to_thread(
                check_workspace, root, target, content, limits=self.limits
            )
            before: set[tuple[Any, ...]] = set()
            if diags and target is not None:
                old = await asyncio.to_thread(check_workspace, root, None, None, limits=self.limits)
                before = {_key(d) for d in old}
        for d in diags:
            d["preexisting"] = _key(d) in before
        return {
            "workspace": ws,
            "path": target,
            "valid": not any(not d["preexisting"] for d in diags),
            "diagnostics": diags,
        }

    # ------------------------------------------------------------------ writing

    async def write(
        self,
        ws: str,
        rel: str,
        content: str,
        expected_sha256: str | None,
        message: str,
        actor: Actor,
        *,
        restored_from: int | None = None,
    ) -> dict[str, Any]:
        """Validate, check ``expected_sha256``, write atomically, record the version and its
        audit record. Content equal to the file's records nothing new (``unchanged``).

        Raises:
            ValidationError: the content brings problems (``details.diagnostics``); bad path.
            Conflict: the file is not the one ``expected_sha256`` names (both hashes given).
            NotFound: no such workspace.
        """
        f = self.file(ws, rel, for_write=True)
        action = "config:restore" if restored_from is not None else "config:write"
        where = {"workspace": ws, "path": f.rel}
        try:
            if len(content) > MAX_CONTENT_CHARS:
                raise ValidationError(
                    f"{f.rel}: content over {MAX_CONTENT_CHARS} characters", field="content"
                )
            checked = await self.validate(ws, f.rel, content)
            if not checked["valid"]:
                raise _invalid(f.rel, checked["diagnostics"])
            data = content.encode("utf-8")
            now = _now()
            return await self.db.run_write(
                lambda c: ch.write_body(
                    c, f, data, expected_sha256, message, actor, action, restored_from, now
                )
            )
        except (ValidationError, Conflict) as exc:
            reason = exc.code
            await self.db.run_write(
                lambda c: audit_log.append(
                    c,
                    actor.event(
                        action,
                        "failure",
                        object_type="Workspace",
                        object_id=ws,
                        details={**where, "reason": reason},
                    ),
                )
            )
            raise

    async def restore(
        self, ws: str, rel: str, n: int, expected_sha256: str | None, message: str, actor: Actor
    ) -> dict[str, Any]:
        """Write version ``n``'s content as a new version (same checks as :meth:`write`)."""
        f = self.file(ws, rel, for_write=True)
        await self._sync(f)
        old = await self._get_version(f, n)
        msg = message or f"restore version {n}"
        return await self.write(ws, rel, old.content, expected_sha256, msg, actor, restored_from=n)


# ---------------------------------------------------------------------- helpers


def _key(d: Mapping[str, Any]) -> tuple[Any, ...]:
    # Lines move when a file is edited: a problem is "the same" by file and message.
    return (d.get("file"), d.get("message"))


def _invalid(rel: str, diags: list[dict[str, Any]]) -> ValidationError:
    new = [d for d in diags if not d["preexisting"]]
    shown = "\n  ".join(_where(d) + d["message"] for d in new)
    return ValidationError(
        f"{rel} was not written: {len(new)} problem(s) with this content:\n  {shown}",
        path=rel,
        diagnostics=diags,
    )


def _where(d: Mapping[str, Any]) -> str:
    parts = [str(d[k]) for k in ("file", "line", "column") if d.get(k) is not None]
    return ":".join(parts) + ": " if parts else ""
