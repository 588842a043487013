"""`prvng ops …` and `prvng keys rotate --service keeper` end to end, against a real platform.

One background platform (`prvng platform start`, with NATS and the ops-keeper) serves the module;
every command runs in its own process. The admin of the platform requests; ``olga`` (operator)
approves; ``dave`` (developer) may request but not approve nor freeze. Each user has a login of
their own (``XDG_CONFIG_HOME``), so they are told apart by the keeper like real people.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.platform.pidfile import PidFile
from tests.e2e.platform_proc import REPO, Platform, prvng, running_platform, show
from tests.helpers import until_sync as until

POLICY = """{
  policies = [
    { name = "dev-auto", op_types = ["server.*"], targets = ["dev/*"], decision = "approve" },
    { name = "prod-manual", op_types = ["server.*"], targets = ["prod/*"],
      decision = "require_approval", approver_role = "operator" },
    { name = "db-never", op_types = ["server.*"], targets = ["db/*"], decision = "reject",
      reason = "databases belong to the DBA team" },
  ],
}
"""
NAMES = ["dev-auto", "prod-manual", "db-never"]
PASSWORD = "a long enough test passphrase"


@dataclass
class Ops:
    """The platform and a way to run `prvng` as each of its users."""

    plat: Platform
    config_homes: dict[str, Path]

    def __call__(
        self, *args: str, user: str = "admin", stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        return run_as(self.config_homes[user], self.plat.data_dir, *args, stdin=stdin)

    def json(self, *args: str, user: str = "admin") -> Any:
        done = self("--output", "json", *args, user=user)
        assert done.returncode == 0, show(done)
        return json.loads(done.stdout)

    def request(self, target: str, *extra: str) -> dict[str, Any]:
        op = self.json("ops", "request", "--type", "server.delete", "--target", target, *extra)
        assert isinstance(op, dict)
        return op

    def keeper_url(self) -> str:
        url = PidFile(self.plat.data_dir / "run").url(2)
        assert url, "the platform recorded no ops-keeper URL"
        return url


def run_as(
    config_home: Path, data_dir: Path, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """`prvng --data-dir D ARGS` with its stored login in ``config_home`` (like platform_proc's
    `prvng`, whose login always lives beside the data dir)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRVNG_")}
    env["XDG_CONFIG_HOME"] = str(config_home)
    argv = [sys.executable, "-m", "provisioning.cli.main", "--data-dir", str(data_dir), *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, cwd=REPO, env=env, input=stdin
    )


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    root = tmp_path_factory.mktemp("cli-ops")
    with running_platform(root / "home") as plat:
        # running_platform makes config/ itself, so the policy is written once it runs and the
        # keeper's reload (every ops_keeper.reload_interval_s) takes it in; written whole at once.
        policy = plat.data_dir / "config" / "keeper_policy.ncl"
        policy.with_suffix(".tmp").write_text(POLICY, encoding="utf-8")
        os.replace(policy.with_suffix(".tmp"), policy)
        o = Ops(plat, {"admin": root / "config-home"})
        until(
            "the keeper loads the test policy",
            lambda: o.json("ops", "policy").get("names") == NAMES,
        )
        for user, role in (("olga", "operator"), ("dave", "developer")):
            made = o("user", "create", user, "--role", role, "--password-stdin", stdin=PASSWORD)
            assert made.returncode == 0, show(made)
            o.config_homes[user] = root / f"config-{user}"
            logged = o("login", "-u", user, "--password-stdin", user=user, stdin=PASSWORD)
            assert logged.returncode == 0, show(logged)
        o.config_homes["nobody"] = root / "config-nobody"
        yield o


# ---------------------------------------------------------------------- requests


def test_a_request_a_policy_approves_is_published_and_wait_exits_0(ops: Ops) -> None:
    done = ops("ops", "request", "--type", "server.create", "--target", "dev/web-01", "--wait")
    assert done.returncode == 0, show(done)
    assert "published" in done.stdout and "dev-auto" in done.stdout, show(done)
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("operation ")]
    op_id = line.split()[1]
    shown = ops.json("ops", "show", op_id)
    assert (shown["state"], shown["policy"], shown["approver"]) == ("published", "dev-auto", None)


