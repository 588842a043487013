"""Workflow validation catches at submit what would otherwise fail only when the task runs."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from provisioning.orchestrator.api import WorkflowSpec


def _submit(task: dict[str, Any]) -> WorkflowSpec:
    return WorkflowSpec.model_validate({"name": "w", "tasks": [task]})


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ({"name": "a", "action": "sleep", "args": {"seconds": "abc"}}, "args.seconds"),
        ({"name": "a", "action": "sleep", "args": {"seconds": -1}}, "args.seconds"),
        ({"name": "a", "action": "fail", "args": {"message": 3}}, "args.message"),
        ({"name": "a", "command": ["true"], "env": {"A=B": "1"}}, "env name 'A=B'"),
        ({"name": "a", "command": ["true"], "env": {"": "1"}}, "env name ''"),
        ({"name": "a", "command": ["echo", "a\x00b"]}, "tasks[0].command[1] contains a NUL"),
        ({"name": "a"}, "exactly one of `command` or `action`"),
    ],
)
def test_a_task_that_could_not_run_is_refused_at_submit(
    task: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValidationError) as err:
        _submit(task)
    assert expected in str(err.value)


def test_plain_dependency_names_are_hard_dependencies() -> None:
    spec = WorkflowSpec.model_validate(
        {
            "name": "w",
            "tasks": [
                {"name": "a", "action": "noop"},
                {"name": "b", "action": "noop", "depends_on": ["a", {"task": "a", "kind": "soft"}]},
            ],
        }
    )
    assert [(d.task, d.kind.value) for d in spec.tasks[1].dependencies()] == [
        ("a", "hard"),
        ("a", "soft"),
    ]
