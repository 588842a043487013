"""Ops-keeper policies: first match wins, no match rejects, freezes beat policies, the contract
names the file and line of a mistake, and a broken file on reload keeps the last good policy."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from provisioning.core.errors import ConfigError, NickelError, ValidationError
from provisioning.ops_keeper.policy import (
    DEFAULT_POLICY,
    Freeze,
    OpRequest,
    PolicyFile,
    PolicySet,
    watch,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

BASIC = """{
  policies = [
    { name = "reads", op_types = ["*.list", "*.get"], decision = "approve" },
    {
      name = "prod-deletes",
      op_types = ["*.delete"],
      targets = ["prod/*"],
      decision = "require_approval",
      approver_role = "admin",
      token_ttl_s = 120,
      reason = "production deletes need an admin",
    },
    { name = "no-prod", targets = ["prod/*"], decision = "reject" },
    { name = "signed-images", images = ["registry.example/*"], decision = "approve" },
    { name = "dev", targets = ["dev/*"], decision = "require_approval" },
  ],
}
"""


def _write(tmp_path: Path, text: str, name: str = "keeper_policy.ncl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _rewrite(path: Path, text: str) -> None:
    """Write ``text`` and move the mtime forward, so a change within the clock's granularity is
    still seen."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


@pytest.fixture
def basic(tmp_path: Path) -> PolicySet:
    return PolicySet.load(_write(tmp_path, BASIC))


def _req(op: str = "server.create", target: str = "dev/a", image: str | None = None) -> OpRequest:
    return OpRequest(op_type=op, target=target, image=image, requester="alice")


# --- matching --------------------------------------------------------------------------------


def test_first_match_wins(basic: PolicySet) -> None:
    # `server.delete` on prod/* matches `prod-deletes` and `no-prod`: the first decides.
    decision = basic.decide(_req("server.delete", "prod/web-01"), now=NOW)

    assert decision.decision == "require_approval"
    assert decision.policy == "prod-deletes"
    assert decision.approver_role == "admin"
    assert decision.token_ttl_s == 120
    assert decision.frozen_by is None
    assert 'policy "prod-deletes"' in decision.reason
    assert '"prod/web-01" by "prod/*"' in decision.reason
    assert decision.reason.endswith("production deletes need an admin")


def test_a_read_in_prod_is_approved_by_the_earlier_policy(basic: PolicySet) -> None:
    decision = basic.decide(_req("server.list", "prod/web-01"), now=NOW)

    assert (decision.decision, decision.policy) == ("approve", "reads")
    assert decision.token_ttl_s == 300
    assert decision.approver_role is None


def test_no_match_rejects(basic: PolicySet) -> None:
    decision = basic.decide(_req("server.create", "staging/a"), now=NOW)

    assert decision.decision == "reject"
    assert decision.policy is None
    assert decision.reason == "no policy matched: rejected by default"
    assert decision.token_ttl_s is None
    assert [t.policy for t in decision.trace] == [p.name for p in basic.policies]
    assert not any(t.matched for t in decision.trace)


def test_an_empty_policy_list_rejects_everything(tmp_path: Path) -> None:
    policies = PolicySet.load(_write(tmp_path, "{ policies = [] }"))

    assert policies.decide(_req(), now=NOW).decision == "reject"


