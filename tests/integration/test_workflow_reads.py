"""Reads for screens (SQLite and PostgreSQL).

`GET /workflows/counts`: every workflow a caller may see, counted by status in the store (not a
page of rows), with the listing's filters and its owner scoping — a developer counts only their
own, whatever `owner` they ask for. The dashboard's numbers come from it, so they stay right
past the listing's 1,000-row page.

`GET /workflows/{id}?tasks=brief|none`: the same workflow with lighter tasks (what the UI's graph
and the CLI's pollers need) or none, agreeing with the full view."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.integration import test_audit_trail as trail
from tests.integration.test_audit_trail import ADMIN_PASSWORD, QUICK, Platform, bearer

platform = trail.platform  # the embedded control center + orchestrator, SQLite and PostgreSQL
ONCE = {"max_attempts": 1}
FAILING = {"name": "failing", "tasks": [{"name": "boom", "command": ["false"], "retry": ONCE}]}


async def _submit(p: Platform, headers: dict[str, str], spec: dict[str, Any]) -> str:
    resp = await p.orch.post("/workflows", headers=headers, json=spec)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["data"]["id"])


async def _all_ended(p: Platform, ids: list[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        states = [await p.orchestrator.store.workflow_status(i) for i in ids]
        if all(s in {"Completed", "Failed", "RolledBack"} for s in states):
            return
        assert time.monotonic() < deadline, f"still running after 30 s: {states}"
        await asyncio.sleep(0.05)


async def _counts(p: Platform, headers: dict[str, str], **params: str) -> dict[str, Any]:
    resp = await p.orch.get("/workflows/counts", headers=headers, params=params)
    assert resp.status_code == 200, resp.text
    return dict(resp.json()["data"])


async def test_counts_by_status_with_filters_and_owner_scoping(platform: Platform) -> None:
    p = platform
    admin = bearer(await p.login("admin", ADMIN_PASSWORD))
    dev = await p.user(admin, "dev", "developer")
    ops = await p.user(admin, "opal", "operator")
    started = datetime.now(UTC) - timedelta(seconds=1)
    ids = [await _submit(p, dev, QUICK) for _ in range(3)]
    ids.append(await _submit(p, dev, FAILING))
    ids += [await _submit(p, ops, QUICK) for _ in range(2)]
    await _all_ended(p, ids)

    everything = await _counts(p, admin)
    assert everything == {"total": 6, "by_status": {"Completed": 5, "RolledBack": 1}}
    listed = (await p.orch.get("/workflows", headers=admin, params={"limit": 1000})).json()
    assert Counter(wf["status"] for wf in listed["data"]) == everything["by_status"]

    own = {"total": 4, "by_status": {"Completed": 3, "RolledBack": 1}}
    assert await _counts(p, dev) == own
    opal_id = listed["data"][0]["owner"]  # the newest: one of opal's
    assert await _counts(p, dev, owner=opal_id) == own  # not someone else's
    assert await _counts(p, admin, owner=opal_id) == {"total": 2, "by_status": {"Completed": 2}}

    assert await _counts(p, admin, since=started.isoformat()) == everything
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert await _counts(p, admin, since=future) == {"total": 0, "by_status": {}}
    assert await _counts(p, admin, kind="batch") == {"total": 0, "by_status": {}}
    assert (await _counts(p, admin, kind="custom"))["total"] == 6


async def test_bad_filters_are_named_and_anonymous_is_refused(platform: Platform) -> None:
    p = platform
    admin = bearer(await p.login("admin", ADMIN_PASSWORD))
    for params, field in (({"since": "yesterday"}, "since"), ({"kind": "nope"}, "kind")):
        resp = await p.orch.get("/workflows/counts", headers=admin, params=params)
        assert resp.status_code == 422, resp.text
        assert field in resp.text
    assert (await p.orch.get("/workflows/counts")).status_code == 401


def flaky(marker: Path) -> dict[str, Any]:
    """first → second (fails once, then succeeds: two attempts) → third (soft dependency)."""
    once = f'test -e "{marker}" || {{ touch "{marker}"; exit 3; }}'
    return {
        "name": "views",
        "tasks": [
            {"name": "first", "action": "noop"},
            {
                "name": "second",
                "command": ["sh", "-c", once],
                "retry": {"max_attempts": 2, "initial_delay_s": 0},
                "depends_on": ["first"],
            },
            {"name": "third", "action": "noop", "depends_on": [{"task": "second", "kind": "soft"}]},
        ],
    }


async def test_brief_and_none_views_agree_with_the_full_one(
    platform: Platform, tmp_path: Path
) -> None:
    p = platform
    admin = bearer(await p.login("admin", ADMIN_PASSWORD))
    wf_id = await _submit(p, admin, flaky(tmp_path / "failed-once"))
    await _all_ended(p, [wf_id])

    def get(**params: str) -> Any:
        return p.orch.get(f"/workflows/{wf_id}", headers=admin, params=params)

    full = (await get()).json()["data"]
    brief = (await get(tasks="brief")).json()["data"]
    none = (await get(tasks="none")).json()["data"]

    workflow_part = {k: v for k, v in full.items() if k != "tasks"}
    assert {k: v for k, v in brief.items() if k != "tasks"} == workflow_part
    assert none == workflow_part  # no "tasks" at all, task_counts kept
    assert [t["name"] for t in brief["tasks"]] == ["first", "second", "third"]
    for short, long in zip(brief["tasks"], full["tasks"], strict=True):
        assert set(short) == {
            "id", "name", "status", "depends_on", "attempt_count", "error", "started_at",
            "finished_at",
        }  # fmt: skip
        assert short["attempt_count"] == len(long["attempts"])
        assert {k: long[k] for k in short if k != "attempt_count"} == {
            k: v for k, v in short.items() if k != "attempt_count"
        }
    assert brief["status"] == "Completed"
    assert [t["attempt_count"] for t in brief["tasks"]] == [1, 2, 1]

    resp = await get(tasks="some")
    assert resp.status_code == 422 and "tasks" in resp.text
