"""Authorization: every permission question of the platform, answered by Cedar.

An :class:`Authorizer` loads the default policy set shipped in ``policies/default.cedar`` plus
every ``*.cedar`` file of the site's policy directories (``<home>/config/policies/``), checks each
file against ``policies/schema.cedarschema`` and parses the whole set **once** into a
``cedarpy.PolicySet``; :meth:`Authorizer.decide` then builds the few entities a request needs
(the user with its roles, the object, its environment) and asks Cedar::

    authz = Authorizer([home / "config" / "policies"])
    who = Principal("alice", roles=frozenset({"developer"}))
    wf = Resource("Workflow", "wf_1", owner="alice", environment=Environment("dev"))
    authz.decide(who, "workflow:cancel", wf)
    # Decision(allowed=True, policies=['developer-own'], errors=[])

Rules that hold whatever the site adds: deny by default (an action missing from
:data:`ACTIONS`, an unknown resource type or any Cedar error denies); a ``forbid`` beats every
``permit``; a disabled user can do nothing; a principal acting through an API key with scopes is
limited to those scopes (the Cedar policy ``forbid-apikey-out-of-scope``, fed by the request
context). The role-by-action matrix is in ``docs/reference/access-control.md``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cedarpy

from provisioning.core.errors import ConfigError

__all__ = [
    "ACTIONS",
    "DEFAULT_POLICY_FILE",
    "RESOURCE_TYPES",
    "ROLES",
    "SCHEMA_FILE",
    "Authorizer",
    "Decision",
    "Environment",
    "PolicyInfo",
    "Principal",
    "Resource",
]

POLICY_DIR = Path(__file__).parent / "policies"
DEFAULT_POLICY_FILE = POLICY_DIR / "default.cedar"
SCHEMA_FILE = POLICY_DIR / "schema.cedarschema"

#: Every action a route, the CLI or the UI may ask about: name → one-line description.
#: ``schema.cedarschema`` declares the same names (a unit test checks).
ACTIONS: dict[str, str] = {
    "workflow:create": "submit a workflow",
    "workflow:read": "list and show workflows",
    "workflow:cancel": "cancel a workflow",
    "workflow:control": "pause, resume, retry or roll back a workflow",
    "task:read": "list and show the tasks of a workflow",
    "task:logs": "read and follow a task's output",
    "ops:request": "request an operation",
    "ops:approve": "approve or reject a pending operation",
    "ops:freeze": "start or end a change freeze",
    "ops:read": "list and show operations and approvals",
    "user:manage": "create, disable and delete users, assign roles",
    "user:read": "list and show users",
    "role:manage": "create, change and delete roles",
    "apikey:manage": "create, list and revoke one's own API keys",
    "apikey:admin": "list and revoke anybody's API keys",
    "audit:read": "search the audit log",
    "audit:export": "export the audit log",
    "audit:write": "forward another service's audit events into the log (service API keys)",
    "config:read": "read workspace configuration",
    "config:write": "edit workspace configuration",
    "system:read": "see service health and metrics",
    "keys:rotate": "rotate the token signing keys",
    "authz:check": "ask whether an action would be allowed",
    "server:create": "create servers",
    "server:delete": "delete servers",
    "server:read": "list the servers' inventory",
    "taskserv:create": "install and remove task services",
    "cluster:create": "form and dissolve clusters",
    "extension:read": "list and show extensions",
    "extension:publish": "publish an extension to the registry",
}

#: The roles the default policy set knows: name → one-line description.
ROLES: dict[str, str] = {
    "admin": "everything",
    "operator": "runs and controls workflows and operations, approves operations, reads audit",
    "developer": "runs and controls own workflows, reads own tasks and logs, requests operations",
    "viewer": "reads workflows, tasks, operations, configuration and health; no logs",
    "auditor": "reads and exports the audit log, reads everything, changes nothing",
}

#: Entity types a :class:`Resource` may have (declared in ``schema.cedarschema``).
RESOURCE_TYPES: frozenset[str] = frozenset(
    {
        "Platform",
        "Workspace",
        "Environment",
        "Server",
        "Taskserv",
        "Cluster",
        "Workflow",
        "Task",
        "Operation",
        "User",
        "Role",
        "ApiKey",
        "Extension",
    }
)
# Referenced by id only: their entities carry nothing a policy may read about another user.
_ID_ONLY_TYPES = frozenset({"User", "Role"})
_CONTEXT_KEYS = frozenset({"mfa", "approved"})
_ACTION_REFS: dict[str, dict[str, Any]] = {
    name: {"__entity": {"type": "Action", "id": name}} for name in ACTIONS
}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who asks: a user, its roles and the state of its session.

    ``scopes`` is ``None`` unless the request came through an API key with scopes; then it holds
    the action names the key may use (names not in :data:`ACTIONS` grant nothing).
    """

    user_id: str
    roles: frozenset[str] = frozenset()
    disabled: bool = False
    mfa: bool = False
    scopes: frozenset[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", frozenset(self.roles))
        if self.scopes is not None:
            object.__setattr__(self, "scopes", frozenset(self.scopes))


@dataclass(frozen=True, slots=True)
class Environment:
    """An environment an object lives in, with the protections it demands."""

    id: str
    production: bool = False
    requires_mfa: bool = False
    requires_approval: bool = False
    workspace: str | None = None


@dataclass(frozen=True, slots=True)
class Resource:
    """What is acted on: an entity type of :data:`RESOURCE_TYPES` and an id.

    ``owner`` is the user id that created the object; ``attributes`` become Cedar entity tags
    (``resource.getTag("team")``). A resource of type ``Environment`` carries its own
    :class:`Environment` (see :meth:`of_environment`); ``User`` and ``Role`` resources are
    referenced by id only. Collections and platform-wide actions use :meth:`platform`.

    Raises:
        ValueError: an ``Environment`` resource without a matching ``environment``.
    """

    type: str
    id: str
    owner: str | None = None
    environment: Environment | None = None
    workspace: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type == "Environment" and (
            self.environment is None or self.environment.id != self.id
        ):
            raise ValueError("an Environment resource needs environment=Environment(<same id>)")

    @classmethod
    def platform(cls) -> Resource:
        """The platform itself: the target of collection and platform-wide actions."""
        return cls("Platform", "platform")

    @classmethod
    def of_environment(cls, env: Environment) -> Resource:
        """The environment ``env`` itself as the resource."""
        return cls("Environment", env.id, environment=env, workspace=env.workspace)


@dataclass(frozen=True, slots=True)
class Decision:
    """Cedar's answer: ``policies`` names the determining policies (their ``@id``), ``errors``
    says why a request could not be evaluated (any error denies)."""

    allowed: bool
    policies: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """One loaded policy: its name (``@id``, or ``<file>:<line>`` without one) and origin."""

    name: str
    effect: str
    file: Path
    line: int


@dataclass(frozen=True, slots=True)
class _Loaded:
    policy_set: cedarpy.PolicySet
    names: dict[str, str]
    order: dict[str, int]
    policies: tuple[PolicyInfo, ...]


@lru_cache(maxsize=1)
def _schema() -> tuple[cedarpy.Schema, cedarpy.Entities]:
    """The parsed schema and the base entities built from it (the action groups)."""
    schema = cedarpy.Schema.from_str(SCHEMA_FILE.read_text(encoding="utf-8"))
    return schema, cedarpy.Entities.from_json_str("[]", schema)


class Authorizer:
    """The loaded policy set and the decisions made with it; safe to share between threads.

    Args:
        policy_dirs: the site's policy directories, loaded after the default set in this order,
            each file by name; a directory that does not exist is skipped.

    Raises:
        ConfigError: a policy file does not parse or does not fit the schema (the message names
            the file, line and column), or two policies share an ``@id``.
    """

    def __init__(self, policy_dirs: Sequence[Path] = ()) -> None:
        self._dirs = [Path(d) for d in policy_dirs]
        self._lock = threading.Lock()
        self._loaded = self._load()

    @property
    def policies(self) -> tuple[PolicyInfo, ...]:
        """Every loaded policy in evaluation-set order (the default set first)."""
        return self._loaded.policies

    def reload(self) -> None:
        """Read the policy files again; on error keep the last good set.

        Raises:
            ConfigError: as in the constructor; the previous policies stay in force.
        """
        with self._lock:  # one reload at a time; readers see the old or the new set, whole
            self._loaded = self._load()

    def decide(
        self,
        principal: Principal,
        action: str,
        resource: Resource,
        context: Mapping[str, bool] | None = None,
    ) -> Decision:
        """May ``principal`` do ``action`` on ``resource``?

        ``context`` may set ``approved`` (the operation was approved) and ``mfa`` (defaults to
        ``principal.mfa``). Bad input (an unknown action, resource type or context key) is a
        denial naming the problem in ``errors``, never an exception.
        """
        return self.decide_many(principal, action, [resource], context)[0]

    def decide_many(
        self,
        principal: Principal,
        action: str,
        resources: Sequence[Resource],
        context: Mapping[str, bool] | None = None,
    ) -> list[Decision]:
        """:meth:`decide` for many resources in one Cedar call (filtering a listing)."""
        problem = _check_request(action, context)
        if problem is not None:
            return [Decision(False, [], [problem]) for _ in resources]
        out: list[Decision | None] = [None] * len(resources)
        batch: list[int] = []
        entities: dict[tuple[str, str], dict[str, Any]] = {
            ("User", principal.user_id): _user_entity(principal)
        }
        for i, resource in enumerate(resources):
            if resource.type not in RESOURCE_TYPES:
                out[i] = Decision(False, [], [f"unknown resource type {resource.type!r}"])
            elif _merge(entities, _resource_entities(principal, resource)):
                batch.append(i)
            else:  # the same entity described twice differently: decide it on its own
                own = {("User", principal.user_id): _user_entity(principal)}
                _merge(own, _resource_entities(principal, resource))
                out[i] = self._ask(principal, action, [resource], own, context)[0]
        if batch:
            answers = self._ask(principal, action, [resources[i] for i in batch], entities, context)
            for i, answer in zip(batch, answers, strict=True):
                out[i] = answer
        return [d for d in out if d is not None]

    def _ask(
        self,
        principal: Principal,
        action: str,
        resources: Sequence[Resource],
        entities: dict[tuple[str, str], dict[str, Any]],
        context: Mapping[str, bool] | None,
    ) -> list[Decision]:
        loaded = self._loaded
        schema, base = _schema()
        cedar_context = {
            "mfa": bool((context or {}).get("mfa", principal.mfa)),
            "approved": bool((context or {}).get("approved", False)),
            "scoped": principal.scopes is not None,
            "scopes": [_ACTION_REFS[s] for s in sorted(principal.scopes or ()) if s in ACTIONS],
        }
        requests = [
            {
                "principal": {"type": "User", "id": principal.user_id},
                "action": {"type": "Action", "id": action},
                "resource": {"type": r.type, "id": r.id},
                "context": cedar_context,
            }
            for r in resources
        ]
        try:
            request_entities = base.with_added_json_str(json.dumps(list(entities.values())))
        except ValueError as exc:
            return [Decision(False, [], [f"entities: {exc}"]) for _ in resources]
        results = cedarpy.is_authorized_batch(requests, loaded.policy_set, request_entities, schema)
        decisions = []
        for result in results:
            errors = [str(e) for e in result.diagnostics.errors]
            # Cedar reports reasons in no stable order: give them in policy-set order.
            reasons = sorted(result.diagnostics.reasons, key=lambda p: loaded.order.get(p, -1))
            names = [loaded.names.get(p, p) for p in reasons]
            decisions.append(Decision(result.allowed and not errors, names, errors))
        return decisions

    def _load(self) -> _Loaded:
        files = [DEFAULT_POLICY_FILE]
        for d in self._dirs:
            if d.is_dir():
                files.extend(sorted(p for p in d.glob("*.cedar") if p.is_file()))
            elif d.exists():
                raise ConfigError(f"{d}: a policy directory is expected here", file=str(d))
        schema, _ = _schema()
        texts: list[str] = []
        infos: list[PolicyInfo] = []
        for path in files:
            text, file_infos = _check_file(path, schema)
            texts.append(text)
            infos.extend(file_infos)
        seen: dict[str, PolicyInfo] = {}
        for info in infos:
            if info.name in seen:
                first = seen[info.name]
                raise ConfigError(
                    f"{info.file}:{info.line}: policy id {info.name!r} is already used at "
                    f"{first.file}:{first.line}; give each policy its own @id",
                    file=str(info.file),
                    line=info.line,
                )
            seen[info.name] = info
        # Files that parse alone parse together; ids are positional over the concatenation.
        policy_set = cedarpy.PolicySet.from_str("\n".join(texts))
        names = {f"policy{i}": info.name for i, info in enumerate(infos)}
        order = {f"policy{i}": i for i in range(len(infos))}
        return _Loaded(policy_set, names, order, tuple(infos))


def _check_request(action: str, context: Mapping[str, bool] | None) -> str | None:
    if action not in ACTIONS:
        return f"unknown action {action!r}"
    unknown = sorted(set(context or {}) - _CONTEXT_KEYS)
    if unknown:
        return f"unknown context keys {unknown}; allowed: {sorted(_CONTEXT_KEYS)}"
    return None


def _ref(type_: str, id_: str) -> dict[str, Any]:
    return {"__entity": {"type": type_, "id": id_}}


def _user_entity(principal: Principal) -> dict[str, Any]:
    return {
        "uid": {"type": "User", "id": principal.user_id},
        "attrs": {"disabled": principal.disabled},
        "parents": [{"type": "Role", "id": r} for r in sorted(principal.roles)],
    }


def _environment_entity(env: Environment, tags: Mapping[str, str]) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "production": env.production,
        "requires_mfa": env.requires_mfa,
        "requires_approval": env.requires_approval,
    }
    if env.workspace is not None:
        attrs["workspace"] = _ref("Workspace", env.workspace)
    return {
        "uid": {"type": "Environment", "id": env.id},
        "attrs": attrs,
        "parents": [],
        "tags": {k: str(v) for k, v in tags.items()},
    }