@pytest.mark.parametrize(
    ("policy", "request_", "matches"),
    [
        ('op_types = ["server.*"]', _req("server.create"), True),
        ('op_types = ["server.*"]', _req("cluster.create"), False),
        ('op_types = ["server.?reate"]', _req("server.create"), True),
        ('op_types = ["Server.*"]', _req("server.create"), False),  # case-sensitive
        ('targets = ["prod/web-*"]', _req(target="prod/web-01"), True),
        ('targets = ["prod/web-*"]', _req(target="prod/db-01"), False),
        ('targets = ["prod/*"]', _req(target="prod/eu/web-01"), True),  # `*` crosses `/`
        ('targets = ["dev/*", "prod/[ab]*"]', _req(target="prod/b1"), True),
        ('images = ["registry/app:1.*"]', _req(image="registry/app:1.2"), True),
        ('images = ["registry/app:1.*"]', _req(image="registry/app:2.0"), False),
        ('images = ["registry/*"]', _req(image=None), False),
        ('images = ["*"]', _req(image=None), True),
        ('images = ["registry/*", "*"]', _req(image=None), True),
    ],
)
def test_globs_on_each_field(
    tmp_path: Path, policy: str, request_: OpRequest, matches: bool
) -> None:
    text = f'{{ policies = [ {{ name = "p", {policy}, decision = "approve" }} ] }}'
    policies = PolicySet.load(_write(tmp_path, text))

    decision = policies.decide(request_, now=NOW)

    assert (decision.decision == "approve") is matches
    assert decision.trace[0].matched is matches


def test_a_request_without_image_matches_only_a_star_glob(basic: PolicySet) -> None:
    # `signed-images` would approve anything with a registry.example image; without an image
    # it does not match, and `dev` decides.
    with_image = basic.decide(_req(image="registry.example/app:1"), now=NOW)
    without = basic.decide(_req(image=None), now=NOW)

    assert with_image.policy == "signed-images"
    assert without.policy == "dev"
    miss = next(t for t in without.trace if t.policy == "signed-images")
    assert miss.field == "images"
    assert "no image" in miss.detail


def test_require_approval_defaults_to_the_operator_role(basic: PolicySet) -> None:
    decision = basic.decide(_req(target="dev/x"), now=NOW)

    assert (decision.decision, decision.policy) == ("require_approval", "dev")
    assert decision.approver_role == "operator"
    assert 'role "operator"' in decision.reason


# --- freezes ---------------------------------------------------------------------------------


def test_a_freeze_beats_an_approve(basic: PolicySet) -> None:
    freeze = Freeze("fz-1", "release 2.0", scope="prod/*", until=NOW + timedelta(hours=2))

    decision = basic.decide(_req("server.list", "prod/web-01"), [freeze], now=NOW)

    assert decision.decision == "reject"
    assert decision.frozen_by == "fz-1"
    assert decision.policy is None
    assert decision.token_ttl_s is None
    assert decision.reason == (
        "change freeze fz-1 (release 2.0) covers target prod/web-01 "
        f"until {(NOW + timedelta(hours=2)).isoformat()}"
    )
    # The trace still tells what would happen without the freeze.
    assert decision.trace[-1].policy == "reads" and decision.trace[-1].matched


def test_a_freeze_without_end_holds_until_lifted(basic: PolicySet) -> None:
    freeze = Freeze("fz-2", "incident", created_by="bob")

    decision = basic.decide(_req(target="dev/a"), [freeze], now=NOW + timedelta(days=365))

    assert decision.frozen_by == "fz-2"
    assert decision.reason.endswith("until it is lifted")


def test_an_expired_freeze_is_ignored(basic: PolicySet) -> None:
    expired = Freeze("old", "last week", scope="*", until=NOW - timedelta(seconds=1))
    ends_now = Freeze("edge", "ends exactly now", scope="*", until=NOW)
    naive = Freeze(
        "naive", "naive UTC", scope="*", until=(NOW - timedelta(hours=1)).replace(tzinfo=None)
    )

    decision = basic.decide(_req("server.list", "prod/x"), [expired, ends_now, naive], now=NOW)

    assert (decision.decision, decision.policy, decision.frozen_by) == ("approve", "reads", None)


def test_a_naive_until_is_taken_as_utc(basic: PolicySet) -> None:
    naive = Freeze("naive", scope="*", until=(NOW + timedelta(hours=1)).replace(tzinfo=None))

    assert basic.decide(_req(), [naive], now=NOW).frozen_by == "naive"


