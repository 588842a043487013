"""The layout rules of STYLE.md, enforced: core imports no service, services import each other
only through ``api``/``client``, and the public surfaces are what ``__all__`` says."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import provisioning

SRC = Path(provisioning.__file__).parent
SERVICES = {
    "orchestrator",
    "control_center",
    "extension_registry",
    "mcp_server",
    "ops_keeper",
    "ops_controller",
    "audit_mirror",
    "api_gateway",
    "workspace",
    "installer",
    "ncl_sync",
}
PUBLIC = {"api", "client"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
    return [m for m in out if m.startswith("provisioning.")]


def test_core_imports_no_service() -> None:
    bad = []
    for path in (SRC / "core").rglob("*.py"):
        for mod in _imports(path):
            top = mod.split(".")[1]
            if top not in {"core"}:
                bad.append(f"{path.relative_to(SRC)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_services_use_only_each_others_api_and_client() -> None:
    bad = []
    for service in SERVICES:
        root = SRC / service
        if not root.exists():
            continue
        for path in root.rglob("*.py"):
            for mod in _imports(path):
                parts = mod.split(".")
                other = parts[1]
                if other in SERVICES and other != service:
                    if len(parts) < 3 or parts[2] not in PUBLIC:
                        bad.append(f"{path.relative_to(SRC)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_every_name_in_all_exists() -> None:
    missing = []
    for info in pkgutil.walk_packages([str(SRC)], "provisioning."):
        if ".migrations" in info.name:
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            if not hasattr(module, name):
                missing.append(f"{info.name}.{name}")
    assert not missing, missing
