"""The ops keeper's policies: which operation requests are approved, rejected or need approval.

A policy file (``keeper_policy.ncl``, contract ``schemas/keeper_policy.ncl``) is an ordered list
of policies with globs on ``op_types``, ``images`` and ``targets``::

    req = OpRequest(op_type="server.delete", target="prod/web-01", requester="alice")
    PolicySet.load(path).decide(req, freezes=active_freezes)
    # Decision(decision='require_approval', policy='prod-destructive-needs-approval', ...)

The rules, in order:

1. An active change freeze whose ``scope`` glob matches the target rejects, whatever the policies
   say (``Decision.frozen_by`` names it).
2. The first policy whose three glob lists all match decides.
3. No match rejects.

Globs are :func:`fnmatch.fnmatchcase` patterns (case-sensitive; ``*`` also matches ``/``). A
request without an image matches only an ``images`` list that contains ``"*"``.

:class:`PolicyFile` keeps the policy of a file current: :meth:`PolicyFile.reload_if_changed` (and
the :func:`watch` task calling it) loads the file again when it changes; a broken file keeps the
last good policy and reports Nickel's diagnostic in :meth:`PolicyFile.status`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, cast

from provisioning.core.clock import as_utc, utcnow
from provisioning.core.errors import ConfigError, ProvisioningError, ValidationError
from provisioning.core.logging import get_logger
from provisioning.core.nickel import contract, evaluate_file

__all__ = [
    "DECISIONS",
    "DEFAULT_APPROVER_ROLE",
    "DEFAULT_POLICY",
    "Decision",
    "DecisionKind",
    "Freeze",
    "OpRequest",
    "Policy",
    "PolicyFile",
    "PolicySet",
    "TraceEntry",
    "watch",
]

log = get_logger("ops_keeper.policy")

DecisionKind = Literal["approve", "reject", "require_approval"]
DECISIONS: tuple[DecisionKind, ...] = ("approve", "reject", "require_approval")
DEFAULT_APPROVER_ROLE = "operator"
DEFAULT_TOKEN_TTL_S = 300
_MIN_TTL_S, _MAX_TTL_S = 10, 86400
_MatchField = Literal["op_types", "images", "targets"]

DEFAULT_POLICY = """\
# Policy of the ops keeper, written because no policy file existed. Edit it freely: the keeper
# loads it again when it changes, and a broken edit keeps the last good policy (the keeper's
# status shows Nickel's error). Contract: `schemas/keeper_policy.ncl` of the provisioning package.
#
# Each operation request (op_type like "server.delete", image like "registry/app:1.2", target
# like "prod/web-01") is checked against the policies in order; the first policy whose
# `op_types`, `images` and `targets` globs all match decides. No match rejects. An active change
# freeze covering the target rejects before any policy is looked at.
#
# This default:
#   1. read-only operations (*.get, *.list, *.show, *.status) are approved on every target;
#   2. deleting or removing anything in prod/* needs the approval of an `operator`;
#   3. anything else in dev/* is approved;
#   4. the rest (other changes in prod/*, any other target) is rejected: add a policy above
#      `reject-the-rest` to allow it.
{
  policies = [
    {
      name = "read-only",
      description = "Reading changes nothing, anywhere.",
      op_types = ["*.get", "*.list", "*.show", "*.status"],
      decision = "approve",
      reason = "read-only operations change nothing",
    },
    {
      name = "prod-destructive-needs-approval",
      description = "Deleting or removing in production needs a second pair of eyes.",
      op_types = ["*.delete", "*.remove"],
      targets = ["prod/*"],
      decision = "require_approval",
      approver_role = "operator",
      # The signed operation token must be used within 5 minutes of the approval.
      token_ttl_s = 300,
      reason = "destructive operations in production need an operator's approval",
    },
    {
      name = "dev-anything",
      description = "Development targets are disposable.",
      targets = ["dev/*"],
      decision = "approve",
      token_ttl_s = 900,
      reason = "anything goes on development targets",
    },
    {
      name = "reject-the-rest",
      description = "Explicit default: what no policy above allows is rejected.",
      decision = "reject",
      reason = "not allowed by the default policy; add a policy above `reject-the-rest`",
    },
  ],
}
"""


@dataclass(frozen=True, slots=True)
class OpRequest:
    """An operation somebody asks the keeper to allow."""

    op_type: str
    target: str
    image: str | None = None
    requester: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Freeze:
    """A change freeze: operations on targets matching ``scope`` are rejected until ``until``
    (``None``: until the freeze is lifted). A naive ``until`` is taken as UTC."""

    id: str
    reason: str = ""
    scope: str = "*"
    until: datetime | None = None
    created_by: str = ""

    def is_active(self, now: datetime) -> bool:
        """True while ``now`` is before ``until`` (always, without ``until``)."""
        until = as_utc(self.until)
        return until is None or cast(datetime, as_utc(now)) < until

    def covers(self, target: str) -> bool:
        """True if the freeze's ``scope`` glob matches ``target``."""
        return fnmatchcase(target, self.scope)

    def describe(self, target: str) -> str:
        """The reason of a rejection by this freeze."""
        why = f" ({self.reason})" if self.reason else ""
        until = as_utc(self.until)
        end = f"until {until.isoformat()}" if until is not None else "until it is lifted"
        return f"change freeze {self.id}{why} covers target {target} {end}"


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """How one policy compared with the request: matched, or the first field that did not."""

    policy: str
    matched: bool
    field: _MatchField | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "matched": self.matched,
            "field": self.field,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """The keeper's answer to a request, with the reason in words and the policies it compared.

    ``trace`` lists the policies checked in order up to the one that matched (all of them when
    none matched); it is filled in under a freeze too, to show what would happen without it.
    ``approver_role`` is set for ``require_approval`` only; ``token_ttl_s`` for every decision a
    policy made that is not ``reject``.
    """

    decision: DecisionKind
    policy: str | None
    reason: str
    approver_role: str | None = None
    token_ttl_s: int | None = None
    frozen_by: str | None = None
    trace: tuple[TraceEntry, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "policy": self.policy,
            "reason": self.reason,
            "approver_role": self.approver_role,
            "token_ttl_s": self.token_ttl_s,
            "frozen_by": self.frozen_by,
            "trace": [t.to_dict() for t in self.trace],
        }


