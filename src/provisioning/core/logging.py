"""Structured logging: one JSON object per line (or readable text on a terminal).

Secrets never reach logs: values of keys that look like secrets are masked by the formatter.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

__all__ = ["configure_logging", "get_logger"]

_SECRET_HINTS = ("password", "secret", "token", "api_key", "apikey", "authorization")
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


#: Settings about secrets, not secrets: durations and counts (``token_ttl_s``).
_NOT_SECRET_SUFFIXES = ("_ttl_s", "_s", "_count", "_at")


def _mask(key: str, value: Any) -> Any:
    lowered = key.lower()
    if any(h in lowered for h in _SECRET_HINTS) and not (
        lowered.endswith(_NOT_SECRET_SUFFIXES) and isinstance(value, int | float)
    ):
        return "***"
    return value


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line with its `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                doc[key] = _mask(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """Readable single-line records with `key=value` extras."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        extras = " ".join(
            f"{k}={_mask(k, v)}"
            for k, v in record.__dict__.items()
            if k not in _STD_ATTRS and not k.startswith("_")
        )
        line = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Set up the root logger once: ``fmt`` is ``json``, ``text`` or ``auto`` (text on a TTY)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "aiosqlite", "asyncio", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    """A logger under the `provisioning` namespace."""
    return logging.getLogger(name if name.startswith("provisioning") else f"provisioning.{name}")
