"""Authorization with the default Cedar policy set, checked against the matrix the reference
documentation shows (``docs/reference/access-control.md`` is parsed, not copied)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from provisioning.core.errors import ConfigError
from provisioning.core.rbac import (
    ACTIONS,
    RESOURCE_TYPES,
    ROLES,
    SCHEMA_FILE,
    Authorizer,
    Environment,
    Principal,
    Resource,
)

DOC = Path(__file__).parents[2] / "docs" / "reference" / "access-control.md"
ROLE_COLUMNS = ["admin", "operator", "developer", "viewer", "auditor"]

# The resource type each action is naturally asked about.
RESOURCE_FOR = {
    "workflow": "Workflow",
    "task": "Task",
    "ops": "Operation",
    "user": "User",
    "role": "Role",
    "apikey": "ApiKey",
    "server": "Server",
    "taskserv": "Taskserv",
    "cluster": "Cluster",
    "extension": "Extension",
}


def _doc_matrix() -> dict[str, tuple[str, dict[str, str]]]:
    """``action → (description, {role: yes|own|no})`` from the documentation's table."""
    rows = {}
    pattern = re.compile(r"^\| `([a-z]+:[a-z]+)` \| (.+?) \| (.+) \|$")
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = pattern.match(line)
        if m:
            cells = [c.strip() for c in m.group(3).split("|")]
            rows[m.group(1)] = (m.group(2), dict(zip(ROLE_COLUMNS, cells, strict=True)))
    return rows


MATRIX = _doc_matrix()


@pytest.fixture(scope="module")
def authz() -> Authorizer:
    return Authorizer([])


def _objects(action: str, user: str) -> tuple[Resource, Resource]:
    """(an object ``user`` owns, an object somebody else owns) for ``action``."""
    type_ = RESOURCE_FOR.get(action.split(":")[0], "Platform")
    if type_ == "User":
        return Resource("User", user), Resource("User", "someone-else")
    return (
        Resource(type_, "own-1", owner=user, environment=Environment("dev")),
        Resource(type_, "other-1", owner="someone-else", environment=Environment("dev")),
    )


def test_the_documented_matrix_lists_exactly_the_actions_and_their_descriptions() -> None:
    assert {a: desc for a, (desc, _) in MATRIX.items()} == ACTIONS
    assert set(ROLE_COLUMNS) == set(ROLES)


def test_the_schema_declares_exactly_the_actions() -> None:
    text = SCHEMA_FILE.read_text(encoding="utf-8")
    declared = set(re.findall(r'"([a-z]+:[a-z]+)"', text))
    assert declared == set(ACTIONS)
    entity_types: set[str] = set()
    for names in re.findall(r"^entity ([A-Za-z, ]+?)(?: in \[\w+\])? *[{;]", text, re.M):
        entity_types.update(n.strip() for n in names.split(","))
    assert RESOURCE_TYPES <= entity_types


@pytest.mark.parametrize("role", ROLE_COLUMNS)
@pytest.mark.parametrize("action", sorted(MATRIX))
def test_each_role_gets_the_documented_answer(authz: Authorizer, role: str, action: str) -> None:
    expected = MATRIX[action][1][role]
    assert expected in {"yes", "own", "no"}, f"bad cell {expected!r} for {action}/{role}"
    who = Principal("u-1", roles=frozenset({role}))
    own, other = _objects(action, who.user_id)
    on_own = authz.decide(who, action, own)
    on_other = authz.decide(who, action, other)
    assert (on_own.allowed, on_other.allowed) == {
        "yes": (True, True),
        "own": (True, False),
        "no": (False, False),
    }[expected], (on_own, on_other)
    assert not on_own.errors and not on_other.errors


def test_decisions_name_the_policies_that_made_them(authz: Authorizer) -> None:
    dev = Principal("dev", roles=frozenset({"developer"}))
    wf = Resource("Workflow", "wf-1", owner="dev")
    assert authz.decide(dev, "workflow:cancel", wf).policies == ["developer-own"]
    admin = Principal("root", roles=frozenset({"admin", "operator"}))
    assert sorted(authz.decide(admin, "workflow:cancel", wf).policies) == ["admin-all", "operator"]
    nothing = authz.decide(dev, "keys:rotate", Resource.platform())
    assert (nothing.allowed, nothing.policies, nothing.errors) == (False, [], [])
    assert all(p.name for p in authz.policies)
    assert len({p.name for p in authz.policies}) == len(authz.policies)


def test_an_unknown_action_is_denied_even_to_an_admin(authz: Authorizer) -> None:
    admin = Principal("root", roles=frozenset({"admin"}))
    for action in ["workflow:explode", "read", "mutating", ""]:
        decision = authz.decide(admin, action, Resource.platform())
        assert not decision.allowed
        assert "unknown action" in decision.errors[0]


