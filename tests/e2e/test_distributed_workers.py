"""Several orchestrator worker processes on one PostgreSQL share a workflow and survive each
other: ready tasks are claimed with ``FOR UPDATE SKIP LOCKED``, a dead worker's tasks are
taken over once its leases expire."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.procs import WorkerPool, get_workflow, pids_with_env, submit, wait_workflow

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(240)]

FAST_RETRY = {"max_attempts": 3, "initial_delay_s": 0.1, "max_delay_s": 1}


def _flat_workflow(name: str, n: int, seconds: float) -> dict[str, Any]:
    return {
        "name": name,
        "tasks": [
            {"name": f"t{i:03d}", "command": ["sleep", str(seconds)], "retry": FAST_RETRY}
            for i in range(n)
        ],
    }


def _workers_of(doc: dict[str, Any]) -> set[str]:
    return {a["worker"] for t in doc["tasks"] for a in t["attempts"]}


def test_two_workers_share_the_tasks_of_one_workflow(tmp_path: Path, pg_url: str) -> None:
    pool = WorkerPool(tmp_path)
    try:
        a = pool.add("worker-a", state_url=pg_url)
        b = pool.add("worker-b", state_url=pg_url)
        for w in (a, b):
            w.start()
        for w in (a, b):
            w.wait_healthy()
        wf_id = submit(a.url, _flat_workflow("shared", 60, 0.2))
        doc = wait_workflow(a, wf_id, timeout=90)
        assert b.proc is not None and b.proc.poll() is None, b.log_tail()
        leftovers = pids_with_env(f"PRVNG_WORKFLOW_ID={wf_id}")
    finally:
        pool.close()

    assert doc["status"] == "Completed", f"{doc['error']} {doc['task_counts']}"
    assert all(t["status"] == "Completed" for t in doc["tasks"])
    assert _workers_of(doc) == {"worker-a", "worker-b"}, _workers_of(doc)
    # Each task claimed once: no two workers ran the same task.
    multi = {t["name"]: t["attempts"] for t in doc["tasks"] if len(t["attempts"]) != 1}
    assert not multi, multi
    assert not leftovers, leftovers


def test_a_surviving_worker_takes_over_the_tasks_of_a_killed_one(
    tmp_path: Path, pg_url: str
) -> None:
    pool = WorkerPool(tmp_path)
    try:
        a = pool.add("worker-a", state_url=pg_url)
        b = pool.add("worker-b", state_url=pg_url)
        for w in (a, b):
            w.start()
        for w in (a, b):
            w.wait_healthy()
        wf_id = submit(a.url, _flat_workflow("takeover", 30, 1.0))
        deadline = time.monotonic() + 30
        on_b: set[str] = set()
        while not on_b:
            assert time.monotonic() < deadline, f"worker B never ran a task:\n{b.log_tail()}"
            doc = get_workflow(a.url, wf_id)
            on_b = {
                t["name"]
                for t in doc["tasks"]
                if t["status"] == "Running" and t["attempts"][-1]["worker"] == "worker-b"
            }
            if not on_b:
                time.sleep(0.05)
        b.kill9()
        killed_at = time.monotonic()
        doc = wait_workflow(a, wf_id, timeout=90, note="after worker B was killed")
        took = time.monotonic() - killed_at
        leftovers = pids_with_env(f"PRVNG_WORKFLOW_ID={wf_id}")
    finally:
        pool.close()

    assert doc["status"] == "Completed", f"{doc['error']} {doc['task_counts']}"
    assert all(t["status"] == "Completed" for t in doc["tasks"])
    tasks = {t["name"]: t for t in doc["tasks"]}
    # B's attempts either ended on B before the kill, or were lost and taken over by A.
    lost_on_b: set[str] = set()
    for name, t in tasks.items():
        attempts = t["attempts"]
        for i, at in enumerate(attempts):
            if at["worker"] != "worker-b" or at["exit_code"] == 0:
                continue
            assert "lost the attempt" in (at["error"] or ""), (name, attempts)
            later = attempts[i + 1 :]
            assert later and all(x["worker"] == "worker-a" for x in later), (name, attempts)
            assert later[-1]["exit_code"] == 0, (name, attempts)
            lost_on_b.add(name)
    # The tasks seen Running on B just before the kill (1 s each) cannot have finished there.
    assert on_b <= lost_on_b, (sorted(on_b), sorted(lost_on_b))
    assert not leftovers, leftovers
    print(f"B lost {sorted(lost_on_b)}; A finished the workflow {took:.1f}s after the kill")
