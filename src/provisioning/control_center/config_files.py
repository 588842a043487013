"""The files of the managed workspaces on disk: which paths are allowed, reading, atomic
writing, listing. Rules in docs/reference/config-management.md ("Files")."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from provisioning.core.errors import ConfigError, ValidationError

__all__ = [
    "ConfigFile",
    "clean_path",
    "decode_text",
    "find_file",
    "parse_workspaces",
    "scan_files",
    "sha256_of",
]

MAX_FILES = 5000
_ODD = re.compile(r'[\x00-\x1f\x7f\\"%]')  # would need escaping in a Nickel import
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def parse_workspaces(entries: Sequence[str]) -> dict[str, Path]:
    """``control_center.workspaces`` as ``{id: folder}``: an entry is an absolute path (its id
    is the folder's name) or ``name=path``.

    Raises:
        ConfigError: a relative path, a bad id, or two entries with the same id.
    """
    out: dict[str, Path] = {}
    for entry in entries:
        name, sep, raw = entry.partition("=")
        if not sep or "/" in name:
            name, raw = "", entry
        path = Path(raw)
        name = name or path.name
        where = f"control_center.workspaces entry {entry!r}"
        if not path.is_absolute():
            raise ConfigError(f"{where}: give the workspace folder as an absolute path")
        if not _ID.match(name):
            raise ConfigError(
                f"{where}: the id {name!r} must be letters, digits, '.', '_' or '-' "
                "(up to 100); name it with `name=/path`"
            )
        if name in out:
            raise ConfigError(f"{where}: the id {name!r} is used twice; name one `name=/path`")
        out[name] = path
    return out


def clean_path(rel: str) -> str:
    """The normalised relative path of a workspace file.

    Raises:
        ValidationError: not a relative ``.ncl`` path inside the workspace (the message says
            which rule it breaks).
    """
    bad = f"path {rel!r}"
    if not rel or len(rel) > 1024:
        raise ValidationError(f"{bad}: give a relative path of a .ncl file", field="path")
    if _ODD.search(rel):
        raise ValidationError(
            f"{bad}: control characters, '\\', '\"' and '%' are not allowed", field="path"
        )
    if rel.startswith("/"):
        raise ValidationError(f"{bad} is absolute: give it relative to the workspace", field="path")
    parts = rel.split("/")
    if any(len(p.encode()) > 255 for p in parts):
        raise ValidationError(f"{bad}: a name is over 255 bytes", field="path")
    if any(p in ("", ".", "..") for p in parts):
        raise ValidationError(f"{bad}: '..', '.' and empty parts are not allowed", field="path")
    if any(p.startswith(".") for p in parts):
        raise ValidationError(
            f"{bad}: hidden files and folders are not configuration", field="path"
        )
    if parts[0] == "runtime":
        raise ValidationError(
            f"{bad}: runtime/ holds provider state, not configuration", field="path"
        )
    if not parts[-1].endswith(".ncl") or parts[-1] == ".ncl":
        raise ValidationError(f"{bad}: only Nickel files (*.ncl) are managed", field="path")
    return str(PurePosixPath(*parts))


def sha256_of(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ConfigFile:
    """A managed file: its workspace, relative path and place on disk."""

    ws: str
    rel: str
    full: Path

    def read(self) -> bytes | None:
        """The bytes on disk, or ``None`` when there is no file."""
        try:
            return self.full.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._refused(exc) from None

    def _refused(self, exc: OSError) -> ValidationError:
        if isinstance(exc, IsADirectoryError):
            return ValidationError(f"{self.rel} is a folder, not a file", field="path")
        return ValidationError(f"{self.rel}: {exc.strerror or exc}", field="path")

    def write(self, data: bytes) -> None:
        """Replace the file atomically: temporary file, fsync, rename, fsync of the folder."""
        folder = self.full.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise self._refused(exc) from None
        try:
            mode = stat.S_IMODE(self.full.stat().st_mode)
        except FileNotFoundError:
            mode = 0o644
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.full.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, self.full)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, IsADirectoryError):
                raise self._refused(exc) from None
            raise
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def find_file(ws: str, root: Path, rel: str, *, for_write: bool = False) -> ConfigFile:
    """The file ``rel`` of workspace ``ws``. Reading may go through symbolic links that
    stay inside the workspace; writing (and validating a write) goes through none.

    Raises:
        ValidationError: a bad path, one leading outside, or through a link for a write.
    """
    rel = clean_path(rel)
    full = root / rel
    try:
        real = full.resolve()
        inside = real.is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise ValidationError(
            f"path {rel!r} leads outside workspace {ws} (symbolic link)", field="path"
        )
    for depth in range(1, rel.count("/") + 1):
        folder = rel.rsplit("/", depth)[0]
        if (root / folder).exists() and not (root / folder).is_dir():
            raise ValidationError(f"{rel}: {folder} is a file, not a folder", field="path")
    if full.is_dir():
        raise ValidationError(f"{rel} is a folder, not a file", field="path")
    if for_write and real != root.resolve() / rel:
        target = real.relative_to(root.resolve()).as_posix()
        raise ValidationError(
            f"{rel} is reached through a symbolic link: edit {target}", field="path"
        )
    return ConfigFile(ws, rel, full)


def scan_files(root: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    real_root = root.resolve()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        top = here == root
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (top and d == "runtime"))
        for name in sorted(files):
            if name.startswith(".") or not name.endswith(".ncl"):
                continue
            full = here / name
            try:
                if not full.resolve().is_relative_to(real_root) or not full.is_file():
                    continue
                data = full.read_bytes()
                mtime = full.stat().st_mtime
            except OSError:
                continue
            out.append(
                {
                    "path": full.relative_to(root).as_posix(),
                    "size": len(data),
                    "sha256": sha256_of(data),
                    "mtime": datetime.fromtimestamp(mtime, UTC),
                }
            )
            if len(out) >= MAX_FILES:
                return out
    return out


def decode_text(data: bytes, rel: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError(f"{rel} is not UTF-8 text", field="path") from None