def test_bad_input_is_a_denial_that_says_why(authz: Authorizer) -> None:
    admin = Principal("root", roles=frozenset({"admin"}))
    unknown_type = authz.decide(admin, "workflow:read", Resource("Spaceship", "x"))
    assert not unknown_type.allowed and "Spaceship" in unknown_type.errors[0]
    bad_context = authz.decide(admin, "workflow:read", Resource.platform(), {"sudo": True})
    assert not bad_context.allowed and "sudo" in bad_context.errors[0]


def test_a_user_without_roles_can_only_ask_and_see_itself(authz: Authorizer) -> None:
    nobody = Principal("nobody")
    allowed = {
        action
        for action in ACTIONS
        if authz.decide(nobody, action, _objects(action, "nobody")[0]).allowed
    }
    assert allowed == {"authz:check", "user:read", "apikey:manage"}


@pytest.mark.parametrize("role", ROLE_COLUMNS)
def test_a_disabled_user_is_denied_everything(authz: Authorizer, role: str) -> None:
    who = Principal("gone", roles=frozenset({role}), disabled=True, mfa=True)
    for action in ACTIONS:
        decision = authz.decide(who, action, _objects(action, "gone")[0])
        assert not decision.allowed, action
        assert "forbid-disabled-user" in decision.policies


def test_an_mfa_environment_needs_mfa_for_changes_but_not_for_reads(authz: Authorizer) -> None:
    prod = Environment("prod", production=True, requires_mfa=True)
    wf = Resource("Workflow", "wf-9", owner="op", environment=prod)
    op = Principal("op", roles=frozenset({"operator"}))
    denied = authz.decide(op, "workflow:cancel", wf)
    assert not denied.allowed
    assert denied.policies == ["forbid-mutating-without-mfa"]
    assert authz.decide(op, "workflow:read", wf).allowed
    assert authz.decide(Principal("op", frozenset({"operator"}), mfa=True), "workflow:cancel", wf)
    assert authz.decide(op, "workflow:cancel", wf, {"mfa": True}).allowed
    # the environment itself as the resource
    on_env = authz.decide(op, "config:write", Resource.of_environment(prod))
    assert on_env.policies == ["forbid-mutating-without-mfa"]
    assert authz.decide(op, "workflow:cancel", Resource("Workflow", "wf-8")).allowed


def test_an_approval_environment_refuses_unapproved_operation_requests(authz: Authorizer) -> None:
    prod = Environment("prod", production=True, requires_approval=True)
    dev = Principal("dev", roles=frozenset({"developer"}))
    unapproved = authz.decide(dev, "ops:request", Resource.of_environment(prod))
    assert (unapproved.allowed, unapproved.policies) == (False, ["forbid-unapproved-ops"])
    approved = authz.decide(dev, "ops:request", Resource.of_environment(prod), {"approved": True})
    assert approved.allowed
    in_prod = Resource("Operation", "op-1", owner="dev", environment=prod)
    assert not authz.decide(dev, "ops:request", in_prod).allowed
    staging = Environment("staging")
    assert authz.decide(dev, "ops:request", Resource.of_environment(staging)).allowed


def test_a_scoped_api_key_is_limited_to_its_scopes_even_for_an_admin(authz: Authorizer) -> None:
    key = Principal("root", roles=frozenset({"admin"}), scopes=frozenset({"workflow:read"}))
    wf = Resource("Workflow", "wf-1", owner="someone")
    assert authz.decide(key, "workflow:read", wf).allowed
    cancel = authz.decide(key, "workflow:cancel", wf)
    assert (cancel.allowed, cancel.policies) == (False, ["forbid-apikey-out-of-scope"])
    # a scope grants nothing the owner does not have
    viewer_key = Principal("v", roles=frozenset({"viewer"}), scopes=frozenset({"user:manage"}))
    assert not authz.decide(viewer_key, "user:manage", Resource("User", "x")).allowed
    # an empty scope set allows nothing; a nonsense scope grants nothing
    empty = Principal("root", roles=frozenset({"admin"}), scopes=frozenset({"nonsense:*"}))
    assert not any(authz.decide(empty, a, Resource.platform()).allowed for a in ACTIONS)


def _site(tmp_path: Path, text: str, name: str = "site.cedar") -> Path:
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    (d / name).write_text(text, encoding="utf-8")
    return d


