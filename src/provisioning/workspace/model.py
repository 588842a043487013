"""A workspace on disk: its Nickel files, checked against ``schemas/workspace.ncl``.

::

    <workspace>/
      config/workspace.ncl            name, providers' settings          | Workspace
      infra/<infra>/settings.ncl      servers, task services, clusters   | Infra
      infra/<infra>/workflows/*.ncl   batch workflows                    | Batch
      infra/<infra>/extensions/       the infra's own extensions (highest layer)
      extensions/{providers,taskservs,clusters}/<name>/                  (workspace layer)
      runtime/                        state the providers keep (git-ignored)

Evaluation goes through ``core.nickel`` so a mistake is reported as Nickel prints it (file,
line, caret).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioning.core.errors import NickelError, NotFound, ValidationError
from provisioning.core.nickel import contract, evaluate_file
from provisioning.workspace.extensions import Catalog, discover

__all__ = ["Infra", "Workspace", "find_workspace"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def find_workspace(start: Path | None = None) -> Path:
    """The workspace containing ``start`` (default: the current directory): the nearest folder
    upward with ``config/workspace.ncl``.

    Raises:
        NotFound: none (say which folder to use with ``--workspace``).
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "config" / "workspace.ncl").is_file():
            return folder
    raise NotFound(
        f"no workspace at or above {here}: run `prvng workspace init NAME` or pass --workspace"
    )


@dataclass
class Infra:
    """One infra's evaluated settings."""

    name: str
    path: Path
    data: dict[str, Any]

    @property
    def servers(self) -> list[dict[str, Any]]:
        return list(self.data.get("servers", []))

    @property
    def clusters(self) -> list[dict[str, Any]]:
        return list(self.data.get("clusters", []))

    def server(self, hostname: str) -> dict[str, Any]:
        """Raises: NotFound naming the servers that exist."""
        for s in self.servers:
            if s["hostname"] == hostname:
                return dict(s)
        known = ", ".join(s["hostname"] for s in self.servers) or "none"
        raise NotFound(f"no server {hostname!r} in infra {self.name}; servers: {known}")

    def cluster(self, name: str) -> dict[str, Any]:
        """Raises: NotFound naming the clusters that exist."""
        for c in self.clusters:
            if c["name"] == name:
                return dict(c)
        known = ", ".join(c["name"] for c in self.clusters) or "none"
        raise NotFound(f"no cluster {name!r} in infra {self.name}; clusters: {known}")


@dataclass
class Workspace:
    """A workspace folder and its evaluated ``config/workspace.ncl``."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> Workspace:
        """Raises:
        NotFound: ``path`` has no ``config/workspace.ncl``.
        NickelError: the file does not evaluate or breaks the ``Workspace`` contract.
        """
        path = path.resolve()
        cfg = path / "config" / "workspace.ncl"
        if not cfg.is_file():
            raise NotFound(f"{path} is not a workspace: {cfg} is missing")
        data = evaluate_file(cfg, wrap=f"({{file}}) | {contract('workspace.ncl', 'Workspace')}")
        return cls(path, data)

    @property
    def name(self) -> str:
        return str(self.config["name"])

    @property
    def runtime_dir(self) -> Path:
        return self.path / "runtime"

    def infra_names(self) -> list[str]:
        root = self.path / "infra"
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "settings.ncl").is_file())

    def infra(self, name: str) -> Infra:
        """Raises:
        NotFound: no ``infra/<name>/settings.ncl`` (names the infras that exist).
        NickelError: it does not evaluate or breaks the ``Infra`` contract.
        ValidationError: two servers share a hostname, or a cluster names an unknown server.
        """
        if not _NAME.match(name):
            raise ValidationError(f"infra name {name!r} is not valid", field="infra")
        path = self.path / "infra" / name / "settings.ncl"
        if not path.is_file():
            known = ", ".join(self.infra_names()) or "none"
            raise NotFound(f"no infra {name!r} in workspace {self.path}; infras: {known}")
        data = evaluate_file(path, wrap=f"({{file}}) | {contract('workspace.ncl', 'Infra')}")
        infra = Infra(name, path.parent, data)
        seen: set[str] = set()
        for s in infra.servers:
            if s["hostname"] in seen:
                raise ValidationError(f"{path}: hostname {s['hostname']!r} is declared twice")
            seen.add(s["hostname"])
        for c in infra.clusters:
            for m in c["members"]:
                if m["server"] not in seen:
                    raise ValidationError(
                        f"{path}: cluster {c['name']!r} names server {m['server']!r}, "
                        "which the infra does not declare"
                    )
        return infra

    def batch_files(self, infra: str) -> list[Path]:
        root = self.path / "infra" / infra / "workflows"
        return sorted(root.glob("*.ncl")) if root.is_dir() else []

    def batch(self, path: Path) -> dict[str, Any]:
        """Raises: NickelError (the file breaks the ``Batch`` contract)."""
        data: dict[str, Any] = evaluate_file(
            path, wrap=f"({{file}}) | {contract('workspace.ncl', 'Batch')}"
        )
        return data

    def catalog(self, infra: str | None = None) -> Catalog:
        return discover(self.path, infra)

    def provider_settings(self, infra: Infra, server: dict[str, Any]) -> dict[str, Any]:
        """Workspace < infra < server settings of the server's provider."""
        p = server["provider"]
        merged: dict[str, Any] = {}
        merged.update(self.config.get("providers", {}).get(p, {}))
        merged.update(infra.data.get("providers", {}).get(p, {}))
        merged.update(server.get("provider_settings") or {})
        return merged

    def validate(self, infra: str | None = None) -> list[str]:
        """Evaluate everything (or one infra) and check the references between files: each
        server's provider, task services (and what they require, without cycles), each
        cluster's kind and roles, each batch's operations. Answers the problems found;
        Nickel errors are raised as they come, with Nickel's own diagnostic.

        Raises:
            NickelError: a file does not evaluate or breaks its contract.
        """
        from provisioning.workspace.plan import taskserv_order

        problems: list[str] = []
        names = [infra] if infra else self.infra_names()
        for name in names:
            try:
                inf = self.infra(name)
            except NickelError:
                raise
            except (ValidationError, NotFound) as exc:
                problems.append(exc.message)
                continue
            cat = self.catalog(name)
            problems += [f"extension: {e}" for e in cat.errors]
            where = f"infra/{name}/settings.ncl"
            for s in inf.servers:
                if ("provider", s["provider"]) not in cat.found:
                    problems.append(
                        f"{where}: server {s['hostname']}: no provider {s['provider']!r}"
                    )
                try:
                    taskserv_order(cat, [t["name"] for t in s["taskservs"]])
                except (ValidationError, NotFound) as exc:
                    problems.append(f"{where}: server {s['hostname']}: {exc.message}")
            for c in inf.clusters:
                ext = cat.found.get(("cluster", c["kind"]))
                if ext is None:
                    problems.append(f"{where}: cluster {c['name']}: no cluster kind {c['kind']!r}")
                    continue
                bad = [m["role"] for m in c["members"] if ext.roles and m["role"] not in ext.roles]
                if bad:
                    problems.append(
                        f"{where}: cluster {c['name']}: roles {bad} not among {list(ext.roles)}"
                    )
            for path in self.batch_files(name):
                batch = self.batch(path)
                ids = [op["id"] for op in batch["operations"]]
                for op in batch["operations"]:
                    for dep in op["depends_on"]:
                        if dep not in ids:
                            problems.append(
                                f"{path.relative_to(self.path)}: operation {op['id']} depends "
                                f"on unknown operation {dep!r}"
                            )
        return problems
