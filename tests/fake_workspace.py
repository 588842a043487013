"""A workspace whose extensions (provider ``fake``, task services ``os`` < ``db`` < ``app``,
cluster ``pair``) live in its own layer and answer at once: for tests of planning, validation
and access control that must not depend on the built-in extensions or create anything."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ext", "make_fake_workspace"]

FAKE_PROVIDER = """#!/bin/sh
echo '{"server": {"hostname": "x", "status": "running", "address": "192.0.2.1"}}'
"""


def ext(ws: Path, kind: str, name: str, *, requires: list[str] | None = None) -> None:
    ops = {
        "provider": ["create", "delete", "status", "list", "exec"],
        "taskserv": ["install", "remove", "check"],
        "cluster": ["create", "delete", "check"],
    }[kind]
    folder = ws / "extensions" / f"{kind}s" / name
    folder.mkdir(parents=True)
    operations = ", ".join(f'{op} = "x.sh"' for op in ops)
    (folder / "extension.ncl").write_text(
        f'{{ name = "{name}", kind = "{kind}", version = "1.2.3", '
        f"requires = {json.dumps(requires or [])}, operations = {{ {operations} }}, "
        f"roles = {json.dumps(['primary', 'replica'] if kind == 'cluster' else [])} }}"
    )
    (folder / "x.sh").write_text(
        FAKE_PROVIDER if kind == "provider" else "#!/bin/sh\necho '{\"ok\": true}'\n"
    )
    (folder / "x.sh").chmod(0o755)


def make_fake_workspace(root: Path) -> Path:
    """Write the workspace at ``root`` (infra ``prod``, batch ``all``); answer ``root``."""
    (root / "config").mkdir(parents=True)
    (root / "config" / "workspace.ncl").write_text(
        '{ name = "t", providers = { fake = { zone_default = "a", level = 1 } } }'
    )
    ext(root, "provider", "fake")
    ext(root, "taskserv", "os")
    ext(root, "taskserv", "db", requires=["os"])
    ext(root, "taskserv", "app", requires=["db", "os"])
    ext(root, "cluster", "pair", requires=["db"])
    infra = root / "infra" / "prod"
    (infra / "workflows").mkdir(parents=True)
    (infra / "settings.ncl").write_text(
        """{
  providers = { fake = { level = 2 } },
  servers = [
    { hostname = "a1", provider = "fake", taskservs = [{ name = "app" }],
      provider_settings = { level = 3 } },
    { hostname = "b1", provider = "fake", taskservs = [{ name = "db", settings = { port = 1 } }] },
  ],
  clusters = [
    { name = "dbs", kind = "pair",
      members = [{ server = "a1", role = "primary" }, { server = "b1", role = "replica" }] },
  ],
}"""
    )
    (infra / "workflows" / "all.ncl").write_text(
        """{
  name = "all", parallel_limit = 2, rollback_enabled = false,
  operations = [
    { id = "cl", type = "cluster.create", cluster = "dbs", depends_on = ["srv"] },
    { id = "srv", type = "server.create", servers = ["a1"] },
    { id = "gone", type = "server.delete", servers = ["b1"], depends_on = ["cl"],
      on_failure = "continue" },
  ],
}"""
    )
    return root