def _quoted(globs: Iterable[str]) -> str:
    return ", ".join(f'"{g}"' for g in globs)


@dataclass(frozen=True, slots=True)
class Policy:
    """One ``PolicyDef`` of the policy file."""

    name: str
    decision: DecisionKind
    op_types: tuple[str, ...] = ("*",)
    images: tuple[str, ...] = ("*",)
    targets: tuple[str, ...] = ("*",)
    approver_role: str | None = None
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S
    description: str = ""
    reason: str = ""

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Policy:
        """Build a policy from a contract-checked record; ``where`` prefixes error messages.

        Raises:
            ValidationError: a field is missing or has a wrong type or value.
        """
        if not isinstance(data, dict):
            raise ValidationError(f"{where}: expected a record, got {type(data).__name__}")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ValidationError(f"{where}.name: expected a non-empty string")
        decision = data.get("decision")
        if decision not in DECISIONS:
            raise ValidationError(
                f"{where}.decision: expected one of {_quoted(DECISIONS)}, got {decision!r}"
            )
        ttl = data.get("token_ttl_s", DEFAULT_TOKEN_TTL_S)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not _MIN_TTL_S <= ttl <= _MAX_TTL_S:
            raise ValidationError(
                f"{where}.token_ttl_s: expected a whole number from {_MIN_TTL_S} to {_MAX_TTL_S}"
            )
        role = data.get("approver_role")
        if role is not None and (not isinstance(role, str) or not role):
            raise ValidationError(f"{where}.approver_role: expected a non-empty string")
        if role is not None and decision != "require_approval":
            raise ValidationError(
                f'{where}.approver_role: applies only to decision = "require_approval"'
            )
        if decision == "require_approval" and role is None:
            role = DEFAULT_APPROVER_ROLE
        return cls(
            name=name,
            decision=cast(DecisionKind, decision),
            op_types=_globs(data, "op_types", where),
            images=_globs(data, "images", where),
            targets=_globs(data, "targets", where),
            approver_role=role,
            token_ttl_s=ttl,
            description=_text(data, "description", where),
            reason=_text(data, "reason", where),
        )

    def compare(self, req: OpRequest) -> TraceEntry:
        """Whether this policy matches ``req``; if not, the first field that does not match."""
        op = _first_match(req.op_type, self.op_types)
        if op is None:
            return self._miss("op_types", f'op_type "{req.op_type}" matches none of', self.op_types)
        if req.image is None:
            if "*" not in self.images:
                return self._miss(
                    "images",
                    'the request has no image, which only "*" matches; images are',
                    self.images,
                )
            image = 'no image (images "*")'
        else:
            glob = _first_match(req.image, self.images)
            if glob is None:
                return self._miss("images", f'image "{req.image}" matches none of', self.images)
            image = f'image "{req.image}" by "{glob}"'
        target = _first_match(req.target, self.targets)
        if target is None:
            return self._miss("targets", f'target "{req.target}" matches none of', self.targets)
        detail = f'op_type "{req.op_type}" by "{op}", {image}, target "{req.target}" by "{target}"'
        return TraceEntry(self.name, True, None, detail)

    def _miss(self, name: _MatchField, what: str, globs: tuple[str, ...]) -> TraceEntry:
        return TraceEntry(self.name, False, name, f"{what} {_quoted(globs)}")


