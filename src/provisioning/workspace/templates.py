"""``prvng workspace init``: the files of a new workspace, from a template (``local`` | ``ssh``)."""

from __future__ import annotations

import re
from pathlib import Path

from provisioning.core.errors import Conflict, ValidationError

__all__ = ["TEMPLATES", "init_workspace"]

TEMPLATES = ("local", "ssh")

_WORKSPACE = """\
# The workspace: its name and the settings every server of a provider gets.
# Checked against the `Workspace` contract of schemas/workspace.ncl (`prvng workspace validate`).
{{
  name = "{name}",
  description = "",
  providers = {{
{providers}  }},
}}
"""

_LOCAL_PROVIDER = """\
    # Servers are network namespaces on this machine (as root), else sandbox folders.
    local = {{ bridge = "{bridge}", subnet = "10.209.0.0/24" }},
"""

_SSH_PROVIDER = """\
    # Existing hosts reached over SSH with key authentication and host-key checking.
    ssh = {
      user = "root",
      port = 22,
      identity_file = "~/.ssh/id_ed25519",
      known_hosts = "~/.ssh/known_hosts",
    },
"""

_INFRA_LOCAL = """\
# Servers, their task services and clusters (the `Infra` contract of schemas/workspace.ncl).
{
  servers = [
    {
      hostname = "web-01",
      provider = "local",
      labels = { role = "web" },
      taskservs = [
        { name = "base" },
        { name = "nginx", settings = { port = 8080, content = "hello from web-01" } },
      ],
    },
  ],
  clusters = [],
}
"""

_INFRA_SSH = """\
# Servers, their task services and clusters (the `Infra` contract of schemas/workspace.ncl).
{
  servers = [
    {
      hostname = "app-01",
      provider = "ssh",
      # Where to connect: the host's address; the rest comes from config/workspace.ncl.
      provider_settings = { host = "192.0.2.10" },
      taskservs = [{ name = "base" }],
    },
  ],
  clusters = [],
}
"""

_BATCH = """\
# A batch workflow: `prvng batch submit {infra}/site --workspace .`
{{
  name = "site",
  parallel_limit = 4,
  rollback_enabled = true,
  operations = [
    {{ id = "servers", type = "server.create" }},
  ],
}}
"""


def init_workspace(
    path: Path, name: str, *, template: str = "local", infra: str = "main"
) -> list[Path]:
    """Create the workspace ``name`` at ``path``; answer the files written.

    Raises:
        ValidationError: a bad name or template.
        Conflict: ``path`` already holds a workspace.
    """
    for label, value in (("workspace", name), ("infra", infra)):
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", value):
            raise ValidationError(
                f"{label} name {value!r}: use lowercase letters, digits, '_' and '-'",
                field=label,
            )
    if template not in TEMPLATES:
        raise ValidationError(
            f"unknown template {template!r}: use {' or '.join(TEMPLATES)}", field="template"
        )
    if (path / "config" / "workspace.ncl").exists():
        raise Conflict(f"{path} already holds a workspace (config/workspace.ncl exists)")
    bridge = "prvng0"
    providers = _LOCAL_PROVIDER.format(bridge=bridge) if template == "local" else _SSH_PROVIDER
    files = {
        path / "config" / "workspace.ncl": _WORKSPACE.format(name=name, providers=providers),
        path / "infra" / infra / "settings.ncl": _INFRA_LOCAL
        if template == "local"
        else _INFRA_SSH,
        path / "infra" / infra / "workflows" / "site.ncl": _BATCH.format(infra=infra),
        path / ".gitignore": "runtime/\n",
    }
    for sub in ("providers", "taskservs", "clusters"):
        (path / "extensions" / sub).mkdir(parents=True, exist_ok=True)
    for file, text in files.items():
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text, encoding="utf-8")
    return sorted(files)
