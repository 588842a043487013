"""Typed platform settings, read in one place.

Precedence, low to high: built-in defaults < ``<home>/config/platform.ncl`` (checked against the
shipped contract ``schemas/platform.ncl``) < environment ``PRVNG_<SECTION>__<KEY>`` < CLI flags.
``PRVNG_HOME`` chooses the data dir. The settings object is built once by :func:`load_settings`
and passed down; services never read the environment themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from provisioning.core.errors import ConfigError
from provisioning.core.nickel import contract, evaluate_file

__all__ = [
    "AuditMirrorSettings",
    "ControlCenterSettings",
    "LogSettings",
    "NatsSettings",
    "OpsControllerSettings",
    "OpsKeeperSettings",
    "OrchestratorSettings",
    "Settings",
    "StateSettings",
    "default_home",
    "load_settings",
    "service_url",
    "to_async_url",
]

ENV_PREFIX = "PRVNG_"


def default_home() -> Path:
    """``$PRVNG_HOME`` or ``~/.local/share/provisioning``."""
    return Path.home() / ".local" / "share" / "provisioning"


def to_async_url(url: str) -> str:
    """Map a user-facing database URL to its async SQLAlchemy driver URL."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url.removeprefix(prefix)
    return url


def service_url(host: str, port: int, url: str = "", *, scheme: str = "http") -> str:
    """How a client reaches a service: its configured ``url``, else ``scheme://host:port``
    with a wildcard bind address (0.0.0.0, ::, empty) replaced by loopback and an IPv6
    address bracketed."""
    if url.strip():
        return url.strip().rstrip("/")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level written to the log."
    )
    format: Literal["auto", "json", "text"] = Field(
        "auto", description="`json` lines, readable `text`, or `auto` (text on a terminal)."
    )


class StateSettings(_Section):
    url: str = Field(
        "",
        description="Database URL: empty for SQLite under the data dir, `sqlite:///path.db` or "
        "`postgresql://user@host:5432/db` for the distributed mode.",
    )
    sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        "FULL",
        description="SQLite `synchronous`: FULL survives power loss, NORMAL a process crash.",
    )


class NatsSettings(_Section):
    url: str = Field(
        "",
        description="NATS server URL(s), comma-separated (a cluster); empty: the platform "
        "supervises its own nats-server on host:port with its store under the data dir.",
    )
    host: str = Field("127.0.0.1", description="Address of the embedded nats-server.")
    port: int = Field(4223, ge=0, le=65535, description="Port of the embedded nats-server.")
    max_deliver: int = Field(
        10, ge=1, le=10000, description="Deliveries of one message before it is given up."
    )
    ack_wait_s: float = Field(
        30, gt=0, le=3600, description="Redeliver a message not acknowledged within this."
    )
    duplicate_window_s: float = Field(
        600, gt=0, le=86400, description="JetStream drops a re-published Nats-Msg-Id this long."
    )
    replicas: int = Field(
        1,
        ge=1,
        le=5,
        description="Replicas of each stream the services create (their durable consumers "
        "inherit it): 3 on a three-node cluster, so that losing one node loses nothing.",
    )


class OrchestratorSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the orchestrator API binds to.")
    port: int = Field(8080, ge=0, le=65535, description="Port of the orchestrator API.")
    max_parallel: int = Field(8, ge=1, description="Tasks this worker runs at once (global limit).")
    max_tasks: int = Field(5000, ge=1, description="Most tasks one workflow may have.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body.")
    lease_s: float = Field(30.0, gt=0, description="Lease of a running task, renewed at 1/3.")
    worker_id: str = Field(
        "",
        description="Stable id of this worker; empty means `embedded` for `platform start` "
        "and a random id for `serve orchestrator`.",
    )
    kill_grace_s: float = Field(10.0, gt=0, description="SIGTERM→SIGKILL grace on cancel/timeout.")
    default_key_limit: int = Field(1, ge=1, description="Limit of a concurrency key not listed.")
    concurrency_limits: dict[str, int] = Field(
        default_factory=dict, description="Limits per concurrency key, e.g. provider:local = 2."
    )
    poll_interval_s: float = Field(
        1.0, gt=0, description="How often the scheduler looks for work it was not told about."
    )
    auth: Literal["required", "disabled"] = Field(
        "required",
        description="`disabled` lets anyone do anything (benchmarks, isolated tests only): "
        "logged as a warning at start and shown by /health.",
    )
    require_signed_ops: bool = Field(
        False,
        description="Refuse requests that create workflows (`POST /workflows`, the domain "
        "routes, batches) unless they come through the ops pipeline (`POST /ops/dispatch` "
        "with an op token signed by the keeper). Reads, cancel and logs stay open as usual.",
    )
    url: str = Field(
        "",
        description="URL other services use to reach the orchestrator (the ops-controller "
        "dispatches there); empty: http://host:port of this section.",
    )


class ControlCenterSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the control center binds to.")
    port: int = Field(8081, ge=0, le=65535, description="Port of the control center.")
    issuer: str = Field("prvng-control-center", description="`iss` of the access tokens.")
    audience: str = Field("prvng", description="`aud` of the access tokens.")
    access_ttl_s: float = Field(900, gt=0, le=86400, description="Life of an access token.")
    refresh_idle_s: float = Field(
        7 * 86400, gt=0, description="A refresh token unused this long expires (idle timeout)."
    )
    refresh_absolute_s: float = Field(
        30 * 86400, gt=0, description="A login expires this long after it began, whatever use."
    )
    key_overlap_s: float = Field(
        1800, gt=0, description="How long a rotated-out signing key stays in the JWKS."
    )
    admin_password: str = Field(
        "",
        description="Password of the first `admin` (PRVNG_CONTROL_CENTER__ADMIN_PASSWORD); "
        "empty generates one and prints it once.",
        repr=False,
    )
    url: str = Field(
        "",
        description="URL other services use to reach the control center (JWKS, API keys); "
        "empty: http://host:port.",
    )
    service_api_key: str = Field(
        "",
        description="API key (scope audit:write) with which a service running apart from the "
        "control center forwards its audit events; empty: they wait in the service's outbox.",
        repr=False,
    )
    mfa_required_roles: list[str] = Field(
        default_factory=list,
        description="Users holding one of these roles must use TOTP; until they enrol, their "
        "login may do nothing but enrol.",
    )
    workspaces: list[str] = Field(
        default_factory=list,
        description="Workspace folders whose Nickel files the control center manages (`/config` "
        "API): absolute paths, each `name=/path` or just `/path` (its id is the folder's name).",
    )
    nickel_timeout_s: float = Field(
        10,
        gt=0,
        le=3600,
        description="Longest evaluation of Nickel sent by users (a workflow submitted in the web "
        "UI, a workspace file validated or written through `/config`), in a child process "
        "that is killed when it takes longer.",
    )
    nickel_memory_mb: int = Field(
        1024,
        ge=128,
        le=1024 * 1024,
        description="Memory (address space) of the child process evaluating Nickel sent by "
        "users; an evaluation that needs more is stopped.",
    )


class OpsKeeperSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the ops-keeper API binds to.")
    port: int = Field(8084, ge=0, le=65535, description="Port of the ops-keeper API.")
    policy_file: str = Field(
        "",
        description="The keeper's policy (Nickel, contract schemas/keeper_policy.ncl); empty: "
        "`<home>/config/keeper_policy.ncl`, written with the default policy when absent. A "
        "relative path is taken from the data dir.",
    )
    token_audience: str = Field(
        "prvng-ops", description="`aud` of the signed operation tokens (checked by the controller)."
    )
    issuer: str = Field("prvng-ops-keeper", description="`iss` of the signed operation tokens.")
    key_overlap_s: float = Field(
        1800,
        gt=0,
        description="How long a rotated-out signing key stays in the JWKS; at least the longest "
        "token_ttl_s of the policy, so tokens signed before a rotation still verify.",
    )
    approval_ttl_s: float = Field(
        86400, gt=0, description="An operation waiting for approval expires after this."
    )
    reload_interval_s: float = Field(
        2, gt=0, le=3600, description="How often the policy file is checked for changes."
    )
    url: str = Field(
        "",
        description="URL other services use to reach the keeper (its JWKS); empty: its key "
        "ring in this data dir (the embedded platform).",
    )


class OpsControllerSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the ops-controller's health API binds to.")
    port: int = Field(8085, ge=0, le=65535, description="Port of the ops-controller's health API.")
    idempotency: Literal["state", "surrealdb"] = Field(
        "state",
        description="Where claimed op ids are kept: `state` (the platform's SQLite or "
        "PostgreSQL store) or `surrealdb` (embedded SurrealDB, file store `surreal_path`).",
    )
    surreal_path: str = Field(
        "",
        description='SurrealDB file store for `idempotency = "surrealdb"`; empty: '
        "`<home>/state/ops-idempotency.surreal`. A relative path is taken from the data dir.",
    )
    api_key: str = Field(
        "",
        description="An API key with `workflow:read`, used at start to settle ops a crash left "
        "`dispatched` by asking the orchestrator; empty: the redelivered message settles them.",
    )
    embedded: bool = Field(
        True,
        description="Run a controller inside `prvng platform start`; false when controllers "
        "run as their own processes (`prvng serve ops-controller`).",
    )
    batch: int = Field(16, ge=1, le=1000, description="Messages fetched at once.")
    max_delay_s: float = Field(
        60, gt=0, description="Longest Nak delay while the orchestrator is unreachable."
    )
    heartbeat_s: float = Field(
        10, gt=0, description="In-progress acks are sent this often during a slow dispatch."
    )


class AuditMirrorSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the audit-mirror's health API binds to.")
    port: int = Field(8086, ge=0, le=65535, description="Port of the audit-mirror's health API.")
    repo: str = Field(
        "",
        description="The git repository the audit events are committed to (bare, initialised "
        "when missing); empty: `<home>/audit-mirror/repo.git`. Relative: from the data dir.",
    )
    state_dir: str = Field(
        "",
        description="Signing key, allowed signers, index and external checkpoint; empty: "
        "`<home>/audit-mirror/state`. Keep it off the repository's disk to make the "
        "checkpoint worth something.",
    )
    remotes: list[str] = Field(
        default_factory=list,
        description="Git remotes (names or URLs) pushed to after each batch; `rad` (Radicle) "
        "is skipped when the `rad` CLI is not installed.",
    )
    embedded: bool = Field(
        True,
        description="Run the audit-mirror inside `prvng platform start`; false when it runs as "
        "its own process (`prvng serve audit-mirror`).",
    )
    batch: int = Field(100, ge=1, le=10000, description="Events fetched (and committed) at once.")


