"""Builtin actions obey cancel like processes do."""

from __future__ import annotations

from provisioning.orchestrator.api import WorkflowSpec
from tests.conftest import tasks_by_name, wait_workflow


async def test_cancel_ends_a_builtin_sleep_at_once(make_service) -> None:
    svc = await make_service()
    spec = WorkflowSpec.model_validate(
        {"name": "nap", "tasks": [{"name": "nap", "action": "sleep", "args": {"seconds": 600}}]}
    )
    wf_id, _ = await svc.engine.submit(spec)
    await wait_workflow(svc, wf_id, {"Running"})
    task_id = tasks_by_name(await svc.store.get_workflow(wf_id))["nap"]["id"]
    for _ in range(500):  # until the attempt has really started
        if (await svc.store.get_task(task_id))["status"] == "Running":
            break
    await svc.engine.cancel(wf_id)
    doc = await wait_workflow(svc, wf_id, timeout=20)
    assert doc["status"] == "Cancelled"
    assert tasks_by_name(doc)["nap"]["status"] == "Cancelled"
