"""``kill -9`` of a real orchestrator process (SQLite) at random moments loses nothing.

The worker keeps a fixed ``--worker-id``, so each restart takes its own Running tasks back at
once, kills their orphaned process groups and retries them per policy. Every task appends
``"<name> <attempt>"`` to a runs file, which tells what really ran, independently of the store.
Set ``PRVNG_E2E_SEED`` to replay a failing seed.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.procs import WorkerPool, pids_with_env, submit, wait_workflow

WORKER_ID = "embedded-test"
MAX_PARALLEL = 8
KILLS = 6
APPEND_RUN = 'echo "$PRVNG_TASK_NAME $PRVNG_ATTEMPT" >> "$RUNS_FILE"'


def _seed() -> int:
    return int(os.environ.get("PRVNG_E2E_SEED") or random.SystemRandom().randrange(2**32))


def _layered_workflow(rng: random.Random, runs: Path, layers: int, width: int) -> dict[str, Any]:
    """``layers`` x ``width`` tasks; each task past the first layer needs 1-3 of the previous."""
    tasks: list[dict[str, Any]] = []
    for layer in range(layers):
        for i in range(width):
            name = f"t{layer:02d}-{i:02d}"
            deps = (
                sorted(
                    f"t{layer - 1:02d}-{j:02d}" for j in rng.sample(range(width), rng.randint(1, 3))
                )
                if layer
                else []
            )
            pause = rng.uniform(0.02, 0.2)
            tasks.append(
                {
                    "name": name,
                    "command": ["sh", "-c", f"{APPEND_RUN}; sleep {pause:.3f}"],
                    "env": {"RUNS_FILE": str(runs)},
                    "depends_on": deps,
                    "retry": {"max_attempts": 10, "initial_delay_s": 0.1, "max_delay_s": 1},
                    "on_failure": "fail",
                }
            )
    return {"name": "crash-storm", "tasks": tasks}


def _runs(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, attempt = line.split()
        out.append((name, int(attempt)))
    return out


def _wait_progress(path: Path, at_least: int, deadline: float, ctx: str) -> None:
    """Wait until ``at_least`` distinct tasks have started running."""
    while len({name for name, _ in _runs(path)}) < at_least:
        assert time.monotonic() < deadline, f"{ctx}: fewer than {at_least} tasks ever ran"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_large_workflow_completes_despite_repeated_kill_9_of_its_worker(
    tmp_path: Path,
) -> None:
    seed = _seed()
    rng = random.Random(seed)
    ctx = f"seed={seed} (replay with PRVNG_E2E_SEED={seed})"
    runs = tmp_path / "runs.txt"
    spec = _layered_workflow(rng, runs, layers=12, width=20)
    n_tasks = len(spec["tasks"])
    # Kill moments: random points of progress, so every kill lands while work is under way.
    thresholds = sorted(rng.sample(range(n_tasks * 5 // 100, n_tasks * 85 // 100), KILLS))
    pool = WorkerPool(tmp_path)
    kills = 0
    t0 = time.monotonic()
    try:
        worker = pool.add(WORKER_ID, max_parallel=MAX_PARALLEL)
        worker.start()
        worker.wait_healthy()
        wf_id = submit(worker.url, spec)
        deadline = time.monotonic() + 80
        for threshold in thresholds:
            _wait_progress(runs, threshold, deadline, f"{ctx}, kills={kills}")
            time.sleep(rng.uniform(0, 0.15))  # a random moment, not a wait for a state
            worker.kill9()
            kills += 1
            worker.start()
            worker.wait_healthy()
        doc = wait_workflow(worker, wf_id, timeout=max(10.0, deadline - time.monotonic()), note=ctx)
        leftovers = pids_with_env(f"PRVNG_WORKFLOW_ID={wf_id}")
    finally:
        pool.close()
    elapsed = time.monotonic() - t0

    assert kills >= 5, ctx
    assert doc["status"] == "Completed", (
        f"{ctx}: {doc['status']} {doc['error']} {doc['task_counts']}"
    )
    not_done = {
        t["name"]: (t["status"], t["error"]) for t in doc["tasks"] if t["status"] != "Completed"
    }
    assert not not_done, f"{ctx}: tasks not Completed: {not_done}"
    assert len(doc["tasks"]) == n_tasks, ctx

    ran = _runs(runs)
    per_task = Counter(name for name, _ in ran)
    never = sorted(t["name"] for t in doc["tasks"] if per_task[t["name"]] == 0)
    assert not never, f"{ctx}: tasks Completed without ever running: {never}"
    twice = Counter(ran)
    assert max(twice.values()) == 1, (
        f"{ctx}: one attempt ran twice: {[k for k, v in twice.items() if v > 1]}"
    )
    rerun = {name: n for name, n in per_task.items() if n > 1}
    assert len(rerun) <= kills * MAX_PARALLEL, (
        f"{ctx}: {len(rerun)} tasks ran more than once after {kills} kills "
        f"(at most {kills * MAX_PARALLEL} may be in flight): {rerun}"
    )
    assert max(per_task.values()) <= kills + 1, f"{ctx}: a task ran too often: {rerun}"
    recorded = {t["name"]: len(t["attempts"]) for t in doc["tasks"]}
    unknown = [(name, n) for name, n in ran if n > recorded[name]]
    assert not unknown, f"{ctx}: runs of attempts the store does not know: {unknown}"
    lost = [
        (t["name"], a["number"])
        for t in doc["tasks"]
        for a in t["attempts"]
        if "lost the attempt" in (a["error"] or "")
    ]
    assert len(lost) <= kills * MAX_PARALLEL, (
        f"{ctx}: {len(lost)} attempts lost to {kills} kills of a worker running at most "
        f"{MAX_PARALLEL} at once: {lost}"
    )
    assert not leftovers, f"{ctx}: task processes outlived the workflow: {leftovers}"
    print(f"{ctx}: {n_tasks} tasks, {kills} kills, {len(rerun)} re-runs, {elapsed:.1f}s")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_task_lost_to_kill_9_without_retries_left_fails_its_workflow(tmp_path: Path) -> None:
    seed = _seed()
    rng = random.Random(seed)
    ctx = f"seed={seed} (replay with PRVNG_E2E_SEED={seed})"
    runs = tmp_path / "runs.txt"
    env = {"RUNS_FILE": str(runs)}
    spec = {
        "name": "lost-long-task",
        "tasks": [
            {"name": "quick", "command": ["sh", "-c", APPEND_RUN], "env": env},
            {
                "name": "long",
                "command": ["sh", "-c", f"{APPEND_RUN}; sleep 120"],
                "env": env,
                "depends_on": ["quick"],
                "retry": {"max_attempts": 1},
                "on_failure": "fail",
            },
            {
                "name": "after-long",
                "command": ["sh", "-c", APPEND_RUN],
                "env": env,
                "depends_on": ["long"],
            },
        ],
    }
    pool = WorkerPool(tmp_path)
    try:
        worker = pool.add(WORKER_ID, max_parallel=MAX_PARALLEL)
        worker.start()
        worker.wait_healthy()
        wf_id = submit(worker.url, spec)
        deadline = time.monotonic() + 30
        while ("long", 1) not in _runs(runs):
            assert time.monotonic() < deadline, f"{ctx}: the long task never started"
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))  # a random moment, not a wait for a state
        worker.kill9()
        worker.start()
        worker.wait_healthy()
        doc = wait_workflow(worker, wf_id, timeout=30, note=ctx)
        leftovers = pids_with_env(f"PRVNG_WORKFLOW_ID={wf_id}")
    finally:
        pool.close()

    tasks = {t["name"]: t for t in doc["tasks"]}
    assert doc["status"] == "Failed", f"{ctx}: {doc['status']} {doc['error']}"
    assert tasks["long"]["status"] == "Failed", f"{ctx}: {tasks['long']}"
    assert "lost the attempt" in (tasks["long"]["error"] or ""), f"{ctx}: {tasks['long']}"
    assert [a["number"] for a in tasks["long"]["attempts"]] == [1], f"{ctx}: {tasks['long']}"
    assert tasks["after-long"]["status"] == "Skipped", f"{ctx}: {tasks['after-long']}"
    assert tasks["quick"]["status"] == "Completed", f"{ctx}: {tasks['quick']}"
    assert Counter(name for name, _ in _runs(runs))["long"] == 1, ctx
    assert not leftovers, f"{ctx}: the lost task's processes were not killed: {leftovers}"
