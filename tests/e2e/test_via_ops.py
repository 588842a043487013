"""`--via-ops` and `orchestrator.require_signed_ops` for real: `prvng platform start` (NATS, the
ops-keeper, the ops-controller) with a keeper policy of its own, every command a `prvng` process.

An approved `prvng workflow submit FILE --via-ops --wait` runs to Completed through keeper →
NATS → controller → orchestrator; a rejected target exits 1 and makes no workflow; one that needs
an approval says how to give it. `prvng server create --via-ops` asks for `server.create` on
`<infra>/<server>` with the params the orchestrator's route would get. With
`require_signed_ops = true` a plain submit is refused naming the setting, and `--via-ops` works.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e import platform_proc
from tests.e2e.platform_proc import Platform, prvng, running_platform, show
from tests.fake_workspace import make_fake_workspace

POLICY = """{
  policies = [
    { name = "no-db", op_types = ["workflow.submit"], targets = ["db/*"], decision = "reject" },
    { name = "prod-needs-approval", op_types = ["workflow.submit", "server.delete"],
      targets = ["prod/*"], decision = "require_approval", approver_role = "operator" },
    { name = "servers-in-prod", op_types = ["server.create"], targets = ["prod/*"],
      decision = "approve" },
    { name = "workflows", op_types = ["workflow.submit"], decision = "approve" },
  ],
}
"""
SPEC = {"name": "via-ops-e2e", "tasks": [{"name": "a", "action": "noop"}]}
OP_LINE = re.compile(r"^operation (\S+) (\S+) (\S+): (\w+) by (.+), now (\w+)$", re.M)


@contextlib.contextmanager
def platform_with(data_dir: Path, *, signed_only: bool) -> Iterator[Platform]:
    """`running_platform` with POLICY as the keeper's policy file and, when ``signed_only``,
    `orchestrator.require_signed_ops = true` merged into the platform.ncl it writes."""
    real = platform_proc.prvng

    def before_start(*args: str, **kwargs: Any) -> Any:
        if args[:2] == ("platform", "start"):
            config = data_dir / "config"
            (config / "keeper_policy.ncl").write_text(POLICY, encoding="utf-8")
            if signed_only:
                platform_ncl = config / "platform.ncl"
                text = platform_ncl.read_text("utf-8").rstrip()
                extra = " & { orchestrator = { require_signed_ops = true } }\n"
                platform_ncl.write_text(f"({text}){extra}", encoding="utf-8")
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(platform_proc, "prvng", before_start)
        with running_platform(data_dir) as plat:
            yield plat


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with platform_with(tmp_path_factory.mktemp("via-ops") / "home", signed_only=False) as plat:
        yield plat


@pytest.fixture(scope="module")
def signed_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with platform_with(tmp_path_factory.mktemp("signed") / "home", signed_only=True) as plat:
        yield plat


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "via-ops.json"
    path.write_text(json.dumps(SPEC), encoding="utf-8")
    return path


def run(plat: Platform, *args: str) -> Any:
    return prvng(*args, data_dir=plat.data_dir, url=plat.url)


def workflows(plat: Platform) -> list[dict[str, Any]]:
    listed = run(plat, "--output", "json", "workflow", "list", "--limit", "1000")
    assert listed.returncode == 0, show(listed)
    return list(json.loads(listed.stdout))


def made_of(plat: Platform, op_id: str, timeout_s: float = 60) -> dict[str, Any]:
    """The workflow the controller made of operation ``op_id`` (its label ``op_jti``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [w for w in workflows(plat) if w["labels"].get("op_jti") == op_id]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no workflow of operation {op_id}"
        time.sleep(0.5)


def test_an_approved_submit_via_ops_with_wait_runs_to_completed(
    platform: Platform, spec_file: Path
) -> None:
    done = run(
        platform, "workflow", "submit", str(spec_file), "--via-ops", "--target", "dev/e2e", "--wait"
    )

    assert done.returncode == 0, show(done)
    [(op_id, op_type, target, decision, by, _state)] = OP_LINE.findall(done.stdout)
    assert (op_type, target, decision, by) == (
        "workflow.submit",
        "dev/e2e",
        "approve",
        "policy workflows",
    )
    assert re.search(r"^workflow \S+ via-ops-e2e: Completed$", done.stdout, re.M), show(done)
    wf = made_of(platform, op_id)
    assert wf["status"] == "Completed" and wf["owner"]
    assert wf["labels"]["op_type"] == "workflow.submit"


def test_a_rejected_target_exits_1_and_makes_no_workflow(
    platform: Platform, spec_file: Path
) -> None:
    done = run(
        platform, "workflow", "submit", str(spec_file), "--via-ops", "--target", "db/x", "--wait"
    )

    assert done.returncode == 1, show(done)
    [(op_id, _t, target, decision, by, state)] = OP_LINE.findall(done.stdout)
    assert (target, decision, by, state) == ("db/x", "reject", "policy no-db", "rejected")
    assert f"operation {op_id} was rejected" in done.stderr, show(done)
    assert not [w for w in workflows(platform) if w["labels"].get("op_jti") == op_id]


def test_an_op_awaiting_approval_says_how_to_approve_it(
    platform: Platform, spec_file: Path
) -> None:
    done = run(platform, "workflow", "submit", str(spec_file), "--via-ops", "--target", "prod/x")

    assert done.returncode == 0, show(done)
    [(op_id, _t, _target, decision, _by, state)] = OP_LINE.findall(done.stdout)
    assert (decision, state) == ("require_approval", "pending_approval"), show(done)
    assert f"prvng ops approve {op_id}" in done.stdout, show(done)


def test_server_create_via_ops_asks_for_the_routes_params_on_infra_slash_server(
    platform: Platform, tmp_path: Path
) -> None:
    ws = make_fake_workspace(tmp_path / "ws")

    asked = run(
        platform, "--output", "json", "server", "create", "-i", "prod", "-s", "a1",
        "-w", str(ws), "--via-ops",
    )  # fmt: skip

    assert asked.returncode == 0, show(asked)
    op = json.loads(asked.stdout)
    assert (op["op_type"], op["target"], op["policy"]) == (
        "server.create",
        "prod/a1",
        "servers-in-prod",
    )
    assert op["params"] == {"workspace": str(ws.resolve()), "infra": "prod", "servers": ["a1"]}
    wf = made_of(platform, op["id"])
    assert wf["kind"] == "servers.create"


def test_check_via_ops_shows_the_plan_and_what_the_keeper_would_decide(
    platform: Platform, tmp_path: Path
) -> None:
    ws = make_fake_workspace(tmp_path / "ws")
    before = len(workflows(platform))

    checked = run(
        platform, "--output", "json", "server", "delete", "-i", "prod", "-w", str(ws),
        "--check", "--via-ops",
    )  # fmt: skip

    assert checked.returncode == 0, show(checked)
    answer = json.loads(checked.stdout)
    assert answer["plan"]["tasks"]
    assert answer["keeper"]["decision"] == "require_approval"
    assert answer["keeper"]["policy"] == "prod-needs-approval"
    assert len(workflows(platform)) == before


def test_with_require_signed_ops_a_plain_submit_is_refused_and_via_ops_runs(
    signed_platform: Platform, spec_file: Path
) -> None:
    health = httpx.get(f"{signed_platform.url}/health", timeout=10).json()["data"]
    assert health["require_signed_ops"] is True

    refused = run(signed_platform, "workflow", "submit", str(spec_file))
    assert refused.returncode == 3, show(refused)
    assert "orchestrator.require_signed_ops" in refused.stderr, show(refused)
    assert "--via-ops" in refused.stderr, show(refused)
    assert workflows(signed_platform) == []

    done = run(
        signed_platform, "workflow", "submit", str(spec_file), "--via-ops", "--target", "dev/e2e",
        "--wait",
    )  # fmt: skip
    assert done.returncode == 0, show(done)
    assert re.search(r"^workflow \S+ via-ops-e2e: Completed$", done.stdout, re.M), show(done)
    assert [w["status"] for w in workflows(signed_platform)] == ["Completed"]
