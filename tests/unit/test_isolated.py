"""The isolated runner (``provisioning.core.isolated``) with real child processes: a result comes
back; an error raised in the child comes back as the same class; an evaluation that never ends
is stopped at the time limit and its process is gone; a memory bomb is stopped at the memory
limit; a function not on the allow-list is refused."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest

from provisioning.control_center.config_check import check_workspace
from provisioning.core.errors import NickelError, UsageError, ValidationError
from provisioning.core.isolated import ALLOWED, Limits, run
from provisioning.core.nickel import evaluate
from tests.helpers import isolated_children

EVALUATE = "provisioning.core.nickel:evaluate"
LIMITS = Limits(timeout_s=30, memory_mb=512)
# Exponential time, little memory: never ends in practice.
NEVER_ENDS = "let rec fib = fun n => if n < 2 then n else fib (n - 1) + fib (n - 2) in fib 100"
MEMORY_BOMB = "std.array.generate (fun i => i) 200000000"


def test_the_childs_result_comes_back() -> None:
    assert run(EVALUATE, {"expr": '{ a = 1 + 1, b = "x" }'}, limits=LIMITS) == {"a": 2, "b": "x"}


def test_a_workflow_file_is_read_in_the_child(tmp_path: Path) -> None:
    path = tmp_path / "wf.ncl"
    path.write_text('{ name = "w", tasks = [{ name = "a", action = "sleep" }] }')
    data = run(
        "provisioning.control_center.workflow_nickel:load_workflow_data",
        {"path": str(path)},
        limits=LIMITS,
    )
    assert data["name"] == "w" and [t["name"] for t in data["tasks"]] == ["a"]


def test_an_error_raised_in_the_child_comes_back_as_the_same_class_and_message() -> None:
    expr = '{ a = 1 + "one" }'
    with pytest.raises(NickelError) as here:
        evaluate(expr, source="in.ncl")
    with pytest.raises(NickelError) as there:
        run(EVALUATE, {"expr": expr, "source": "in.ncl"}, limits=LIMITS, source="in.ncl")
    assert type(there.value) is NickelError
    assert there.value.message == here.value.message
    assert there.value.details == here.value.details


def test_a_validation_error_in_a_check_comes_back_as_itself(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "infra").mkdir(parents=True)
    (ws / "infra" / "out").symlink_to(tmp_path)
    with pytest.raises(ValidationError, match="symbolic link") as caught:
        check_workspace(ws, "infra/out/x.ncl", "{}", limits=LIMITS)
    assert type(caught.value) is ValidationError and caught.value.details == {"field": "path"}


def test_an_evaluation_that_never_ends_is_stopped_and_its_process_is_gone() -> None:
    seen: list[psutil.Process] = []
    done = threading.Event()

    def watch() -> None:  # the child's pid, while it runs
        deadline = time.monotonic() + 20
        while not done.is_set() and time.monotonic() < deadline and not seen:
            seen.extend(isolated_children())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(NickelError) as caught:
            run(
                EVALUATE,
                {"expr": NEVER_ENDS},
                limits=Limits(timeout_s=1, memory_mb=512),
                source="loop.ncl",
            )
    finally:
        done.set()
        watcher.join(timeout=30)
    assert "loop.ncl took longer than 1 s and was stopped" in caught.value.message
    assert caught.value.details["limit"] == "time"
    assert seen, "the child was never seen running"
    for child in seen:
        assert not child.is_running()
    assert not isolated_children()


def test_a_memory_bomb_is_stopped_at_the_memory_limit() -> None:
    with pytest.raises(NickelError) as caught:
        run(
            EVALUATE,
            {"expr": MEMORY_BOMB},
            limits=Limits(timeout_s=60, memory_mb=300),
            source="bomb.ncl",
        )
    assert "memory limit of 300 MB" in caught.value.message
    assert "bomb.ncl" in caught.value.message
    assert caught.value.details["limit"] == "memory"
    assert not isolated_children()


@pytest.mark.parametrize(
    "function", ["os:system", "provisioning.core.nickel:evaluate_file", "nope", ""]
)
def test_a_function_not_on_the_allow_list_is_refused(function: str) -> None:
    assert function not in ALLOWED
    with pytest.raises(UsageError, match="may not run in an isolated child"):
        run(function, {"command": "true"}, limits=LIMITS)