def _resource_entities(principal: Principal, r: Resource) -> list[dict[str, Any]]:
    if r.type == "Environment" and r.environment is not None:
        return [_environment_entity(r.environment, r.attributes)]
    out = []
    if r.environment is not None:
        out.append(_environment_entity(r.environment, {}))
    if r.type not in _ID_ONLY_TYPES:
        attrs: dict[str, Any] = {}
        if r.owner is not None:
            attrs["owner"] = _ref("User", r.owner)
        if r.environment is not None:
            attrs["environment"] = _ref("Environment", r.environment.id)
        if r.workspace is not None:
            attrs["workspace"] = _ref("Workspace", r.workspace)
        tags = {k: str(v) for k, v in r.attributes.items()}
        uid = {"type": r.type, "id": r.id}
        out.append({"uid": uid, "attrs": attrs, "parents": [], "tags": tags})
    return out


def _merge(into: dict[tuple[str, str], dict[str, Any]], entities: list[dict[str, Any]]) -> bool:
    """Add ``entities`` to ``into``; False (and nothing added) if one conflicts."""
    keyed = {(e["uid"]["type"], e["uid"]["id"]): e for e in entities}
    if any(k in into and into[k] != e for k, e in keyed.items()):
        return False
    into.update(keyed)
    return True


