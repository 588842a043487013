"""Workflow files: read a workflow written in Nickel, JSON or YAML into a :class:`WorkflowSpec`.

A workflow file has exactly the fields of :class:`~provisioning.orchestrator.api.WorkflowSpec`.
The format follows the extension:

- ``.ncl`` is evaluated with the ``Workflow`` contract of ``schemas/workflow.ncl`` applied, so a
  mistake is reported as Nickel prints it, pointing at the line of the user's file
  (:class:`NickelError`);
- ``.json`` and ``.yaml``/``.yml`` are parsed (a syntax error names the file, line and column).

Whatever the format, the data is then validated by the pydantic model; a bad field becomes a
:class:`ValidationError` whose message names each field by its path, e.g.
``tasks[2].timeout_s: Input should be greater than 0``. :func:`describe_validation_error` builds
that message and is shared with the HTTP API.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Final, Literal

import pydantic
import yaml
from pydantic_core import ErrorDetails

from provisioning.core.errors import UsageError, ValidationError
from provisioning.core.nickel import contract, evaluate_file
from provisioning.orchestrator.api import WorkflowSpec

__all__ = [
    "SUPPORTED_SUFFIXES",
    "describe_validation_error",
    "field_path",
    "load_workflow_file",
    "parse_workflow_text",
]

SUPPORTED_SUFFIXES: Final[dict[str, Literal["ncl", "json", "yaml"]]] = {
    ".ncl": "ncl",
    ".json": "json",
    ".yaml": "yaml",
    ".yml": "yaml",
}
"""Workflow file extensions and the format each one means."""

_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_MAX_SHOWN_INPUT = 60


def load_workflow_file(path: Path) -> WorkflowSpec:
    """Read and validate the workflow file at ``path``; its extension gives the format.

    Raises:
        UsageError: the file does not exist, cannot be read, or has an unsupported extension.
        NickelError: a ``.ncl`` file does not evaluate or breaks the ``Workflow`` contract; the
            message is Nickel's diagnostic (file, line, caret).
        ValidationError: a ``.json``/``.yaml`` file is malformed (the message gives file, line and
            column), or the data breaks the model (the message names each bad field's path).
    """
    fmt = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise UsageError(
            f"{path}: unsupported workflow file type {path.suffix or '(no extension)'!r}; "
            f"use one of {supported}",
            source=str(path),
        )
    if not path.exists():
        raise UsageError(f"Workflow file not found: {path}", source=str(path))
    if not path.is_file():
        raise UsageError(
            f"{path} is not a file; give the path of a workflow file", source=str(path)
        )
    if fmt == "ncl":
        # The contract is imported by absolute path: a user file named `workflow.ncl` next to the
        # workflow must not shadow it on the import path.
        data = evaluate_file(path, wrap=f"({{file}}) | {contract('workflow.ncl', 'Workflow')}")
        return _validate(data, str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8",
            source=str(path),
        ) from None
    except OSError as exc:
        raise UsageError(
            f"Cannot read workflow file {path}: {exc.strerror}", source=str(path)
        ) from None
    return parse_workflow_text(text, fmt, str(path))


def parse_workflow_text(text: str, fmt: Literal["json", "yaml"], source: str) -> WorkflowSpec:
    """Parse a workflow written as JSON or YAML and validate it.

    ``source`` names where the text came from (a file path, "request body") in error messages.

    Raises:
        ValidationError: the text is malformed (the message gives source, line and column) or the
            data breaks the model (the message names each bad field's path).
    """
    data = _parse_json(text, source) if fmt == "json" else _parse_yaml(text, source)
    return _validate(data, source)


def describe_validation_error(exc: pydantic.ValidationError, source: str = "") -> str:
    """Render a pydantic error as one ``path: message`` line per bad field.

    Paths are written as in the document, e.g. ``tasks[2].retry.max_attempts``; a scalar input is
    shown after the message. ``source`` (a file name, "request body"), when given, heads the text.
    """
    errors = exc.errors(include_url=False)
    count = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}"
    head = f"{source}: {count}" if source else count.capitalize()
    return "\n".join([f"{head}:", *(f"  {_describe_one(err)}" for err in errors)])


def field_path(loc: tuple[int | str, ...]) -> str:
    """The path of a pydantic error location as written in the document: ``tasks[2].name``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out or "(top level)"


def _message(err: ErrorDetails) -> str:
    return err["msg"].removeprefix("Value error, ")


def _describe_one(err: ErrorDetails) -> str:
    msg = _message(err)
    value = err["input"]
    shown = ""
    if err["type"] not in ("missing", "extra_forbidden") and (
        value is None or isinstance(value, str | int | float | bool)
    ):
        text = repr(value)
        if len(text) > _MAX_SHOWN_INPUT:
            text = text[: _MAX_SHOWN_INPUT - 3] + "..."
        shown = f" (got {text})"
    return f"{field_path(tuple(err['loc']))}: {msg}{shown}"


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"{source}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}",
            source=source,
            line=exc.lineno,
            column=exc.colno,
        ) from None
    except RecursionError:
        raise ValidationError(f"{source}: JSON is nested too deeply", source=source) from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = ": ".join(p for p in (exc.context, exc.problem) if p) or "syntax error"
        raise ValidationError(
            f"{where}: invalid YAML: {problem}",
            source=source,
            line=mark.line + 1 if mark is not None else None,
            column=mark.column + 1 if mark is not None else None,
        ) from None
    except yaml.YAMLError as exc:
        # Reader errors (a forbidden character) carry no mark, only their own text with a position.
        raise ValidationError(f"{source}: invalid YAML: {exc}", source=source) from None
    except RecursionError:
        raise ValidationError(f"{source}: YAML is nested too deeply", source=source) from None


def _validate(data: Any, source: str) -> WorkflowSpec:
    if not isinstance(data, dict):
        got = "nothing (the document is empty)" if data is None else f"a {type(data).__name__}"
        raise ValidationError(
            f"{source}: a workflow is a mapping with `name` and `tasks`, got {got}", source=source
        )
    try:
        return WorkflowSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ValidationError(
            describe_validation_error(exc, source),
            source=source,
            errors=[
                {"field": field_path(tuple(e["loc"])), "message": _message(e)}
                for e in exc.errors(include_url=False)
            ],
        ) from None
