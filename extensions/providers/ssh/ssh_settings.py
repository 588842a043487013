"""How to reach a server over SSH: its settings, checked, with clear errors.

Settings come from (lowest first) the registered record of the server, the request's
``settings``, and the server's own ``provider_settings``:

==================== ========================================================================
``host``             address to connect to (default: the server's ``address``, else hostname)
``port``             22
``user``             ``root``
``identity_file``    private key (required; a relative path is relative to the workspace)
``known_hosts``      known_hosts file the server's host key must be in (required; host key
                     checking cannot be turned off)
``connect_timeout_s`` 10 (TCP connect, SSH handshake and authentication together)
==================== ========================================================================
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioning.workspace.sdk import Failure

__all__ = ["CONNECTION_KEYS", "Conn", "check_hostname", "conn_from"]

#: The settings that say how to connect (stored in the server's record).
CONNECTION_KEYS = ("host", "port", "user", "identity_file", "known_hosts", "connect_timeout_s")
_HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class Conn:
    """Everything needed to open an SSH connection to one server."""

    hostname: str
    host: str
    port: int
    user: str
    identity_file: Path
    known_hosts: Path
    connect_timeout_s: float

    @property
    def endpoint(self) -> str:
        """``host:port`` (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def provider_id(self) -> str:
        return f"ssh://{self.user}@{self.endpoint}"

    @property
    def where(self) -> str:
        """How errors name the server: ``web-01 (root@10.0.0.5:22)``."""
        return f"{self.hostname} ({self.user}@{self.endpoint})"

    def settings(self) -> dict[str, Any]:
        """The connection settings as stored in the record (paths, never key material)."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "identity_file": str(self.identity_file),
            "known_hosts": str(self.known_hosts),
            "connect_timeout_s": self.connect_timeout_s,
        }


def check_hostname(server: Mapping[str, Any]) -> str:
    """The server's hostname, safe to use as a folder name.

    Raises:
        Failure: it is missing or has characters a hostname cannot have.
    """
    hostname = server.get("hostname")
    if not isinstance(hostname, str) or not _HOSTNAME.match(hostname) or ".." in hostname:
        raise Failure(
            f"server hostname {hostname!r} is not a valid hostname "
            "(letters, digits, '.', '_' and '-', starting with a letter or digit)"
        )
    return hostname


def conn_from(
    server: Mapping[str, Any],
    settings: Mapping[str, Any],
    *,
    record: Mapping[str, Any] | None = None,
    workspace: str | None = None,
) -> Conn:
    """Merge the record's, the request's and the server's settings and check them.

    Raises:
        Failure: a setting is missing or wrong (the message names it and the server).
    """
    hostname = check_hostname(server)
    merged: dict[str, Any] = {}
    if record:
        merged.update({k: record[k] for k in CONNECTION_KEYS if record.get(k) is not None})
    merged.update({k: settings[k] for k in CONNECTION_KEYS if settings.get(k) is not None})
    own = server.get("provider_settings")
    if isinstance(own, Mapping):
        merged.update({k: own[k] for k in CONNECTION_KEYS if own.get(k) is not None})

    def bad(key: str, why: str) -> Failure:
        return Failure(f"ssh provider settings of {hostname}: {key}: {why}")

    host = merged.get("host") or server.get("address") or hostname
    if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
        raise bad("host", f"expected an address or DNS name, got {host!r}")

    port = merged.get("port", 22)
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise bad("port", f"expected a port number 1-65535, got {port!r}")

    user = merged.get("user", "root")
    if not isinstance(user, str) or not _USER.match(user):
        raise bad("user", f"expected a user name, got {user!r}")

    timeout = merged.get("connect_timeout_s", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise bad("connect_timeout_s", f"expected a positive number of seconds, got {timeout!r}")

    identity = _path(merged, "identity_file", workspace, bad)
    known_hosts = _path(merged, "known_hosts", workspace, bad)
    return Conn(
        hostname=hostname,
        host=host,
        port=port,
        user=user,
        identity_file=identity,
        known_hosts=known_hosts,
        connect_timeout_s=float(timeout),
    )


def _path(
    merged: Mapping[str, Any],
    key: str,
    workspace: str | None,
    bad: Callable[[str, str], Failure],
) -> Path:
    raw = merged.get(key)
    if raw is None or raw == "":
        raise bad(key, "required (the path of a file)")
    if not isinstance(raw, str):
        raise bad(key, f"expected a file path, got {raw!r}")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (Path(workspace) if workspace else Path.cwd()) / path
    if not path.is_file():
        raise bad(key, f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise bad(key, f"{path} is not readable")
    return path
