"""Jinja2 for the UI: the environment (autoescaped, strict), its filters, and static URLs that
change with the file's content (so browsers may cache them)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from starlette.responses import HTMLResponse

__all__ = ["PREFIX", "STATIC_DIR", "TEMPLATE_DIR", "Templates", "status_class"]

HERE = Path(__file__).parent
TEMPLATE_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

PREFIX = "/ui"  # where the web UI is mounted in the control center


def _parse(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def ago(value: Any) -> str:
    """``3 min ago`` style; empty for no time."""
    when = _parse(value)
    if when is None:
        return ""
    secs = (datetime.now(UTC) - when).total_seconds()
    if secs < 0:
        return "just now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if secs >= size:
            return f"{int(secs // size)} {unit} ago"
    return f"{int(secs)} s ago"


def iso(value: Any) -> str:
    when = _parse(value)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if when else ""


def duration(start: Any, end: Any = None) -> str:
    """Between two times (or until now); empty when it has not started."""
    began = _parse(start)
    if began is None:
        return ""
    secs = ((_parse(end) or datetime.now(UTC)) - began).total_seconds()
    if secs < 60:
        return f"{secs:.1f} s"
    if secs < 3600:
        return f"{int(secs // 60)} min {int(secs % 60)} s"
    return f"{int(secs // 3600)} h {int(secs % 3600 // 60)} min"


@lru_cache(maxsize=64)
def status_class(status: Any) -> str:
    """CSS class of a workflow/task state: ``st-running``, ``st-failed``… (a handful of values,
    asked for thousands of times on a big workflow's page)."""
    return "st-" + "".join(c for c in str(status).lower() if c.isalnum())


def percent(value: float | None) -> str:
    return "\u2013" if value is None else f"{value * 100:.1f} %"


class Templates:
    """Renders ``templates/*.html``. ``static(path)`` in a template is the file's URL under
    ``static_prefix`` with a content hash, e.g. ``/ui/static/app.css?v=1a2b3c4d``."""

    def __init__(self, static_prefix: str) -> None:
        self.static_prefix = static_prefix.rstrip("/")
        self._versions: dict[str, str] = {}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals["static"] = self.static
        self.env.filters.update(
            ago=ago, iso=iso, duration=duration, status_class=status_class, percent=percent
        )

    def static(self, path: str) -> str:
        version = self._versions.get(path)
        if version is None:
            data = (STATIC_DIR / path).read_bytes()
            version = self._versions[path] = hashlib.sha256(data).hexdigest()[:10]
        return f"{self.static_prefix}/{path}?v={version}"

    def render(self, name: str, **context: Any) -> str:
        return self.env.get_template(name).render(**context)

    def page(
        self, name: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any
    ) -> HTMLResponse:
        return HTMLResponse(self.render(name, **context), status_code=status, headers=headers)