class Settings(_Section):
    """Every setting of the platform; one section per service."""

    home: Path = Field(default_factory=default_home, description="Data dir (PRVNG_HOME).")
    log: LogSettings = Field(default_factory=LogSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    orchestrator: OrchestratorSettings = Field(default_factory=OrchestratorSettings)
    control_center: ControlCenterSettings = Field(default_factory=ControlCenterSettings)
    ops_keeper: OpsKeeperSettings = Field(default_factory=OpsKeeperSettings)
    ops_controller: OpsControllerSettings = Field(default_factory=OpsControllerSettings)
    audit_mirror: AuditMirrorSettings = Field(default_factory=AuditMirrorSettings)

    @property
    def config_file(self) -> Path:
        return self.home / "config" / "platform.ncl"

    @property
    def state_url(self) -> str:
        """The SQLAlchemy async URL of the state store."""
        url = self.state.url or f"sqlite:///{self.home / 'state' / 'platform.db'}"
        return to_async_url(url)

    def task_env(self) -> dict[str, str]:
        """What a task's ``prvng`` needs to reach this platform: its data dir, its store and
        the control center (variables, never written into a workflow)."""
        env = {"PRVNG_HOME": str(self.home), "PRVNG_CONTROL_CENTER__URL": self.control_center_url}
        if self.state.url:
            env["PRVNG_STATE__URL"] = self.state.url
        return env

    @property
    def nats_servers(self) -> list[str]:
        """The NATS URLs to connect to: ``nats.url`` split, or the embedded server's."""
        if self.nats.url.strip():
            return [u.strip() for u in self.nats.url.split(",") if u.strip()]
        return [service_url(self.nats.host, self.nats.port, scheme="nats")]

    @property
    def control_center_url(self) -> str:
        """Where other services reach the control center (JWKS, API keys, user state)."""
        cc = self.control_center
        return service_url(cc.host, cc.port, cc.url)

    @property
    def orchestrator_url(self) -> str:
        """Where other services reach the orchestrator (``orchestrator.url`` or host:port)."""
        o = self.orchestrator
        return service_url(o.host, o.port, o.url)

    def data_path(self, configured: str, default: str) -> Path:
        """A path setting: ``configured`` (``~`` expanded; relative to the data dir), or
        ``default`` under the data dir when it is empty."""
        if not configured.strip():
            return self.home / default
        path = Path(configured.strip()).expanduser()
        return path if path.is_absolute() else self.home / path

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name.removeprefix(ENV_PREFIX).lower().partition("__")
        if section not in Settings.model_fields or not key:
            continue
        value: Any = raw
        if not _is_text_field(section, key):
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
        layer.setdefault(section, {})[key] = value
    if "PRVNG_ADMIN_PASSWORD" in env:
        layer.setdefault("control_center", {})["admin_password"] = env["PRVNG_ADMIN_PASSWORD"]
    return layer


def _is_text_field(section: str, key: str) -> bool:
    model = Settings.model_fields[section].annotation
    fields = getattr(model, "model_fields", {})
    return key in fields and fields[key].annotation is str


def _describe(err: PydanticValidationError, sources: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        src = sources.get(loc, "defaults")
        lines.append(f"{loc} (from {src}): {e['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def _flatten(prefix: str, layer: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in layer.items():
        loc = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(_flatten(loc, value))
        else:
            out[loc] = ""
    return out


def load_settings(
    *,
    home: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from every layer.

    ``overrides`` are the CLI flags as a nested mapping (``{"orchestrator": {"port": 9000}}``);
    ``None`` values in it are ignored.

    Raises:
        ConfigError: a value has the wrong type or range; the message names the setting and
            the layer it came from.
        NickelError: ``platform.ncl`` does not evaluate or breaks its contract.
    """
    env = os.environ if env is None else env
    flags = _drop_none(overrides or {})
    home_path = Path(
        str(home or flags.get("home") or env.get("PRVNG_HOME") or default_home())
    ).expanduser()
    config_file = home_path / "config" / "platform.ncl"
    file_layer: dict[str, Any] = {}
    if config_file.is_file():
        value = evaluate_file(
            config_file, wrap=f"({{file}}) | {contract('platform.ncl', 'Platform')}"
        )
        if not isinstance(value, dict):
            raise ConfigError(f"{config_file} must evaluate to a record")
        file_layer = value
    env_layer = _env_layer(env)
    sources: dict[str, str] = {}
    for name, layer in (("platform.ncl", file_layer), ("environment", env_layer), ("flags", flags)):
        sources.update({k: name for k in _flatten("", layer)})
    merged = _merge(_merge(file_layer, env_layer), flags)
    merged["home"] = home_path
    try:
        return Settings.model_validate(merged)
    except PydanticValidationError as exc:
        raise ConfigError(_describe(exc, sources)) from None


def _drop_none(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            inner = _drop_none(value)
            if inner:
                out[key] = inner
        elif value is not None:
            out[key] = value
    return out