def test_a_freeze_applies_only_to_targets_its_scope_matches(basic: PolicySet) -> None:
    freezes = [
        Freeze("eu", "eu maintenance", scope="prod/eu-*", until=NOW + timedelta(hours=1)),
        Freeze("db", "db migration", scope="*/db-?", until=NOW + timedelta(hours=1)),
    ]

    assert basic.decide(_req("server.list", "prod/eu-web"), freezes, now=NOW).frozen_by == "eu"
    assert basic.decide(_req("server.list", "dev/db-1"), freezes, now=NOW).frozen_by == "db"
    free = basic.decide(_req("server.list", "prod/us-web"), freezes, now=NOW)
    assert (free.decision, free.frozen_by) == ("approve", None)


# --- evaluate's explanation ------------------------------------------------------------------


def test_the_trace_explains_each_policy_that_did_not_match(basic: PolicySet) -> None:
    decision = basic.decide(_req("server.create", "dev/a", image="other/app:1"), now=NOW)

    assert decision.policy == "dev"
    assert [(t.policy, t.matched, t.field) for t in decision.trace] == [
        ("reads", False, "op_types"),
        ("prod-deletes", False, "op_types"),
        ("no-prod", False, "targets"),
        ("signed-images", False, "images"),
        ("dev", True, None),
    ]
    details = {t.policy: t.detail for t in decision.trace}
    assert details["reads"] == 'op_type "server.create" matches none of "*.list", "*.get"'
    assert details["no-prod"] == 'target "dev/a" matches none of "prod/*"'
    assert details["signed-images"] == ('image "other/app:1" matches none of "registry.example/*"')
    wire = decision.to_dict()
    assert wire["policy"] == "dev"
    assert wire["trace"][2] == {
        "policy": "no-prod",
        "matched": False,
        "field": "targets",
        "detail": 'target "dev/a" matches none of "prod/*"',
    }


# --- the contract ----------------------------------------------------------------------------


# Line 6 of the file is the bad one; every mistake is reported there.
@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (('name = "b",', 'decision = "maybe",'), '"approve", "reject", "require_approval"'),
        (('name = "b",', 'decison = "approve",'), "unknown field `decison`"),
        (('name = "b",', "token_ttl_s = 5,", 'decision = "approve",'), "from 10 to 86400"),
        (('name = "b",', "token_ttl_s = 1e6,", 'decision = "approve",'), "from 10 to 86400"),
        (('name = "b",', "op_types = [],", 'decision = "approve",'), "non-empty array of globs"),
        (('decision = "approve",', 'name = "",'), "expected a non-empty string"),
    ],
    ids=[
        "wrong-decision",
        "misspelt-field",
        "ttl-too-short",
        "ttl-too-long",
        "no-globs",
        "no-name",
    ],
)
def test_contract_errors_name_the_file_and_line(
    tmp_path: Path, record: tuple[str, ...], expected: str
) -> None:
    fields = "".join(f"      {line}\n" for line in record)
    text = (
        "{\n  policies = [\n"
        '    { name = "a", decision = "approve" },\n'
        f"    {{\n{fields}    }},\n"
        "  ],\n}\n"
    )
    path = _write(tmp_path, text, "broken.ncl")

    with pytest.raises(NickelError) as info:
        PolicySet.load(path)

    message = info.value.message
    assert expected in message
    assert f"{path.resolve()}:6:" in message
    assert "\x1b[" not in message


def test_approver_role_is_refused_on_a_decision_that_needs_no_approval(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '{\n  policies = [\n    { name = "a", decision = "approve", approver_role = "admin" },\n'
        "  ],\n}\n",
    )

    with pytest.raises(NickelError, match=r"`approver_role` applies only to") as info:
        PolicySet.load(path)
    assert f"{path.resolve()}:3:" in info.value.message


def test_a_misspelt_top_level_field_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "{\n  policy = [],\n}\n")

    with pytest.raises(NickelError, match="unknown field `policy`; expected one of `policies`"):
        PolicySet.load(path)