def test_a_site_forbid_beats_the_default_permit(tmp_path: Path) -> None:
    site = _site(
        tmp_path,
        '@id("site-no-prod-server-delete")\n'
        'forbid (principal, action == Action::"server:delete", resource)\n'
        "when { resource has environment && resource.environment.production };\n",
    )
    authz = Authorizer([site])
    admin = Principal("root", roles=frozenset({"admin"}), mfa=True)
    prod = Resource("Server", "s-1", environment=Environment("prod", production=True))
    decision = authz.decide(admin, "server:delete", prod)
    assert (decision.allowed, decision.policies) == (False, ["site-no-prod-server-delete"])
    dev_server = Resource("Server", "s-2", environment=Environment("dev"))
    assert authz.decide(admin, "server:delete", dev_server).allowed
    assert [p.name for p in authz.policies][-1] == "site-no-prod-server-delete"


def test_a_site_permit_grants_more_and_is_named_by_file_and_line_without_an_id(
    tmp_path: Path,
) -> None:
    site = _site(
        tmp_path,
        "// viewers of team blue may read logs\n"
        'permit (principal in Role::"viewer", action == Action::"task:logs", resource)\n'
        'when { resource.hasTag("team") && resource.getTag("team") == "blue" };\n',
        "logs.cedar",
    )
    authz = Authorizer([site, tmp_path / "does-not-exist"])
    viewer = Principal("v", roles=frozenset({"viewer"}))
    blue = Resource("Task", "t-1", owner="x", attributes={"team": "blue"})
    red = Resource("Task", "t-2", owner="x", attributes={"team": "red"})
    assert authz.decide(viewer, "task:logs", blue).policies == ["logs.cedar:2"]
    assert not authz.decide(viewer, "task:logs", red).allowed


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        ('@id("a")\npermit (principal, action resource);\n', ":2:27:", "unexpected token"),
        (
            '@id("a") permit (principal, action, resource);\n\n@id("b")\n'
            "forbid (principal, action, resource) when { principal.disabeld };\n",
            ":3:1:",
            "'b'",
        ),
        ("permit (principal, action, resource) when { lol(1) };", ":1:45:", "lol"),
        ('@id("admin-all") permit (principal, action, resource);', ":1:", "admin-all"),
        ("permit (principal == ?principal, action, resource);", ":1:1:", "template"),
    ],
)
def test_a_broken_site_policy_file_is_a_config_error_naming_the_place(
    tmp_path: Path, text: str, where: str, says: str
) -> None:
    site = _site(tmp_path, text, "broken.cedar")
    with pytest.raises(ConfigError) as caught:
        Authorizer([site])
    message = str(caught.value)
    assert f"broken.cedar{where}" in message, message
    assert says in message, message
    assert caught.value.details["file"].endswith("broken.cedar")


def test_reload_picks_up_changes_and_keeps_the_last_good_set_on_error(tmp_path: Path) -> None:
    site = _site(tmp_path, "")
    authz = Authorizer([site])
    viewer = Principal("v", roles=frozenset({"viewer"}))
    audit = Resource.platform()
    assert not authz.decide(viewer, "audit:read", audit).allowed
    (site / "site.cedar").write_text(
        '@id("viewers-read-audit")\n'
        'permit (principal in Role::"viewer", action == Action::"audit:read", resource);\n',
        encoding="utf-8",
    )
    authz.reload()
    assert authz.decide(viewer, "audit:read", audit).policies == ["viewers-read-audit"]
    (site / "site.cedar").write_text("permit (", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"site\.cedar"):
        authz.reload()
    assert authz.decide(viewer, "audit:read", audit).allowed


def test_decide_many_answers_like_decide_one_by_one(authz: Authorizer) -> None:
    dev = Principal("dev", roles=frozenset({"developer"}))
    prod = Environment("prod", requires_mfa=True, requires_approval=True)
    resources = [
        Resource("Workflow", "w-1", owner="dev", environment=prod),
        Resource("Workflow", "w-2", owner="bob", environment=prod),
        Resource("Workflow", "w-3", owner="dev"),
        Resource.of_environment(prod),
        Resource("Workflow", "w-1", owner="bob"),  # same entity described differently
        Resource("Nope", "n-1"),
    ]
    for action in ["workflow:read", "workflow:cancel", "ops:request"]:
        batch = authz.decide_many(dev, action, resources)
        single = [authz.decide(dev, action, r) for r in resources]
        assert batch == single, action
    assert authz.decide_many(dev, "workflow:read", []) == []


def test_decisions_are_plain_data(authz: Authorizer) -> None:
    decision = authz.decide(
        Principal("a", frozenset({"admin"})), "keys:rotate", Resource.platform()
    )
    assert json.loads(json.dumps(dataclasses.asdict(decision))) == {
        "allowed": True,
        "policies": ["admin-all"],
        "errors": [],
    }
    assert decision.allowed is True and decision.policies == ["admin-all"]
    with pytest.raises(ValueError):
        Resource("Environment", "prod")
