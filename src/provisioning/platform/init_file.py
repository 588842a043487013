"""``prvng platform init``: the commented ``platform.ncl`` with every setting and its default.

The file is generated from :class:`~provisioning.core.settings.Settings` (each field's default
and its ``description``), so a new setting appears in it without anyone editing this module.
Secrets (``repr=False`` fields and API keys) are written commented out: an empty one in the file
would only hide the environment variable a deployment sets.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from provisioning.core.errors import ConfigError
from provisioning.core.settings import Settings

__all__ = ["render_platform_ncl", "write_platform_ncl"]

_WIDTH = 96
_HEADER = """\
# Configuration of the Provisioning platform (written by `prvng platform init`).
#
# Every setting is shown with its default; delete what you do not change. Precedence, low to
# high: built-in defaults < this file < environment PRVNG_<SECTION>__<KEY> < command flags.
# Checked against the contract schemas/platform.ncl at every start.
"""


def _is_secret(name: str, field: FieldInfo) -> bool:
    return field.repr is False or name.endswith(("password", "api_key"))


def nickel_value(value: Any) -> str:
    """A Python default as a Nickel literal (strings, numbers, booleans, arrays, records).

    Raises:
        TypeError: the value has no Nickel literal (a new setting of an unsupported type).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # JSON escapes are Nickel's; `%{` would start an interpolation.
        return json.dumps(str(value)).replace("%{", "\\%{")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(nickel_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{json.dumps(str(k))} = {nickel_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"no Nickel literal for {value!r}")


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text, width=_WIDTH, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# "
    )


def _field_lines(name: str, field: FieldInfo, value: Any, indent: str) -> list[str]:
    lines = _comment(field.description or "", indent)
    setting = f"{name} = {nickel_value(value)},"
    lines.append(f"{indent}# {setting}" if _is_secret(name, field) else f"{indent}{setting}")
    return lines


def render_platform_ncl() -> str:
    """The text of ``platform.ncl``: every section and setting of :class:`Settings`."""
    defaults = Settings.model_construct()  # no validation, no data dir needed
    out = [_HEADER, "{"]
    for section, field in Settings.model_fields.items():
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            # Top-level values (the data dir) are chosen outside the file that lives in it.
            out.extend(_comment(f"{field.description} Set by --data-dir / PRVNG_HOME.", "  "))
            out.append(f"  # {section} = {nickel_value(str(getattr(defaults, section)))},")
            out.append("")
            continue
        out.append(f"  {section} = {{")
        values = annotation()
        for name, inner in annotation.model_fields.items():
            out.extend(_field_lines(name, inner, getattr(values, name), "    "))
        out.append("  },")
        out.append("")
    if out[-1] == "":
        out.pop()
    out.append("}")
    return "\n".join(out) + "\n"


def write_platform_ncl(path: Path, *, force: bool = False) -> Path:
    """Write :func:`render_platform_ncl` to ``path`` (its folder created).

    Raises:
        ConfigError: ``path`` exists and ``force`` is false.
    """
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; edit it, or overwrite it with --force")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_platform_ncl(), encoding="utf-8")
    return path