def test_a_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "{\n  policies = [\n    { name = },\n  ],\n}\n")

    with pytest.raises(NickelError, match=r"keeper_policy\.ncl:3:"):
        PolicySet.load(path)


def test_duplicate_policy_names_are_a_validation_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """{
  policies = [
    { name = "same", decision = "approve" },
    { name = "other", decision = "reject" },
    { name = "same", decision = "reject" },
  ],
}
""",
    )

    with pytest.raises(ValidationError) as info:
        PolicySet.load(path)

    assert not isinstance(info.value, NickelError)
    assert str(path.resolve()) in info.value.message
    assert 'policy name "same" is used by policies[0] and policies[2]' in info.value.message


def test_nickel_lets_and_merges_are_allowed(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """let prod = { targets = ["prod/*"], token_ttl_s = 60 } in
{
  policies = [
    prod & { name = "prod-approval", decision = "require_approval" },
  ],
}
""",
    )

    [policy] = PolicySet.load(path).policies

    assert policy.targets == ("prod/*",)
    assert policy.token_ttl_s == 60
    assert policy.approver_role == "operator"
    assert policy.op_types == ("*",) and policy.images == ("*",)


# --- the policy file -------------------------------------------------------------------------


def test_a_missing_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "keeper_policy.ncl"

    with pytest.raises(ConfigError, match="ops-keeper policy file not found") as info:
        PolicyFile(path)
    assert str(path) in info.value.message


def test_a_broken_file_at_start_raises(tmp_path: Path) -> None:
    with pytest.raises(NickelError):
        PolicyFile(_write(tmp_path, '{ policies = [ { name = "a" } ] }'))


def test_reload_picks_up_a_change(tmp_path: Path) -> None:
    path = _write(tmp_path, BASIC)
    policy_file = PolicyFile(path)
    first_loaded_at = policy_file.loaded_at

    assert policy_file.reload_if_changed() is False  # nothing changed
    _rewrite(path, '{ policies = [ { name = "all", decision = "approve" } ] }')

    assert policy_file.reload_if_changed() is True
    assert policy_file.current.names == ["all"]
    assert policy_file.loaded_at >= first_loaded_at
    assert policy_file.reload_if_changed() is False
    assert policy_file.status()["policies"] == 1


def test_a_change_of_the_same_size_within_the_same_mtime_is_seen(tmp_path: Path) -> None:
    path = _write(tmp_path, '{ policies = [ { name = "aaa", decision = "approve" } ] }')
    policy_file = PolicyFile(path)
    stat = path.stat()

    # Same size and mtime, new inode (an editor's save-by-rename).
    replacement = _write(tmp_path, '{ policies = [ { name = "bbb", decision = "approve" } ] }', "x")
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    replacement.replace(path)

    assert policy_file.reload_if_changed() is True
    assert policy_file.current.names == ["bbb"]


def test_a_broken_file_keeps_the_last_good_policy_and_reports_the_error(tmp_path: Path) -> None:
    path = _write(tmp_path, BASIC)
    policy_file = PolicyFile(path)
    good = policy_file.current

    _rewrite(path, '{\n  policies = [\n    { name = "x", decision = "nope" },\n  ],\n}\n')
    assert policy_file.reload_if_changed() is False

    assert policy_file.current is good
    status = policy_file.status()
    assert status["policies"] == len(good.policies)
    assert status["last_error"] is not None
    assert f"{path.resolve()}:3:" in status["last_error"]
    assert '"approve", "reject", "require_approval"' in status["last_error"]
    assert status["last_error_at"] is not None
    # Not evaluated again until it changes; the error stays.
    assert policy_file.reload_if_changed() is False
    assert policy_file.last_error is not None

    # A duplicate name is reported the same way.
    twice = '{ name = "d", decision = "approve" }'
    _rewrite(path, f"{{ policies = [ {twice}, {twice} ] }}")
    assert policy_file.reload_if_changed() is False
    assert 'policy name "d"' in (policy_file.last_error or "")

    # A good file clears the error.
    _rewrite(path, '{ policies = [ { name = "fixed", decision = "reject" } ] }')
    assert policy_file.reload_if_changed() is True
    assert policy_file.current.names == ["fixed"]
    assert policy_file.status()["last_error"] is None
    assert policy_file.last_error_at is None


