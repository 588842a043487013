"""The orchestrator's scheduling semantics, each behaviour on every backend (DESIGN.md §5).

Tasks record what ran, and in which order, by appending lines to files under ``tmp_path``;
the tests read those files and the store, and wait for states by polling with a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from provisioning.core.errors import DagError, LimitExceeded
from provisioning.orchestrator.api import RetryPolicy, WorkflowSpec
from provisioning.orchestrator.store import backoff_delay
from tests.conftest import tasks_by_name, wait_workflow

pytestmark = pytest.mark.timeout(60)

NO_RETRY = {"max_attempts": 1}
# Waits (at most ~10 s) for the file $GATE; the test creates it to let the task finish.
WAIT_FOR_GATE = 'i=0; while [ ! -f "$GATE" ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done'


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def record(name: str, var: str = "ORDER") -> list[str]:
    """A command appending ``name`` as one line to the file named by ``$var``."""
    return sh(f'echo {name} >> "${var}"')


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def until(
    check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 15.0
) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        ok = check()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout}s for {what}")
        await asyncio.sleep(0.02)


async def task_status(svc: Any, wf_id: str, name: str) -> str:
    return tasks_by_name(await svc.store.get_workflow(wf_id))[name]["status"]


async def submit(svc: Any, doc: dict[str, Any]) -> str:
    wf_id, created = await svc.engine.submit(WorkflowSpec.model_validate(doc))
    assert created
    return wf_id


async def run_probe(svc: Any) -> None:
    """Submit and finish a one-task workflow: proves the scheduler made a claim pass since."""
    probe = await submit(svc, {"name": "probe", "tasks": [{"name": "p", "action": "noop"}]})
    assert (await wait_workflow(svc, probe))["status"] == "Completed"


def max_overlap(marks: list[str]) -> int:
    """Most tasks between their ``start`` and ``end`` marks at once, in file (append) order."""
    running = peak = 0
    for line in marks:
        running += 1 if line.startswith("start") else -1
        peak = max(peak, running)
    return peak


def overlapping_task(name: str, marks: Path, together: int, **extra: Any) -> dict[str, Any]:
    """A task that marks its start, waits until ``together`` tasks started, then marks its end.

    The wait (bounded to ~3 s) makes the allowed parallelism actually happen; the short sleep
    after it leaves room for a task started beyond the limit to show up as extra overlap.
    """
    script = (
        f'echo "start {name}" >> "$MARKS"; i=0; '
        f'while [ "$(grep -c ^start "$MARKS")" -lt {together} ] && [ $i -lt 150 ]; '
        "do sleep 0.02; i=$((i+1)); done; "
        f'sleep 0.2; echo "end {name}" >> "$MARKS"'
    )
    return {"name": name, "command": sh(script), "env": {"MARKS": str(marks)}, **extra}


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an unreaped orphan counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ---------------------------------------------------------------------------- priorities


async def test_higher_priority_ready_tasks_start_first(make_service, tmp_path: Path) -> None:
    svc = await make_service(max_parallel=1)
    order, gate = tmp_path / "order", tmp_path / "gate"
    env = {"ORDER": str(order), "GATE": str(gate)}
    blocker = await submit(
        svc,
        {
            "name": "blocker",
            "tasks": [
                {"name": "b", "command": sh(f"echo blocker >> $ORDER; {WAIT_FOR_GATE}"), "env": env}
            ],
        },
    )
    await until(lambda: lines(order) == ["blocker"], "the blocker to hold the only slot")
    await submit(
        svc,
        {
            "name": "mixed",
            "tasks": [
                {"name": "zero", "command": record("zero"), "env": env},
                {"name": "seven", "command": record("seven"), "env": env, "priority": 7},
                {"name": "minus", "command": record("minus"), "env": env, "priority": -2},
            ],
        },
    )
    await submit(
        svc,
        {
            "name": "urgent",
            "priority": 5,
            "tasks": [{"name": "five", "command": record("five"), "env": env}],
        },
    )
    gate.touch()
    await until(lambda: len(lines(order)) == 5, "every task to run")
    assert lines(order) == ["blocker", "seven", "five", "zero", "minus"]
    assert (await wait_workflow(svc, blocker))["status"] == "Completed"


async def test_equal_priority_tasks_start_in_ready_order_then_submission_order(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service(max_parallel=1)
    order, gate = tmp_path / "order", tmp_path / "gate"
    env = {"ORDER": str(order), "GATE": str(gate)}
    await submit(
        svc,
        {
            "name": "blocker",
            "tasks": [
                {"name": "b", "command": sh(f"echo blocker >> $ORDER; {WAIT_FOR_GATE}"), "env": env}
            ],
        },
    )
    await until(lambda: lines(order) == ["blocker"], "the blocker to hold the only slot")
    first = await submit(
        svc,
        {
            "name": "first",
            "tasks": [
                {"name": "x1", "command": record("x1"), "env": env},
                {"name": "x2", "command": record("x2"), "env": env},
                {"name": "x3", "command": record("x3"), "env": env},
            ],
        },
    )
    # Ready later than every task of `first`, although it is the first task of its workflow.
    second = await submit(
        svc, {"name": "second", "tasks": [{"name": "y1", "command": record("y1"), "env": env}]}
    )
    gate.touch()
    for wf_id in (first, second):
        assert (await wait_workflow(svc, wf_id))["status"] == "Completed"
    assert lines(order) == ["blocker", "x1", "x2", "x3", "y1"]


# ---------------------------------------------------------------------------- retries


def test_backoff_delay_grows_exponentially_within_jitter_and_caps_at_the_maximum() -> None:
    rng = random.Random(20240601)
    policy = RetryPolicy(
        max_attempts=10, backoff="exponential", initial_delay_s=0.5, max_delay_s=5.0, jitter=0.3
    )
    for failed in range(1, 9):
        base = min(5.0, 0.5 * 2 ** (failed - 1))
        draws = [backoff_delay(policy, failed, rng) for _ in range(2000)]
        assert all(base * 0.7 <= d <= base for d in draws), failed
        # The jitter spreads the delays over the whole band, not one corner of it.
        assert min(draws) < base * 0.72
        assert max(draws) > base * 0.98
    assert max(backoff_delay(policy, 50, rng) for _ in range(500)) <= 5.0
    # Zero failures is treated as one: the first retry waits about the initial delay.
    assert all(0.35 <= backoff_delay(policy, 0, rng) <= 0.5 for _ in range(500))


def test_fixed_backoff_waits_the_initial_delay_within_jitter_whatever_the_attempt() -> None:
    rng = random.Random(7)
    policy = RetryPolicy(backoff="fixed", initial_delay_s=2.0, max_delay_s=300, jitter=0.5)
    for failed in (1, 2, 5, 30):
        draws = [backoff_delay(policy, failed, rng) for _ in range(1000)]
        assert all(1.0 <= d <= 2.0 for d in draws)
        assert min(draws) < 1.05 and max(draws) > 1.95
    capped = RetryPolicy(backoff="fixed", initial_delay_s=10, max_delay_s=3, jitter=0)
    assert backoff_delay(capped, 4, rng) == 3.0
    exact = RetryPolicy(backoff="exponential", initial_delay_s=1.5, max_delay_s=300, jitter=0)
    assert [backoff_delay(exact, n, rng) for n in (1, 2, 3, 4)] == [1.5, 3.0, 6.0, 12.0]


async def test_a_failing_task_is_retried_after_its_jittered_exponential_backoff(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service()
    starts = tmp_path / "starts"
    retry = {
        "max_attempts": 3,
        "backoff": "exponential",
        "initial_delay_s": 0.3,
        "max_delay_s": 60,
        "jitter": 0.5,
    }
    wf_id = await submit(
        svc,
        {
            "name": "flaky",
            "tasks": [
                {
                    "name": "flaky",
                    # Fails on its first two attempts, succeeds on the third.
                    "command": sh('echo x >> "$STARTS"; [ "$(wc -l < "$STARTS")" -ge 3 ]'),
                    "env": {"STARTS": str(starts)},
                    "retry": retry,
                }
            ],
        },
    )
    doc = await wait_workflow(svc, wf_id)
    assert doc["status"] == "Completed"
    attempts = tasks_by_name(doc)["flaky"]["attempts"]
    assert [a["exit_code"] for a in attempts] == [1, 1, 0]
    begun = [a["started_at"] for a in attempts]
    slack = 2.0  # scheduling and process start under load; the lower bound is exact
    for n, (before, after) in enumerate(itertools.pairwise(begun), start=1):
        delay = 0.3 * 2 ** (n - 1)
        gap = (after - before).total_seconds()
        assert delay * (1 - 0.5) <= gap <= delay + slack, (n, gap)
        # The wait itself runs from the failure being recorded to the next start.
        waited = (after - attempts[n - 1]["ended_at"]).total_seconds()
        assert delay * (1 - 0.5) <= waited, (n, waited)


# ---------------------------------------------------------------------------- timeouts


async def test_a_timed_out_task_has_its_whole_process_group_killed(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service(kill_grace_s=0.5)
    pidfile = tmp_path / "grandchild.pid"
    wf_id = await submit(
        svc,
        {
            "name": "hang",
            "tasks": [
                {
                    "name": "hang",
                    "command": sh('sleep 1000 & echo $! > "$PIDFILE"; wait'),
                    "env": {"PIDFILE": str(pidfile)},
                    "timeout_s": 0.5,
                    "retry": NO_RETRY,
                    "on_failure": "fail",
                }
            ],
        },
    )
    doc = await wait_workflow(svc, wf_id)
    task = tasks_by_name(doc)["hang"]
    assert doc["status"] == "Failed"
    assert task["status"] == "Failed"
    assert "timed out" in task["error"]
    pid = int(pidfile.read_text())
    await until(lambda: not alive(pid), f"the grandchild sleep (pid {pid}) to be killed", 10)


async def test_a_timed_out_task_ignoring_sigterm_is_killed_after_the_grace(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service(kill_grace_s=0.3)
    pidfile = tmp_path / "stubborn.pid"
    wf_id = await submit(
        svc,
        {
            "name": "stubborn",
            "tasks": [
                {
                    "name": "stubborn",
                    "command": sh(
                        'trap "" TERM; echo $$ > "$PIDFILE"; while :; do sleep 0.05; done'
                    ),
                    "env": {"PIDFILE": str(pidfile)},
                    "timeout_s": 0.3,
                    "retry": NO_RETRY,
                    "on_failure": "fail",
                }
            ],
        },
    )
    doc = await wait_workflow(svc, wf_id)
    task = tasks_by_name(doc)["stubborn"]
    assert task["status"] == "Failed"
    assert "timed out" in task["error"]
    assert task["attempts"][0]["exit_code"] == -9  # SIGKILL, after SIGTERM was ignored
    pid = int(pidfile.read_text())
    await until(lambda: not alive(pid), f"the task's shell (pid {pid}) to be killed", 10)


# ---------------------------------------------------------------------------- limits


async def test_max_parallel_limits_running_tasks_across_workflows(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service(max_parallel=2)
    marks = tmp_path / "marks"
    ids = [
        await submit(
            svc,
            {
                "name": f"wf{w}",
                "tasks": [overlapping_task(f"t{w}{i}", marks, together=2) for i in range(3)],
            },
        )
        for w in range(2)
    ]
    for wf_id in ids:
        assert (await wait_workflow(svc, wf_id))["status"] == "Completed"
    assert len(lines(marks)) == 12
    assert max_overlap(lines(marks)) == 2


async def test_parallel_limit_caps_running_tasks_of_one_workflow(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service(max_parallel=8)
    marks = tmp_path / "marks"
    wf_id = await submit(
        svc,
        {
            "name": "limited",
            "parallel_limit": 2,
            "tasks": [overlapping_task(f"t{i}", marks, together=2) for i in range(5)],
        },
    )
    assert (await wait_workflow(svc, wf_id))["status"] == "Completed"
    assert len(lines(marks)) == 10
    assert max_overlap(lines(marks)) == 2


async def test_concurrency_keys_cap_running_tasks_per_key(make_service, tmp_path: Path) -> None:
    svc = await make_service(max_parallel=8, concurrency_limits={"pool": 2})
    pool, solo = tmp_path / "pool", tmp_path / "solo"
    wf_id = await submit(
        svc,
        {
            "name": "keyed",
            "tasks": [
                *(
                    overlapping_task(f"p{i}", pool, together=2, concurrency_key="pool")
                    for i in range(4)
                ),
                # A key missing from concurrency_limits gets default_key_limit (1).
                *(
                    overlapping_task(f"s{i}", solo, together=1, concurrency_key="solo")
                    for i in range(3)
                ),
            ],
        },
    )
    assert (await wait_workflow(svc, wf_id))["status"] == "Completed"
    assert len(lines(pool)) == 8 and len(lines(solo)) == 6
    assert max_overlap(lines(pool)) == 2
    assert max_overlap(lines(solo)) == 1


async def test_limits_hold_across_two_workers_sharing_a_store(make_service, tmp_path: Path) -> None:
    # max_parallel 1 each: any two tasks running at once run on different workers, so every
    # overlap below is between the workers, and a limit not counted across them shows as 2.
    a = await make_service("worker-a", max_parallel=1, concurrency_limits={"pool": 2})
    b = await make_service("worker-b", max_parallel=1, concurrency_limits={"pool": 2})
    limited, solo, pool = tmp_path / "limited", tmp_path / "solo", tmp_path / "pool"
    first = await submit(
        a,
        {
            "name": "limited",
            "parallel_limit": 1,
            "tasks": [overlapping_task(f"l{i}", limited, together=1) for i in range(4)],
        },
    )
    second = await submit(
        b,
        {
            "name": "keyed",
            "tasks": [
                *(
                    overlapping_task(f"s{i}", solo, together=1, concurrency_key="solo")
                    for i in range(4)
                ),
                *(
                    overlapping_task(f"p{i}", pool, together=2, concurrency_key="pool")
                    for i in range(2)
                ),
            ],
        },
    )
    workers: set[str] = set()
    for wf_id in (first, second):
        doc = await wait_workflow(a, wf_id)
        assert doc["status"] == "Completed"
        workers |= {att["worker"] for t in doc["tasks"] for att in t["attempts"]}
    assert len(lines(limited)) == 8 and len(lines(solo)) == 8 and len(lines(pool)) == 4
    assert max_overlap(lines(limited)) == 1
    assert max_overlap(lines(solo)) == 1
    assert max_overlap(lines(pool)) == 2  # the key allows two: one on each worker
    assert workers == {"worker-a", "worker-b"}


# ---------------------------------------------------------------------------- dependencies


def _failing(name: str) -> dict[str, Any]:
    return {"name": name, "action": "fail", "retry": NO_RETRY, "on_failure": "continue"}


def _dependant(name: str, on: str, kind: str) -> dict[str, Any]:
    return {"name": name, "action": "noop", "depends_on": [{"task": on, "kind": kind}]}


async def test_hard_dependant_runs_only_after_its_dependency_completed(make_service) -> None:
    svc = await make_service()
    wf_id = await submit(
        svc,
        {
            "name": "hard",
            "tasks": [
                {"name": "ok", "action": "noop"},
                _failing("bad"),
                _dependant("after-ok", "ok", "hard"),
                _dependant("after-bad", "bad", "hard"),
                _dependant("after-skipped", "after-bad", "hard"),
            ],
        },
    )
    doc = await wait_workflow(svc, wf_id)
    tasks = tasks_by_name(doc)
    assert {n: t["status"] for n, t in tasks.items()} == {
        "ok": "Completed",
        "bad": "Failed",
        "after-ok": "Completed",
        "after-bad": "Skipped",
        "after-skipped": "Skipped",
    }
    assert tasks["after-bad"]["attempts"] == [] and tasks["after-skipped"]["attempts"] == []
    assert doc["status"] == "Failed"


async def test_soft_dependant_runs_after_a_failed_dependency_but_not_a_skipped_one(
    make_service,
) -> None:
    svc = await make_service()
    wf_id = await submit(
        svc,
        {
            "name": "soft",
            "tasks": [
                {"name": "ok", "action": "noop"},
                _failing("bad"),
                _dependant("skipped", "bad", "hard"),
                _dependant("soft-ok", "ok", "soft"),
                _dependant("soft-bad", "bad", "soft"),
                _dependant("soft-skipped", "skipped", "soft"),
            ],
        },
    )
    doc = await wait_workflow(svc, wf_id)
    tasks = tasks_by_name(doc)
    assert tasks["skipped"]["status"] == "Skipped"
    assert tasks["soft-ok"]["status"] == "Completed"
    assert tasks["soft-bad"]["status"] == "Completed"
    assert len(tasks["soft-bad"]["attempts"]) == 1
    assert tasks["soft-skipped"]["status"] == "Skipped"
    assert tasks["soft-skipped"]["attempts"] == []


async def test_optional_dependant_runs_whatever_its_dependency_ended_as(make_service) -> None:
    svc = await make_service()
    wf_id = await submit(
        svc,
        {
            "name": "optional",
            "tasks": [
                {"name": "ok", "action": "noop"},
                _failing("bad"),
                _dependant("skipped", "bad", "hard"),
                _dependant("opt-ok", "ok", "optional"),
                _dependant("opt-bad", "bad", "optional"),
                _dependant("opt-skipped", "skipped", "optional"),
            ],
        },
    )
    doc = await wait_workflow(svc, wf_id)
    tasks = tasks_by_name(doc)
    assert tasks["skipped"]["status"] == "Skipped"
    for name in ("opt-ok", "opt-bad", "opt-skipped"):
        assert tasks[name]["status"] == "Completed", name
        assert len(tasks[name]["attempts"]) == 1, name


async def test_outputs_of_dependencies_reach_dependants_as_input_variables(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service()
    seen = tmp_path / "seen.json"
    wf_id = await submit(
        svc,
        {
            "name": "outputs",
            "tasks": [
                {
                    "name": "make",
                    # Several JSON lines merge into one outputs object.
                    "command": sh(
                        'echo \'{"ip": "10.0.0.5", "n": 1}\' >> "$PRVNG_OUTPUT"; '
                        'echo \'{"n": 2, "tags": ["a"]}\' >> "$PRVNG_OUTPUT"'
                    ),
                },
                {
                    "name": "db.primary-1",
                    "command": sh('echo \'{"port": 5432}\' > "$PRVNG_OUTPUT"'),
                },
                {
                    "name": "use",
                    "command": sh(
                        'printf \'{"make": %s, "db": %s}\' '
                        '"$PRVNG_INPUT_MAKE" "$PRVNG_INPUT_DB_PRIMARY_1" > "$SEEN"; '
                        'echo "{\\"got\\": $PRVNG_INPUT_MAKE}" > "$PRVNG_OUTPUT"'
                    ),
                    "env": {"SEEN": str(seen)},
                    "depends_on": ["make", "db.primary-1"],
                },
            ],
        },
    )
    doc = await wait_workflow(svc, wf_id)
    assert doc["status"] == "Completed", doc
    tasks = tasks_by_name(doc)
    made = {"ip": "10.0.0.5", "n": 2, "tags": ["a"]}
    assert tasks["make"]["outputs"] == made
    assert json.loads(seen.read_text()) == {"make": made, "db": {"port": 5432}}
    assert tasks["use"]["outputs"] == {"got": made}


# ---------------------------------------------------------------------------- control


async def test_cancel_kills_the_running_task_and_cancels_its_waiting_dependants(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service(kill_grace_s=0.5)
    pidfile = tmp_path / "long.pid"
    wf_id = await submit(
        svc,
        {
            "name": "cancel-me",
            "tasks": [
                {
                    "name": "long",
                    "command": sh('echo $$ > "$PIDFILE"; exec sleep 1000'),
                    "env": {"PIDFILE": str(pidfile)},
                },
                {"name": "next", "action": "noop", "depends_on": ["long"]},
                {"name": "last", "action": "noop", "depends_on": ["next"]},
            ],
        },
    )
    await until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", "long to start")
    pid = int(pidfile.read_text())
    await svc.engine.cancel(wf_id)
    doc = await wait_workflow(svc, wf_id)
    assert doc["status"] == "Cancelled"
    assert {n: t["status"] for n, t in tasks_by_name(doc).items()} == {
        "long": "Cancelled",
        "next": "Cancelled",
        "last": "Cancelled",
    }
    assert tasks_by_name(doc)["next"]["attempts"] == []
    await until(lambda: not alive(pid), f"the cancelled task's process {pid} to be gone", 10)


async def test_a_paused_workflow_starts_no_task_until_resumed(make_service, tmp_path: Path) -> None:
    svc = await make_service()
    order, gate = tmp_path / "order", tmp_path / "gate"
    env = {"ORDER": str(order), "GATE": str(gate)}
    wf_id = await submit(
        svc,
        {
            "name": "pausable",
            "tasks": [
                {
                    "name": "first",
                    "command": sh(f"echo first >> $ORDER; {WAIT_FOR_GATE}"),
                    "env": env,
                },
                {
                    "name": "second",
                    "command": record("second"),
                    "env": env,
                    "depends_on": ["first"],
                },
            ],
        },
    )
    await until(lambda: lines(order) == ["first"], "first to start")
    await svc.engine.pause(wf_id)
    gate.touch()

    async def first_done() -> bool:
        return await task_status(svc, wf_id, "first") == "Completed"

    await until(first_done, "the running task to finish while paused")
    await run_probe(svc)
    doc = await svc.store.get_workflow(wf_id)
    assert doc["status"] == "Paused"
    assert tasks_by_name(doc)["second"]["status"] == "Ready"
    assert lines(order) == ["first"]

    await svc.engine.resume(wf_id)
    assert (await wait_workflow(svc, wf_id))["status"] == "Completed"
    assert lines(order) == ["first", "second"]


async def test_resuming_a_workflow_whose_tasks_all_finished_while_paused_completes_it(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service()
    order, gate = tmp_path / "order", tmp_path / "gate"
    env = {"ORDER": str(order), "GATE": str(gate)}
    wf_id = await submit(
        svc,
        {
            "name": "pausable",
            "tasks": [
                {"name": "only", "command": sh(f"echo only >> $ORDER; {WAIT_FOR_GATE}"), "env": env}
            ],
        },
    )
    await until(lambda: lines(order) == ["only"], "the task to start")
    await svc.engine.pause(wf_id)
    gate.touch()

    async def only_done() -> bool:
        return await task_status(svc, wf_id, "only") == "Completed"

    await until(only_done, "the running task to finish while paused")
    assert (await svc.store.get_workflow(wf_id))["status"] == "Paused"
    await svc.engine.resume(wf_id)
    assert (await wait_workflow(svc, wf_id, timeout=10))["status"] == "Completed"


async def test_retry_reruns_only_failed_and_skipped_tasks_and_completes(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service()
    runs, marker = tmp_path / "runs", tmp_path / "fixed"
    env = {"RUNS": str(runs), "MARKER": str(marker)}
    wf_id = await submit(
        svc,
        {
            "name": "resumable",
            "tasks": [
                {"name": "prepare", "command": record("prepare", "RUNS"), "env": env},
                {"name": "side", "command": record("side", "RUNS"), "env": env},
                {
                    "name": "deploy",
                    "command": sh('echo deploy >> "$RUNS"; [ -f "$MARKER" ]'),
                    "env": env,
                    "depends_on": ["prepare"],
                    "retry": NO_RETRY,
                    "on_failure": "fail",
                },
                {
                    "name": "verify",
                    "command": record("verify", "RUNS"),
                    "env": env,
                    "depends_on": ["deploy"],
                },
            ],
        },
    )
    doc = await wait_workflow(svc, wf_id)
    assert doc["status"] == "Failed"
    before = tasks_by_name(doc)
    assert before["deploy"]["status"] == "Failed"
    assert before["verify"]["status"] == "Skipped"

    marker.touch()
    assert await svc.engine.retry(wf_id) == 2
    doc = await wait_workflow(svc, wf_id)
    assert doc["status"] == "Completed", doc
    after = tasks_by_name(doc)
    assert {n: t["status"] for n, t in after.items()} == dict.fromkeys(after, "Completed")
    for name in ("prepare", "side"):
        assert after[name]["attempts"] == before[name]["attempts"], name
    assert len(after["deploy"]["attempts"]) == 2
    assert len(after["verify"]["attempts"]) == 1
    assert sorted(lines(runs)) == ["deploy", "deploy", "prepare", "side", "verify"]


async def test_a_cancelled_workflow_can_be_retried_to_completion(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service(kill_grace_s=0.5)
    started, marker = tmp_path / "started", tmp_path / "go"
    env = {"STARTED": str(started), "GATE": str(marker)}
    wf_id = await submit(
        svc,
        {
            "name": "cancel-then-retry",
            "tasks": [
                {"name": "done", "action": "noop"},
                {
                    "name": "waits",
                    "command": sh(f'echo x >> "$STARTED"; {WAIT_FOR_GATE}; [ -f "$GATE" ]'),
                    "env": env,
                    "depends_on": ["done"],
                },
                {"name": "after", "action": "noop", "depends_on": ["waits"]},
            ],
        },
    )
    await until(lambda: lines(started) == ["x"], "the gated task to start")
    await svc.engine.cancel(wf_id)
    before = tasks_by_name(await wait_workflow(svc, wf_id))
    assert before["waits"]["status"] == before["after"]["status"] == "Cancelled"

    marker.touch()
    assert await svc.engine.retry(wf_id) == 2
    doc = await wait_workflow(svc, wf_id)
    assert doc["status"] == "Completed", doc
    after = tasks_by_name(doc)
    assert after["done"]["attempts"] == before["done"]["attempts"]
    assert len(after["waits"]["attempts"]) == 2
    assert after["after"]["status"] == "Completed"


# ---------------------------------------------------------------------------- on_failure


def _undoable(name: str, undo: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "action": "noop",
        "rollback": record(f"undo-{name}", "UNDO"),
        "env": {"UNDO": str(undo)},
        **extra,
    }


async def test_a_failed_task_rolls_back_completed_ones_in_reverse_topological_order(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service()
    undo = tmp_path / "undo"
    wf_id = await submit(
        svc,
        {
            "name": "chain",
            "tasks": [
                _undoable("a", undo),
                _undoable("b", undo, depends_on=["a"]),
                {
                    "name": "c",
                    "action": "fail",
                    "retry": NO_RETRY,
                    "on_failure": "rollback",
                    "depends_on": ["b"],
                },
            ],
        },
    )
    doc = await wait_workflow(svc, wf_id)
    assert doc["status"] == "RolledBack", doc
    assert lines(undo) == ["undo-b", "undo-a"]
    tasks = tasks_by_name(doc)
    assert {n: t["status"] for n, t in tasks.items()} == {
        "a": "RolledBack",
        "b": "RolledBack",
        "c": "Failed",
    }
    assert [a["phase"] for a in tasks["a"]["attempts"]] == ["run", "rollback"]


async def test_rollback_waits_for_running_tasks_and_skips_waiting_ones(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service()
    undo, gate, order = tmp_path / "undo", tmp_path / "gate", tmp_path / "order"
    wf_id = await submit(
        svc,
        {
            "name": "drain",
            "tasks": [
                {
                    "name": "slow",
                    "command": sh(f"echo slow >> $ORDER; {WAIT_FOR_GATE}"),
                    "rollback": record("undo-slow", "UNDO"),
                    "env": {"UNDO": str(undo), "GATE": str(gate), "ORDER": str(order)},
                },
                {"name": "later", "action": "noop", "depends_on": ["slow"]},
                _undoable("a", undo),
                {"name": "c", "action": "fail", "retry": NO_RETRY, "depends_on": ["a"]},
            ],
        },
    )
    await wait_workflow(svc, wf_id, {"RollingBack"})
    assert lines(order) == ["slow"]
    await run_probe(svc)
    assert not undo.exists(), "a compensation started while a task was still running"
    gate.touch()
    doc = await wait_workflow(svc, wf_id)
    assert doc["status"] == "RolledBack", doc
    # Reverse topological order: a (after slow in the stable order) is undone first.
    assert lines(undo) == ["undo-a", "undo-slow"]
    tasks = tasks_by_name(doc)
    assert tasks["later"]["status"] == "Skipped"
    assert tasks["later"]["attempts"] == []


async def test_a_completed_workflow_rolls_back_on_demand(make_service, tmp_path: Path) -> None:
    svc = await make_service()
    undo = tmp_path / "undo"
    wf_id = await submit(
        svc,
        {
            "name": "done",
            "tasks": [
                _undoable("a", undo),
                _undoable("b", undo, depends_on=["a"]),
                {"name": "no-undo", "action": "noop", "depends_on": ["b"]},
            ],
        },
    )
    assert (await wait_workflow(svc, wf_id))["status"] == "Completed"
    assert not undo.exists()
    await svc.engine.rollback(wf_id)
    doc = await wait_workflow(svc, wf_id, {"RolledBack", "Failed"})
    assert doc["status"] == "RolledBack", doc
    assert lines(undo) == ["undo-b", "undo-a"]
    tasks = tasks_by_name(doc)
    assert tasks["a"]["status"] == tasks["b"]["status"] == "RolledBack"


async def test_on_failure_fail_lets_running_tasks_finish_and_skips_waiting_ones(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service()
    gate, order = tmp_path / "gate", tmp_path / "order"
    env = {"GATE": str(gate), "ORDER": str(order)}
    wf_id = await submit(
        svc,
        {
            "name": "fail-fast",
            "tasks": [
                {
                    "name": "running",
                    "command": sh(f"echo running >> $ORDER; {WAIT_FOR_GATE}"),
                    "rollback": record("undo-running"),
                    "env": env,
                },
                {
                    "name": "waiting",
                    "command": record("waiting"),
                    "env": env,
                    "depends_on": ["running"],
                },
                {"name": "bad", "action": "fail", "retry": NO_RETRY, "on_failure": "fail"},
            ],
        },
    )
    await until(lambda: lines(order) == ["running"], "the long task to start")

    async def bad_failed() -> bool:
        return await task_status(svc, wf_id, "bad") == "Failed"

    await until(bad_failed, "bad to fail")
    gate.touch()
    doc = await wait_workflow(svc, wf_id)
    assert doc["status"] == "Failed"
    assert "bad" in doc["error"]
    assert {n: t["status"] for n, t in tasks_by_name(doc).items()} == {
        "running": "Completed",
        "waiting": "Skipped",
        "bad": "Failed",
    }
    assert lines(order) == ["running"]  # neither the waiting task nor a rollback ran


async def test_on_failure_continue_runs_independent_tasks_and_ends_failed(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service()
    order = tmp_path / "order"
    env = {"ORDER": str(order)}
    wf_id = await submit(
        svc,
        {
            "name": "keep-going",
            "tasks": [
                _failing("bad"),
                {
                    "name": "needs-bad",
                    "command": record("needs-bad"),
                    "env": env,
                    "depends_on": ["bad"],
                },
                {"name": "x", "command": record("x"), "env": env},
                {"name": "y", "command": record("y"), "env": env, "depends_on": ["x"]},
            ],
        },
    )
    doc = await wait_workflow(svc, wf_id)
    assert doc["status"] == "Failed"
    assert "continue" in doc["error"]
    assert {n: t["status"] for n, t in tasks_by_name(doc).items()} == {
        "bad": "Failed",
        "needs-bad": "Skipped",
        "x": "Completed",
        "y": "Completed",
    }
    assert lines(order) == ["x", "y"]


# ---------------------------------------------------------------------------- submission


async def test_submitting_the_same_idempotency_key_twice_returns_the_first_workflow(
    make_service,
) -> None:
    svc = await make_service()
    doc = {
        "name": "deploy",
        "idempotency_key": "deploy-42",
        "tasks": [{"name": "a", "action": "noop"}],
    }
    first, created = await svc.engine.submit(WorkflowSpec.model_validate(doc))
    assert created
    again, created_again = await svc.engine.submit(WorkflowSpec.model_validate(doc))
    other = {**doc, "name": "different", "tasks": [{"name": "b", "action": "fail"}]}
    third, created_third = await svc.engine.submit(WorkflowSpec.model_validate(other))
    assert (again, created_again) == (first, False)
    assert (third, created_third) == (first, False)
    listed = await svc.store.list_workflows()
    assert [w["id"] for w in listed] == [first]
    assert (await wait_workflow(svc, first))["status"] == "Completed"


@pytest.mark.parametrize(
    ("tasks", "error", "fragments"),
    [
        pytest.param(
            [
                {"name": "a", "action": "noop", "depends_on": ["c"]},
                {"name": "b", "action": "noop", "depends_on": ["a"]},
                {"name": "c", "action": "noop", "depends_on": ["b"]},
                {"name": "free", "action": "noop"},
            ],
            DagError,
            ["cycle", "a", "b", "c"],
            id="cycle",
        ),
        pytest.param(
            [{"name": "a", "action": "noop", "depends_on": ["ghost"]}],
            DagError,
            ["unknown", "ghost"],
            id="unknown-dependency",
        ),
        pytest.param(
            [{"name": "a", "action": "noop"}, {"name": "a", "action": "noop"}],
            DagError,
            ["duplicate", "'a'"],
            id="duplicate-name",
        ),
        pytest.param(
            [
                {"name": "a", "action": "noop"},
                {"name": "b", "action": "noop", "depends_on": ["a", {"task": "a", "kind": "soft"}]},
            ],
            DagError,
            ["twice", "'a'"],
            id="repeated-dependency",
        ),
        pytest.param(
            [{"name": "a", "action": "noop", "depends_on": ["a"]}],
            DagError,
            ["itself"],
            id="self-dependency",
        ),
        pytest.param(
            [{"name": f"t{i}", "action": "noop"} for i in range(5)],
            LimitExceeded,
            ["5 tasks", "maximum is 4"],
            id="too-many-tasks",
        ),
    ],
)
async def test_an_invalid_dag_is_rejected_and_nothing_is_stored(
    make_service, tasks: list[dict[str, Any]], error: type[Exception], fragments: list[str]
) -> None:
    svc = await make_service(max_tasks=4)
    spec = WorkflowSpec.model_validate({"name": "bad", "idempotency_key": "k", "tasks": tasks})
    with pytest.raises(error) as raised:
        await svc.engine.submit(spec)
    for fragment in fragments:
        assert fragment in str(raised.value)
    assert await svc.store.list_workflows() == []
    assert await svc.store.list_tasks() == []
    assert await svc.store.find_by_idempotency_key("k") is None


async def test_cycle_error_names_the_cycle_in_dependency_order(make_service) -> None:
    svc = await make_service()
    spec = WorkflowSpec.model_validate(
        {
            "name": "loop",
            "tasks": [
                {"name": "start", "action": "noop"},
                {"name": "a", "action": "noop", "depends_on": ["start", "c"]},
                {"name": "b", "action": "noop", "depends_on": ["a"]},
                {"name": "c", "action": "noop", "depends_on": ["b"]},
            ],
        }
    )
    with pytest.raises(DagError) as raised:
        await svc.engine.submit(spec)
    path = str(raised.value).split("cycle: ", 1)[1].split(" -> ")
    assert path[0] == path[-1] and sorted(path[:-1]) == ["a", "b", "c"]
    # Each task in the path is a dependency of the next one: the order they would run in.
    depends_on = {t.name: set(t.depends_on) for t in spec.tasks}
    assert all(x in depends_on[y] for x, y in itertools.pairwise(path))
    assert await svc.store.list_workflows() == []
