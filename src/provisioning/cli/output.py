"""Rendering CLI answers as a table, JSON or YAML.

JSON output is exactly the HTTP API's ``data``; tables show the columns a person scans for.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

__all__ = ["OutputFormat", "console", "err_console", "render"]

console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    # Piped output goes to grep, files and scripts: never fold ids and names at an assumed
    # 80 columns (tables take their natural width; this is only the upper bound).
    console = Console(width=4096)
err_console = Console(stderr=True)


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == "T":
        return value[:19].replace("T", " ")
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value) or "-"
    return str(value)


def render(
    data: Any,
    fmt: OutputFormat,
    *,
    columns: Sequence[tuple[str, str]] | None = None,
    title: str | None = None,
) -> None:
    """Print ``data``: a list of rows or one object. ``columns`` are (key, header) for tables."""
    if fmt is OutputFormat.JSON:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    if fmt is OutputFormat.YAML:
        sys.stdout.write(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))
        return
    rows = data if isinstance(data, list) else [data]
    if isinstance(data, dict) and columns is None:
        table = Table(show_header=False, title=title, box=None)
        table.add_column("field", style="bold")
        table.add_column("value")
        for key, value in data.items():
            if not isinstance(value, list):
                table.add_row(key, _cell(value))
        console.print(table)
        return
    cols = list(columns or [(k, k) for k in (rows[0].keys() if rows else [])])
    table = Table(title=title)
    for key, header in cols:
        if key == "id" or key.endswith("_id"):
            table.add_column(header, no_wrap=True, min_width=36)
        else:
            table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for key, _ in cols))
    if not rows:
        console.print("(none)")
        return
    console.print(table)