def test_params_are_parsed_as_json_when_they_parse_else_kept_as_text(ops: Ops) -> None:
    op = ops.request(
        "dev/web-02",
        "--param",
        "replicas=3",
        "--param",
        "force=true",
        "--param",
        'tags=["a", "b"]',
        "--param",
        "name=web 2",
        "--param",
        'version="1.10"',
        "--param",
        "disk.size_gb=20",
        "--param",
        "disk.kind=ssd",
        "--param",
        "ratio=NaN",
        "--param",
        "empty=",
        "--wait",
    )
    assert op["state"] == "published"
    assert op["params"] == {
        "replicas": 3,
        "force": True,
        "tags": ["a", "b"],
        "name": "web 2",
        "version": "1.10",
        "disk": {"size_gb": 20, "kind": "ssd"},
        "ratio": "NaN",
        "empty": "",
    }


def test_params_come_from_a_json_or_yaml_file_and_flags_override_them(
    ops: Ops, tmp_path: Path
) -> None:
    as_json = tmp_path / "params.json"
    as_json.write_text('{"replicas": 1, "zone": "a"}', encoding="utf-8")
    op = ops.request("dev/web-03", "--params-file", str(as_json), "--param", "replicas=2")
    assert op["params"] == {"replicas": 2, "zone": "a"}
    as_yaml = tmp_path / "params.yaml"
    as_yaml.write_text("zone: b\nlabels:\n  tier: web\n", encoding="utf-8")
    op = ops.request("dev/web-03", "--params-file", str(as_yaml), "-p", "labels.team=ops")
    assert op["params"] == {"zone": "b", "labels": {"tier": "web", "team": "ops"}}
    as_nickel = tmp_path / "params.ncl"
    as_nickel.write_text('let n = 2 in { replicas = n * 2, zone = "c" }', encoding="utf-8")
    op = ops.request("dev/web-03", "--params-file", str(as_nickel))
    assert op["params"] == {"replicas": 4, "zone": "c"}
    args = ("ops", "request", "-t", "server.create", "--target", "dev/web-03")
    piped = ops("--output", "json", *args, "--params-file", "-", stdin='{"from": "stdin"}')
    assert piped.returncode == 0, show(piped)
    assert json.loads(piped.stdout)["params"] == {"from": "stdin"}


def test_a_request_a_policy_rejects_exits_1_with_wait_naming_the_policy(ops: Ops) -> None:
    args = ("ops", "request", "--type", "server.delete", "--target", "db/main")
    plain = ops(*args)
    assert plain.returncode == 0, show(plain)
    assert "rejected" in plain.stdout and "db-never" in plain.stdout, show(plain)
    waited = ops(*args, "--wait")
    assert waited.returncode == 1, show(waited)
    assert "operation_failed" in waited.stderr, show(waited)
    assert "db-never" in waited.stderr and "DBA team" in waited.stderr, show(waited)


def test_a_request_matching_no_policy_is_rejected_by_default(ops: Ops) -> None:
    op = ops.request("staging/web-01")
    assert (op["state"], op["policy"]) == ("rejected", None)
    assert "no policy matched" in op["decision_reason"]


# ---------------------------------------------------------------------- approvals


def test_the_requester_may_not_approve_but_another_operator_does(ops: Ops) -> None:
    op = ops.request("prod/web-01", "--reason", "decommission")
    assert (op["state"], op["policy"], op["approver_role"]) == (
        "pending_approval",
        "prod-manual",
        "operator",
    )
    own = ops("ops", "approve", op["id"], "--reason", "mine")
    assert own.returncode == 3, show(own)
    assert "forbidden" in own.stderr and "no self-approval" in own.stderr, show(own)
    dev = ops("ops", "approve", op["id"], "--reason", "lgtm", user="dave")
    assert dev.returncode == 3, show(dev)
    assert "forbidden" in dev.stderr, show(dev)
    approved = ops("ops", "approve", op["id"], "--reason", "change CHG-42", user="olga")
    assert approved.returncode == 0, show(approved)
    assert "published by olga: change CHG-42" in approved.stdout, show(approved)
    shown = ops.json("ops", "show", op["id"])
    assert (shown["state"], shown["approver_name"], shown["approver_reason"]) == (
        "published",
        "olga",
        "change CHG-42",
    )
    again = ops("ops", "approve", op["id"], "--reason", "twice", user="olga")
    assert again.returncode == 1, show(again)
    assert "invalid_state" in again.stderr and "published" in again.stderr, show(again)