def _first_match(value: str, globs: tuple[str, ...]) -> str | None:
    return next((g for g in globs if fnmatchcase(value, g)), None)


def _globs(data: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = data.get(key, ["*"])
    if not isinstance(value, list) or not value or not all(isinstance(g, str) and g for g in value):
        raise ValidationError(f"{where}.{key}: expected a non-empty array of non-empty globs")
    return tuple(value)


def _text(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ValidationError(f"{where}.{key}: expected a string")
    return value


_VERBS: dict[DecisionKind, str] = {
    "approve": "approved",
    "reject": "rejected",
    "require_approval": "needs approval",
}


@dataclass(frozen=True, slots=True)
class PolicySet:
    """The ordered policies of one policy file."""

    policies: tuple[Policy, ...] = ()
    source: str = ""

    @classmethod
    def load(cls, path: Path) -> PolicySet:
        """Evaluate a policy file with the ``KeeperPolicy`` contract.

        Raises:
            NickelError: the file is missing, does not evaluate or breaks the contract (Nickel's
                diagnostic names the file and line).
            ValidationError: two policies have the same name.
        """
        wrap = f"({{file}}) | {contract('keeper_policy.ncl', 'KeeperPolicy')}"
        data = evaluate_file(path, wrap=wrap)
        return cls.from_data(data, source=str(path.resolve()))

    @classmethod
    def from_data(cls, data: Any, source: str = "") -> PolicySet:
        """Build a policy set from ``{"policies": [...]}`` data (a contract-checked file).

        Raises:
            ValidationError: the data is malformed or two policies have the same name; the
                message starts with ``source``.
        """
        prefix = f"{source}: " if source else ""
        if not isinstance(data, dict) or not isinstance(data.get("policies"), list):
            raise ValidationError(f"{prefix}expected a record {{ policies = [ ... ] }}")
        policies = tuple(
            Policy.from_dict(p, f"{prefix}policies[{i}]") for i, p in enumerate(data["policies"])
        )
        seen: dict[str, int] = {}
        for i, policy in enumerate(policies):
            if policy.name in seen:
                raise ValidationError(
                    f'{prefix}policy name "{policy.name}" is used by policies[{seen[policy.name]}]'
                    f" and policies[{i}]; give each policy a name of its own",
                    source=source,
                    policy=policy.name,
                )
            seen[policy.name] = i
        return cls(policies, source)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.policies]

    def decide(
        self,
        req: OpRequest,
        freezes: Iterable[Freeze] = (),
        now: datetime | None = None,
    ) -> Decision:
        """The decision on ``req``: an active freeze covering its target rejects; otherwise the
        first matching policy decides; no match rejects.

        ``now`` (default: the current time) decides which freezes are active.
        """
        trace: list[TraceEntry] = []
        matched: Policy | None = None
        for policy in self.policies:
            entry = policy.compare(req)
            trace.append(entry)
            if entry.matched:
                matched = policy
                break
        at = now or utcnow()
        for freeze in freezes:
            if freeze.is_active(at) and freeze.covers(req.target):
                return Decision(
                    "reject",
                    None,
                    freeze.describe(req.target),
                    frozen_by=freeze.id,
                    trace=tuple(trace),
                )
        if matched is None:
            return Decision(
                "reject", None, "no policy matched: rejected by default", trace=tuple(trace)
            )
        reason = f'{_VERBS[matched.decision]} by policy "{matched.name}"'
        if matched.decision == "require_approval":
            reason = f'needs approval by role "{matched.approver_role}" per policy "{matched.name}"'
        reason += f", which matched {trace[-1].detail}"
        if matched.reason:
            reason += f": {matched.reason}"
        return Decision(
            matched.decision,
            matched.name,
            reason,
            approver_role=matched.approver_role,
            token_ttl_s=None if matched.decision == "reject" else matched.token_ttl_s,
            trace=tuple(trace),
        )


_Signature = tuple[int, int, int, int]


class PolicyFile:
    """The policy of a file, kept current: :meth:`reload_if_changed` loads the file again when it
    changed; a broken file keeps the last good policy and records the error until a good one.

    Thread-safe: one reload runs at a time, and :attr:`current` is swapped in one step.

    Raises:
        ConfigError: the file does not exist (:meth:`with_default` writes one instead).
        NickelError, ValidationError: the file is not a valid policy (there is no last good one).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).resolve()
        self._lock = threading.Lock()
        signature = self._signature()
        if signature is None:
            raise ConfigError(
                f"ops-keeper policy file not found: {self.path}; create it (contract "
                "schemas/keeper_policy.ncl) or start the keeper with the default policy",
                path=str(self.path),
            )
        self._current = PolicySet.load(self.path)
        self._seen: _Signature | None = signature
        self.loaded_at: datetime = utcnow()
        self.last_error: str | None = None
        self.last_error_at: datetime | None = None

    @classmethod
    def with_default(cls, path: Path | str) -> PolicyFile:
        """Like ``PolicyFile(path)``, but first writes :data:`DEFAULT_POLICY` if there is no file
        at ``path`` (an existing file, even a broken one, is never overwritten)."""
        target = Path(path)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with target.open("x", encoding="utf-8") as out:
                    out.write(DEFAULT_POLICY)
            except FileExistsError:
                pass  # written meanwhile by somebody else: theirs wins
            else:
                log.info("wrote the default ops-keeper policy", extra={"path": str(target)})
        return cls(target)

    @property
    def current(self) -> PolicySet:
        """The last policy set that loaded without error."""
        return self._current

    def reload_if_changed(self) -> bool:
        """Load the file again if its modification time, size or inode changed.

        Returns True if a new policy set is now current. A broken or missing file keeps the
        current set and records :attr:`last_error`; it is not tried again until it changes.
        A reload already running in another thread makes this call return False at once.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            signature = self._signature()
            if signature == self._seen:
                return False
            self._seen = signature
            if signature is None:
                self._fail(f"ops-keeper policy file not found: {self.path}")
                return False
            try:
                policies = PolicySet.load(self.path)
            except ProvisioningError as exc:
                self._fail(exc.message)
                return False
            except Exception as exc:  # a bug or an I/O error: reported like a broken file
                self._fail(f"{type(exc).__name__}: {exc}")
                return False
            self._current = policies
            self.loaded_at = utcnow()
            self.last_error = None
            self.last_error_at = None
            log.info(
                "reloaded the ops-keeper policy",
                extra={"path": str(self.path), "policies": len(policies.policies)},
            )
            return True
        finally:
            self._lock.release()

    def status(self) -> dict[str, Any]:
        """What is loaded and whether the file on disk is broken (JSON-ready)."""
        return {
            "path": str(self.path),
            "loaded_at": self.loaded_at.isoformat(),
            "policies": len(self._current.policies),
            "last_error": self.last_error,
            "last_error_at": self.last_error_at.isoformat() if self.last_error_at else None,
        }

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.last_error_at = utcnow()
        log.warning(
            "ops-keeper policy file is broken; keeping the last good policy",
            extra={"path": str(self.path), "error": message},
        )

    def _signature(self) -> _Signature | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


async def watch(
    policy_file: PolicyFile, interval_s: float = 2.0, stop_event: asyncio.Event | None = None
) -> None:
    """Call :meth:`PolicyFile.reload_if_changed` every ``interval_s`` seconds (in a worker thread,
    so a slow evaluation does not block the event loop) until ``stop_event`` is set or the task
    is cancelled. Errors are logged, never raised: the watch keeps going."""
    if interval_s <= 0:
        raise ValueError("interval_s must be > 0")
    stop = stop_event or asyncio.Event()
    while not stop.is_set():
        try:
            await asyncio.to_thread(policy_file.reload_if_changed)
        except Exception:
            log.exception("ops-keeper policy reload failed", extra={"path": str(policy_file.path)})
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            pass
