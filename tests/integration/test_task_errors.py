"""A task that cannot start fails with a reason a person can act on."""

from __future__ import annotations

from pathlib import Path

from provisioning.orchestrator.api import WorkflowSpec
from tests.conftest import tasks_by_name, wait_workflow


async def test_a_missing_working_directory_is_named_in_the_error(
    make_service, tmp_path: Path
) -> None:
    svc = await make_service()
    missing = tmp_path / "nowhere"
    spec = WorkflowSpec.model_validate(
        {
            "name": "bad-cwd",
            "tasks": [
                {
                    "name": "a",
                    "command": ["true"],
                    "cwd": str(missing),
                    "retry": {"max_attempts": 1},
                },
                {
                    "name": "b",
                    "command": ["/no/such/program"],
                    "retry": {"max_attempts": 1},
                    "on_failure": "continue",
                },
            ],
        }
    )
    wf_id, _ = await svc.engine.submit(spec)
    doc = await wait_workflow(svc, wf_id)
    tasks = tasks_by_name(doc)
    assert tasks["a"]["status"] == "Failed"
    assert f"working directory '{missing}' does not exist" in tasks["a"]["error"]
    assert "cannot start '/no/such/program'" in tasks["b"]["error"]