def test_wait_follows_a_pending_request_until_another_user_approves_it(ops: Ops) -> None:
    cmd = [sys.executable, "-m", "provisioning.cli.main", "--data-dir", str(ops.plat.data_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRVNG_")}
    env["XDG_CONFIG_HOME"] = str(ops.config_homes["admin"])
    args = ["ops", "request", "--type", "server.reboot", "--target", "prod/web-02", "--wait"]
    with subprocess.Popen(
        [*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as waiting:
        try:
            pending = until(
                "the request is recorded",
                lambda: [
                    o
                    for o in ops.json("ops", "list", "--state", "pending_approval")
                    if o["target"] == "prod/web-02"
                ],
            )
            ok = ops("ops", "approve", pending[0]["id"], "--reason", "go", user="olga")
            assert ok.returncode == 0, show(ok)
            out, err = waiting.communicate(timeout=60)
        finally:
            if waiting.poll() is None:
                waiting.kill()
    assert waiting.returncode == 0, f"{out}\n{err}"
    assert "pending_approval" in out and "published by olga" in out, f"{out}\n{err}"
    assert "prvng ops approve" in err, err


def test_wait_gives_up_after_the_timeout_with_exit_1(ops: Ops) -> None:
    done = ops(
        "ops",
        "request",
        "-t",
        "server.delete",
        "--target",
        "prod/web-03",
        "--wait",
        "--timeout",
        "1",
    )
    assert done.returncode == 1, show(done)
    assert "gave up waiting after 1s" in done.stderr and "pending_approval" in done.stderr, show(
        done
    )


def test_an_approver_rejects_with_a_reason(ops: Ops) -> None:
    op = ops.request("prod/web-04")
    done = ops("ops", "reject", op["id"], "--reason", "not this week", user="olga")
    assert done.returncode == 0, show(done)
    assert "rejected by olga: not this week" in done.stdout, show(done)
    shown = ops.json("ops", "show", op["id"])
    assert (shown["state"], shown["approver_name"], shown["approver_reason"]) == (
        "rejected",
        "olga",
        "not this week",
    )
    late = ops("ops", "approve", op["id"], "--reason", "after all", user="olga")
    assert late.returncode == 1 and "invalid_state" in late.stderr, show(late)


def test_the_requester_may_withdraw_their_own_pending_request(ops: Ops) -> None:
    op = ops.request("prod/web-05")
    done = ops("ops", "reject", op["id"], "--reason", "wrong target")
    assert done.returncode == 0, show(done)
    assert ops.json("ops", "show", op["id"])["state"] == "rejected"


# ---------------------------------------------------------------------- evaluate, freezes, policy


def test_evaluate_shows_the_deciding_policy_and_records_nothing(ops: Ops) -> None:
    before = [o["id"] for o in ops.json("ops", "list", "--limit", "1000")]
    done = ops("ops", "evaluate", "--type", "server.delete", "--target", "prod/db-9")
    assert done.returncode == 0, show(done)
    assert "require_approval" in done.stdout and "prod-manual" in done.stdout, show(done)
    assert "dev-auto" in done.stdout, show(done)  # the trace: compared first, did not match
    doc = ops.json("ops", "evaluate", "-t", "server.delete", "--target", "db/x", "-p", "a=1")
    assert (doc["decision"], doc["policy"], doc["state"]) == ("reject", "db-never", "rejected")
    assert [t["policy"] for t in doc["trace"]] == NAMES
    assert [o["id"] for o in ops.json("ops", "list", "--limit", "1000")] == before


def test_a_freeze_rejects_requests_until_it_is_lifted(ops: Ops) -> None:
    try:
        started = ops.json(
            "ops", "freeze", "--reason", "release weekend", "--scope", "dev/*", "--until", "1h"
        )
        assert (started["scope"], started["active"]) == ("dev/*", True)
        assert started["until"] is not None
        [active] = ops.json("ops", "freezes")
        assert active["id"] == started["id"]
        frozen = ops("ops", "request", "-t", "server.create", "--target", "dev/web-09", "--wait")
        assert frozen.returncode == 1, show(frozen)
        assert "release weekend" in frozen.stderr, show(frozen)
        doc = ops.json("ops", "evaluate", "-t", "server.create", "--target", "dev/web-09")
        assert (doc["decision"], doc["frozen_by"]) == ("reject", started["id"])
        # Outside the scope, the policy decides as usual.
        assert ops.request("db/other")["frozen_by"] is None
        lifted = ops("ops", "unfreeze")
        assert lifted.returncode == 0, show(lifted)
        assert f"change freeze {started['id']} on dev/* lifted" in lifted.stdout, show(lifted)
        assert ops.json("ops", "freezes") == []
        ended = ops.json("ops", "freezes", "--state", "ended")
        assert started["id"] in [f["id"] for f in ended]
        again = ops("ops", "request", "-t", "server.create", "--target", "dev/web-09", "--wait")
        assert again.returncode == 0, show(again)
    finally:
        ops("ops", "unfreeze", "--all")


def test_unfreeze_without_an_id_lifts_none_of_several_unless_all(ops: Ops) -> None:
    try:
        ids = [
            ops.json("ops", "freeze", "--reason", f"freeze {n}", "--scope", f"zone{n}/*")["id"]
            for n in (1, 2)
        ]
        refused = ops("ops", "unfreeze")
        assert refused.returncode == 2, show(refused)
        assert all(i in refused.stderr for i in ids) and "--all" in refused.stderr, show(refused)
        assert len(ops.json("ops", "freezes")) == 2
        lifted = ops.json("ops", "unfreeze", "--all")
        assert sorted(f["id"] for f in lifted) == sorted(ids)
        assert ops.json("ops", "freezes") == []
        nothing = ops("ops", "unfreeze")
        assert nothing.returncode == 0 and "nothing to lift" in nothing.stdout, show(nothing)
    finally:
        ops("ops", "unfreeze", "--all")


def test_freeze_refuses_a_past_or_unreadable_until_and_a_developer(ops: Ops) -> None:
    past = ops("ops", "freeze", "--reason", "r", "--until", "2000-01-01T00:00")
    assert past.returncode == 2, show(past)
    assert "validation_error" in past.stderr and "must be in the future" in past.stderr, show(past)
    vague = ops("ops", "freeze", "--reason", "r", "--until", "soon")
    assert vague.returncode == 2 and "--until 'soon'" in vague.stderr, show(vague)
    dev = ops("ops", "freeze", "--reason", "r", user="dave")
    assert dev.returncode == 3 and "forbidden" in dev.stderr, show(dev)
    assert ops.json("ops", "freezes") == []


def test_policy_lists_the_loaded_policies_in_order(ops: Ops) -> None:
    done = ops("ops", "policy")
    assert done.returncode == 0, show(done)
    assert "dev-auto, prod-manual, db-never" in done.stdout, show(done)
    assert "keeper_policy.ncl" in done.stdout, show(done)
    doc = ops.json("ops", "policy")
    assert (doc["names"], doc["last_error"]) == (NAMES, None)


# ---------------------------------------------------------------------- output and errors


def test_list_and_show_as_json_are_the_apis_data(ops: Ops) -> None:
    op = ops.request("dev/web-10", "-p", "n=1")
    rows = ops.json("ops", "list", "--limit", "5")
    assert isinstance(rows, list) and rows[0]["id"] == op["id"]  # newest first
    published = ops.json("ops", "list", "--state", "published", "--limit", "1000")
    assert {r["state"] for r in published} == {"published"}
    shown = ops.json("ops", "show", op["id"])
    assert shown["id"] == op["id"] and shown["params"] == {"n": 1}
    assert [t["policy"] for t in shown["trace"]] == ["dev-auto"]
    assert "token" not in shown
    table = ops("ops", "show", op["id"])
    assert table.returncode == 0 and '{"n": 1}' in table.stdout, show(table)
    assert "policies compared" in table.stdout, show(table)


def test_show_of_an_unknown_id_exits_1_pointing_at_list(ops: Ops) -> None:
    done = ops("ops", "show", "00000000-0000-0000-0000-000000000000")
    assert done.returncode == 1, show(done)
    assert "not_found" in done.stderr and "prvng ops list" in done.stderr, show(done)
    assert done.stdout == ""


def test_a_developer_sees_only_their_own_operations(ops: Ops) -> None:
    mine = ops.json("ops", "request", "-t", "server.create", "--target", "dev/dave-1", user="dave")
    others = ops.request("dev/admin-1")
    assert [o["id"] for o in ops.json("ops", "list", user="dave")] == [mine["id"]]
    hidden = ops("ops", "show", others["id"], user="dave")
    assert hidden.returncode == 1 and "not_found" in hidden.stderr, show(hidden)


def test_a_field_the_keeper_refuses_exits_2_naming_it(ops: Ops) -> None:
    done = ops("ops", "request", "--type", "Server Delete", "--target", "dev/x")
    assert done.returncode == 2, show(done)
    assert "validation_error" in done.stderr and "op_type" in done.stderr, show(done)


def test_without_a_login_ops_commands_exit_3(ops: Ops) -> None:
    done = ops("ops", "list", user="nobody")
    assert done.returncode == 3, show(done)
    assert "unauthorized" in done.stderr, show(done)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (["replicas"], "--param 'replicas': expected KEY=VALUE"),
        (["=3"], "--param '=3': expected KEY=VALUE"),
        (["size=1", "size=2"], "--param size: given more than once"),
        (["disk=1", "disk.gb=2"], "--param disk.gb: clashes with --param disk"),
        (["disk.gb=2", "disk=1"], "--param disk: clashes with --param disk.gb"),
        (["a..b=1"], "--param a..b: a dotted key needs a name"),
    ],
)
def test_bad_params_exit_2_naming_the_key_before_asking_the_keeper(
    tmp_path: Path, params: list[str], message: str
) -> None:
    # No platform runs for this data dir: the flags are refused before any request.
    flags = [a for p in params for a in ("--param", p)]
    done = prvng(
        "ops", "request", "-t", "server.create", "--target", "dev/x", *flags, data_dir=tmp_path
    )
    assert done.returncode == 2, show(done)
    assert "usage_error" in done.stderr and message in done.stderr, show(done)


def test_a_malformed_params_file_exits_2_with_its_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text('{\n  "a": 1,\n  oops\n}', encoding="utf-8")
    done = prvng(
        "ops",
        "evaluate",
        "-t",
        "server.create",
        "--target",
        "dev/x",
        "--params-file",
        str(bad),
        data_dir=tmp_path,
    )
    assert done.returncode == 2, show(done)
    assert f"{bad}:3:3: invalid JSON" in done.stderr, show(done)
    listed = tmp_path / "p.yaml"
    listed.write_text("- a\n- b\n", encoding="utf-8")
    done = prvng(
        "ops",
        "evaluate",
        "-t",
        "server.create",
        "--target",
        "dev/x",
        "--params-file",
        str(listed),
        data_dir=tmp_path,
    )
    assert done.returncode == 2 and "expected an object of parameters" in done.stderr, show(done)
    done = prvng(
        "ops",
        "evaluate",
        "-t",
        "server.create",
        "--target",
        "dev/x",
        "--params-file",
        str(tmp_path / "p.toml"),
        data_dir=tmp_path,
    )
    assert done.returncode == 2 and "unsupported file type '.toml'" in done.stderr, show(done)


# ---------------------------------------------------------------------- keys


def test_keys_rotate_service_keeper_adds_a_key_to_the_keepers_jwks(ops: Ops) -> None:
    jwks = f"{ops.keeper_url()}/.well-known/jwks.json"
    before = httpx.get(jwks).json()["keys"]
    done = ops("keys", "rotate", "--service", "keeper")
    assert done.returncode == 0, show(done)
    assert "new ops-keeper signing key" in done.stdout, show(done)
    kid = done.stdout.split("signing key ")[1].split(";")[0]
    after = httpx.get(jwks).json()["keys"]
    assert len(after) == len(before) + 1 == 2
    assert kid in {k["kid"] for k in after}
    # Operations are signed with the new key from now on, and still published.
    assert ops.request("dev/after-rotation", "--wait")["state"] == "published"
    refused = ops("keys", "rotate", "--service", "keeper", user="olga")
    assert refused.returncode == 3 and "forbidden" in refused.stderr, show(refused)
