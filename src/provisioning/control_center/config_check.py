"""Validation of a workspace with one file replaced, as diagnostics mapped to file and line.

The checks are ``prvng workspace validate``'s (``workspace.api.check_workspace``: infra by infra,
so that one broken infra does not hide the others), run on a scratch copy of the workspace (without
``runtime/`` and hidden folders) holding the candidate file; the candidate is first parsed and
type-checked on its own, which catches mistakes in a file nothing imports. Nothing is written
to the workspace.

A diagnostic::

    {"file": "infra/demo/settings.ncl", "line": 17, "column": 18,
     "message": "contract broken by the value of `hostname`",
     "detail": "<Nickel's whole diagnostic, paths relative to the workspace>",
     "related": [{"file": "<schemas>/workspace.ncl", "line": 32, "column": 14}]}

``file`` is relative to the workspace (``None`` when no file can be named); ``line`` and
``column`` come from Nickel's first location inside the workspace; for a problem Nickel did not
report (a server naming an unknown provider, say) ``line`` is the first line holding the
server's or cluster's name, ``column`` is ``None``. Files of the shipped contracts
are shown as ``<schemas>/<name>``.

The check runs in a child process (:mod:`provisioning.core.isolated`) bounded by the control
center's ``nickel_timeout_s`` and ``nickel_memory_mb``: a file whose evaluation never ends or
exhausts the memory is reported as a diagnostic of that file (``line`` ``None``) naming the limit.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from provisioning.core import isolated
from provisioning.core.errors import NickelError, NotFound, ProvisioningError, ValidationError
from provisioning.core.nickel import evaluate, schemas_dir
from provisioning.workspace.api import check_workspace as validate_workspace

__all__ = ["check_workspace", "diagnose"]

_LOCATION = re.compile(r"┌─ (?P<file>.+?):(?P<line>\d+):(?P<col>\d+)\s*$", re.MULTILINE)
# Where Nickel shows the platform's own wrapper expression ("imported here"): not the user's.
_PYTHON_BLOCK = re.compile(r"\n[ │]*\n? *┌─ python:\d+:\d+.*", re.DOTALL)
_NAMED = re.compile(r"^(?:server|cluster) (?P<name>[a-z0-9][a-z0-9_-]*):")
_PREFIXED = re.compile(r"^(?P<file>[^\s:]+\.ncl): (?P<msg>.*)$", re.DOTALL)


def check_workspace(
    root: Path, rel: str | None, content: str | None, *, limits: isolated.Limits | None = None
) -> list[dict[str, Any]]:
    """The problems of the workspace at ``root`` with ``rel`` holding ``content`` (both
    ``None``: as it is), deduplicated, in the order found, checked in a child process within
    ``limits`` (default :class:`~provisioning.core.isolated.Limits`). Blocking: run it in a
    thread.

    Raises:
        ValidationError: ``rel`` is reached through a symbolic link.
    """
    limits = limits or isolated.Limits()
    kwargs: dict[str, Any] = {"root": str(root), "rel": rel, "content": content, "scratch": None}
    try:
        if rel is None or content is None:
            return _in_child(kwargs, limits, "the workspace")
        # The scratch folder is made (and removed) here: a child killed at the limit cannot.
        with tempfile.TemporaryDirectory(prefix="prvng-config-check-") as tmp:
            return _in_child({**kwargs, "scratch": tmp}, limits, rel)
    except NickelError as exc:
        if exc.details.get("limit") is None:
            raise
        return [
            {
                "file": rel,
                "line": None,
                "column": None,
                "message": exc.message,
                "detail": exc.message,
                "related": [],
            }
        ]


def _in_child(kwargs: dict[str, Any], limits: isolated.Limits, source: str) -> list[dict[str, Any]]:
    found = isolated.run(
        "provisioning.control_center.config_check:diagnose", kwargs, limits=limits, source=source
    )
    return list(found)


def diagnose(
    root: str, rel: str | None, content: str | None, scratch: str | None
) -> list[dict[str, Any]]:
    """What :func:`check_workspace` answers, computed in the child process: the workspace as
    it is (``scratch`` ``None``), or copied into the folder ``scratch`` with ``rel`` holding
    ``content``."""
    if rel is None or content is None or scratch is None:
        return _diagnose(Path(root).resolve(), None)
    copy = Path(scratch).resolve() / "ws"
    shutil.copytree(Path(root), copy, symlinks=True, ignore=_ignore(Path(root)))
    target = copy / rel
    if not target.resolve().is_relative_to(copy):  # never write through a link
        raise ValidationError(f"{rel} is reached through a symbolic link", field="path")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content, encoding="utf-8")
    return _diagnose(copy, rel)


def _ignore(root: Path) -> Any:
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == root
        return {n for n in names if n.startswith(".") or (top and n == "runtime")}

    return ignore


def _diagnose(root: Path, rel: str | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if rel is not None:
        target = root / rel
        try:  # parse and type-check the file alone; `let` keeps it from being evaluated
            evaluate(
                f"let _checked = import {json.dumps(str(target), ensure_ascii=False)} in null",
                [target.parent],
                source=str(target),
            )
        except NickelError as exc:
            return [_from_error(exc, root, rel)]
    for problem in validate_workspace(root):
        if isinstance(problem, str):
            out.append(_from_text(problem, root, None))
        else:
            missing = isinstance(problem, NotFound) and "workspace.ncl" in problem.message
            out.append(_from_error(problem, root, "config/workspace.ncl" if missing else None))
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for d in out:
        if d["line"] is None and d["file"]:
            d["line"] = _line_of_name(root, d["file"], d["message"])
        key = (d["file"], d["line"], d["column"], d["message"])
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def _from_error(exc: ProvisioningError, root: Path, fallback: str | None) -> dict[str, Any]:
    source = exc.details.get("source")
    if isinstance(source, str) and source.startswith(f"{root}/"):
        fallback = source.removeprefix(f"{root}/")
    return _from_text(exc.message, root, fallback)


def _from_text(message: str, root: Path, fallback: str | None) -> dict[str, Any]:
    text = message.replace(f"{root}/", "").replace(f"{schemas_dir()}/", "<schemas>/")
    text = _PYTHON_BLOCK.sub("", text.replace(str(root), "<workspace>"))
    text = text.removeprefix("extension: ")
    if text.startswith("Nickel evaluation failed"):
        text = text.split("\n", 1)[1] if "\n" in text else text
    locations: list[dict[str, Any]] = [
        {"file": m["file"], "line": int(m["line"]), "column": int(m["col"])}
        for m in _LOCATION.finditer(text)
        if m["file"] != "python"
    ]
    inside = [loc for loc in locations if _in_workspace(loc["file"])]
    if locations:
        title = next(
            (
                ln.removeprefix("error:").strip()
                for ln in text.splitlines()
                if ln.startswith("error")
            ),
            text.splitlines()[0],
        )
        primary: dict[str, Any] = (
            inside[0] if inside else {"file": fallback, "line": None, "column": None}
        )
        related = [loc for loc in locations if loc is not primary]
        return {**primary, "message": title, "detail": text.strip(), "related": related}
    m = _PREFIXED.match(text)
    file, msg = (m["file"], m["msg"]) if m else (fallback, text.removeprefix("error: "))
    return {
        "file": file,
        "line": None,
        "column": None,
        "message": msg.strip(),
        "detail": text.strip(),
        "related": [],
    }


def _line_of_name(root: Path, rel: str, message: str) -> int | None:
    """For a reference problem ("server web-02: no provider 'x'"), the line that declares the
    server or cluster it names: the first holding the name as a string."""
    m = _NAMED.match(message)
    path = root / rel
    if m is None or not path.is_file():
        return None
    needle = json.dumps(m["name"])
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if needle in line:
            return n
    return None


def _in_workspace(file: str) -> bool:
    return not file.startswith(("/", "<"))