def test_a_deleted_file_keeps_the_last_good_policy_until_it_is_back(tmp_path: Path) -> None:
    path = _write(tmp_path, BASIC)
    policy_file = PolicyFile(path)

    path.unlink()
    assert policy_file.reload_if_changed() is False
    assert "not found" in (policy_file.last_error or "")
    assert len(policy_file.current.policies) == 5

    _write(tmp_path, '{ policies = [ { name = "back", decision = "approve" } ] }')
    assert policy_file.reload_if_changed() is True
    assert policy_file.current.names == ["back"]
    assert policy_file.last_error is None


def test_status_describes_the_loaded_policy(tmp_path: Path) -> None:
    path = _write(tmp_path, BASIC)

    status = PolicyFile(path).status()

    assert status["path"] == str(path.resolve())
    assert status["policies"] == 5
    assert status["last_error"] is None
    assert datetime.fromisoformat(status["loaded_at"]).tzinfo is not None


# --- the default policy ----------------------------------------------------------------------


def test_the_default_policy_file_is_written_and_valid(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "keeper_policy.ncl"

    policy_file = PolicyFile.with_default(path)

    assert path.read_text(encoding="utf-8") == DEFAULT_POLICY
    assert policy_file.last_error is None
    policies = policy_file.current
    assert policies.names == [
        "read-only",
        "prod-destructive-needs-approval",
        "dev-anything",
        "reject-the-rest",
    ]

    def decide(op: str, target: str) -> tuple[str, str | None, str | None]:
        d = policies.decide(_req(op, target), now=NOW)
        return d.decision, d.policy, d.approver_role

    assert decide("server.list", "prod/web-01") == ("approve", "read-only", None)
    assert decide("server.delete", "prod/web-01") == (
        "require_approval",
        "prod-destructive-needs-approval",
        "operator",
    )
    assert decide("taskserv.remove", "prod/web-01")[0] == "require_approval"
    assert decide("server.delete", "dev/box") == ("approve", "dev-anything", None)
    assert decide("server.create", "prod/web-01") == ("reject", "reject-the-rest", None)
    assert decide("server.create", "staging/a") == ("reject", "reject-the-rest", None)


def test_the_default_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '{ policies = [ { name = "mine", decision = "approve" } ] }')

    assert PolicyFile.with_default(path).current.names == ["mine"]
    broken = _write(tmp_path, "{ oops", "broken.ncl")
    with pytest.raises(NickelError):
        PolicyFile.with_default(broken)
    assert broken.read_text(encoding="utf-8") == "{ oops"


# --- the watch -------------------------------------------------------------------------------


async def test_watch_reloads_until_stopped(tmp_path: Path) -> None:
    path = _write(tmp_path, BASIC)
    policy_file = PolicyFile(path)
    stop = asyncio.Event()
    task = asyncio.create_task(watch(policy_file, 0.02, stop))

    _rewrite(path, '{ policies = [ { name = "watched", decision = "approve" } ] }')
    for _ in range(250):
        if policy_file.current.names == ["watched"]:
            break
        await asyncio.sleep(0.02)
    assert policy_file.current.names == ["watched"]

    stop.set()
    await asyncio.wait_for(task, timeout=5)


async def test_watch_is_cancellable(tmp_path: Path) -> None:
    policy_file = PolicyFile(_write(tmp_path, BASIC))
    task = asyncio.create_task(watch(policy_file, 60))
    await asyncio.sleep(0.05)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)


async def test_watch_refuses_a_non_positive_interval(tmp_path: Path) -> None:
    policy_file = PolicyFile(_write(tmp_path, BASIC))

    with pytest.raises(ValueError, match="interval_s"):
        await watch(policy_file, 0)