# ---- loading and locating errors -----------------------------------------------------------

_TOKEN = re.compile(
    r'(?P<skip>\s+|//[^\n]*)|(?P<tok>"(?:[^"\\\n]|\\.)*"|[A-Za-z_][A-Za-z0-9_]*|\d+'
    r"|==|!=|<=|>=|&&|\|\||::|.)",
    re.DOTALL,
)


def _statements(text: str) -> list[tuple[int, list[tuple[int, int]]]]:
    """Split policy text into statements: (start offset, token spans), ``;`` included."""
    out: list[tuple[int, list[tuple[int, int]]]] = []
    tokens: list[tuple[int, int]] = []
    for m in _TOKEN.finditer(text):
        if m.group("tok") is None:
            continue
        tokens.append(m.span())
        if m.group("tok") == ";":
            out.append((tokens[0][0], tokens))
            tokens = []
    if tokens:
        out.append((tokens[0][0], tokens))
    return out


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _parse_error_offset(text: str) -> int:
    """Best effort: where in ``text`` the parse error is (cedarpy's errors carry no location).

    Finds the first statement that fails alone, then the first token whose inclusion turns
    "unexpected end of input" into another error; an error found only once the statement is
    complete (``'=' is not a valid operator``) points at what it quotes.
    """
    for start, tokens in _statements(text):
        end = tokens[-1][1]
        try:
            cedarpy.PolicySet.from_str(text[start:end])
            continue
        except ValueError as exc:
            message = str(exc)
        quoted = re.search(r"[`']([^`']+)[`']", message)
        if quoted and not message.startswith("unexpected token"):
            found = text.find(quoted.group(1), start, end)
            if found >= 0:
                return found
        for tok_start, tok_end in tokens:
            try:
                cedarpy.PolicySet.from_str(text[start:tok_end])
            except ValueError as exc:
                if "end of input" not in str(exc):
                    return tok_start
        return start
    return 0


