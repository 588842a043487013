"""The engine runs a small DAG end to end on every backend, outputs flowing to dependants."""

from __future__ import annotations

from provisioning.orchestrator.api import WorkflowSpec
from tests.conftest import tasks_by_name, wait_workflow


async def test_a_dag_completes_and_outputs_reach_dependants(make_service) -> None:
    svc = await make_service()
    spec = WorkflowSpec.model_validate(
        {
            "name": "smoke",
            "tasks": [
                {
                    "name": "make-id",
                    "command": ["sh", "-c", 'echo \'{"id": 42}\' > "$PRVNG_OUTPUT"'],
                },
                {
                    "name": "use-id",
                    "command": ["sh", "-c", 'echo "$PRVNG_INPUT_MAKE_ID"'],
                    "depends_on": ["make-id"],
                },
            ],
        }
    )
    wf_id, created = await svc.engine.submit(spec)
    assert created
    doc = await wait_workflow(svc, wf_id)
    assert doc["status"] == "Completed"
    tasks = tasks_by_name(doc)
    assert tasks["make-id"]["outputs"] == {"id": 42}
    lines = [ln["line"] for ln in (await _logs(svc, tasks["use-id"]["id"]))]
    assert '{"id": 42}' in lines


async def _logs(svc, task_id):
    from provisioning.orchestrator.logs import read_lines

    return read_lines(await svc.store.task_log_paths(task_id))
