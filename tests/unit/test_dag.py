"""DAG validation: the errors name the tasks at fault."""

from __future__ import annotations

import pytest

from provisioning.core.errors import DagError, LimitExceeded
from provisioning.orchestrator.api import WorkflowSpec
from provisioning.orchestrator.dag import validate_dag


def _spec(tasks: list[dict[str, object]]) -> WorkflowSpec:
    return WorkflowSpec.model_validate({"name": "w", "tasks": tasks})


def _t(name: str, *deps: str) -> dict[str, object]:
    return {"name": name, "action": "noop", "depends_on": list(deps)}


def test_a_cycle_is_rejected_with_its_tasks_in_order() -> None:
    with pytest.raises(DagError) as err:
        validate_dag(_spec([_t("start"), _t("a", "start", "c"), _t("b", "a"), _t("c", "b")]), 100)
    cycle = err.value.details["cycle"]
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"a", "b", "c"}
    assert "start" not in cycle
    assert " -> ".join(cycle) in err.value.message


def test_an_unknown_dependency_is_named() -> None:
    with pytest.raises(DagError, match="'a' depends on unknown task 'ghost'"):
        validate_dag(_spec([_t("a", "ghost")]), 100)


def test_a_duplicate_name_is_named_with_both_positions() -> None:
    with pytest.raises(DagError, match=r"duplicate task name 'a' \(tasks\[0\] and tasks\[1\]\)"):
        validate_dag(_spec([_t("a"), _t("a")]), 100)


def test_a_self_dependency_is_rejected() -> None:
    with pytest.raises(DagError, match="depends on itself"):
        validate_dag(_spec([_t("a", "a")]), 100)


def test_more_tasks_than_the_limit_is_refused_with_both_numbers() -> None:
    with pytest.raises(LimitExceeded, match="3 tasks; the maximum is 2"):
        validate_dag(_spec([_t("a"), _t("b"), _t("c")]), 2)


def test_the_order_puts_every_task_after_its_dependencies() -> None:
    spec = _spec([_t("d", "b", "c"), _t("c", "a"), _t("b", "a"), _t("a")])
    order = [spec.tasks[i].name for i in validate_dag(spec, 100)]
    assert order.index("a") < order.index("b") < order.index("d")
    assert order.index("c") < order.index("d")
