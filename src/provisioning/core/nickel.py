"""Nickel evaluation in-process with `py-nickel`.

A Nickel error is kept as Nickel prints it (file, line, caret): :class:`NickelError` carries the
coloured diagnostic for terminals in ``details["diagnostic_ansi"]`` and a plain copy in its message
for JSON answers.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import nickel

from provisioning.core.errors import NickelError

__all__ = ["contract", "evaluate", "evaluate_file", "schemas_dir", "strip_ansi"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """Remove terminal colour codes from Nickel's diagnostics."""
    return _ANSI.sub("", text)


def schemas_dir() -> Path:
    """The folder of the Nickel contracts shipped in the package."""
    return Path(str(resources.files("provisioning") / "schemas"))


def evaluate(expr: str, import_paths: list[Path] | None = None, *, source: str = "") -> Any:
    """Evaluate a Nickel expression and return its value as Python data.

    Raises:
        NickelError: the expression does not evaluate or breaks a contract; the message is
            Nickel's own diagnostic without colour codes.
    """
    paths = [str(p) for p in (import_paths or [])] + [str(schemas_dir())]
    try:
        out = nickel.run(expr, import_paths=paths)
    except nickel.NickelException as exc:
        raw = str(exc)
        plain = strip_ansi(raw).strip()
        where = f" in {source}" if source else ""
        raise NickelError(
            f"Nickel evaluation failed{where}:\n{plain}", source=source, diagnostic_ansi=raw
        ) from None
    return json.loads(out)


def contract(schema: str, name: str) -> str:
    """A Nickel expression for contract ``name`` of the shipped ``schemas/<schema>``.

    Imported by absolute path, so a user's file of the same name (``platform.ncl``,
    ``workflow.ncl``) next to the evaluated file never shadows it on the import path.
    """
    return f"(import {json.dumps(str(schemas_dir() / schema))}).{name}"


def evaluate_file(path: Path, *, wrap: str | None = None) -> Any:
    """Evaluate a Nickel file, optionally applying a contract expression to it.

    ``wrap`` is a Nickel expression with ``{file}`` where the file's import goes, e.g.
    ``f"({{file}}) | {contract('workflow.ncl', 'Workflow')}"``.

    Raises:
        NickelError: the file is missing, does not evaluate, or breaks the contract.
    """
    path = path.resolve()
    if not path.is_file():
        raise NickelError(f"Nickel file not found: {path}", source=str(path))
    # By absolute path: a bare name would be looked up in the current directory first, which
    # may hold another file of that name (an extension's own manifest, say).
    name = json.dumps(str(path))
    expr = f"import {name}" if wrap is None else wrap.replace("{file}", f"import {name}")
    return evaluate(expr, [path.parent], source=str(path))