def _check_file(path: Path, schema: cedarpy.Schema) -> tuple[str, list[PolicyInfo]]:
    """Read, parse and validate one policy file.

    Raises:
        ConfigError: unreadable, unparsable, templates, or not valid against the schema.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the policy file: {exc}", file=str(path)) from exc

    def fail(offset: int, message: str) -> ConfigError:
        line, col = _line_col(text, offset)
        return ConfigError(f"{path}:{line}:{col}: {message}", file=str(path), line=line, column=col)

    try:
        est = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        raise fail(_parse_error_offset(text), str(exc)) from exc
    statements = _statements(text)
    policies: dict[str, Any] = est.get("staticPolicies", {})
    if est.get("templates"):
        raise fail(0, "policy templates (?principal, ?resource) are not supported here")
    if len(statements) != len(policies):  # the tokenizer disagrees with Cedar: no line numbers
        statements = [(0, [])] * len(policies)
    starts = [start for start, _ in statements]
    result = cedarpy.validate_policies(text, schema)
    if not result.validation_passed:
        first = result.errors[0]
        digits = first.policy_id.removeprefix("policy")
        offset = starts[int(digits)] if digits.isdigit() and int(digits) < len(starts) else 0
        more = f" (and {len(result.errors) - 1} more)" if len(result.errors) > 1 else ""
        name = result.id_annotations_by_policy_id.get(first.policy_id, first.policy_id)
        error = first.error.replace(f"`{first.policy_id}`", repr(name))
        raise fail(offset, f"does not fit the schema: {error}{more}")
    infos = []
    for i, start in enumerate(starts):
        policy = policies[f"policy{i}"]
        line, _ = _line_col(text, start)
        name = policy.get("annotations", {}).get("id") or f"{path.name}:{line}"
        infos.append(PolicyInfo(str(name), str(policy["effect"]), path, line))
    return text, infos
