"""Bad input to the orchestrator API is refused with a clear envelope and changes nothing.

Every case runs on SQLite and PostgreSQL (``make_service``). Each test first stores one finished
workflow, sends one bad request, checks the status, the error code and that the message names
what is wrong, then checks that ``GET /workflows`` and ``GET /tasks`` answer exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from provisioning.orchestrator.app import OrchestratorService
from tests.conftest import free_port, wait_workflow

NOOP_WORKFLOW = {"name": "seed", "tasks": [{"name": "only", "action": "noop"}]}


def _task(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "action": "noop", **fields}


def _workflow(*tasks: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": "bad", **fields, "tasks": list(tasks)}


async def _client(svc: OrchestratorService) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://test")


async def _snapshot(client: httpx.AsyncClient) -> dict[str, Any]:
    """What the store shows through the API: every workflow and every task."""
    out = {}
    for path in ("/workflows", "/tasks"):
        resp = await client.get(path, params={"limit": 1000})
        assert resp.status_code == 200, resp.text
        out[path] = resp.json()["data"]
    return out


async def _seeded(make_service: Callable[..., Any], **settings: Any) -> OrchestratorService:
    """A service holding one Completed workflow, so "unchanged" compares a non-empty store."""
    svc: OrchestratorService = await make_service(**settings)
    async with await _client(svc) as client:
        resp = await client.post("/workflows", json=NOOP_WORKFLOW)
        assert resp.status_code == 201, resp.text
        await wait_workflow(svc, resp.json()["data"]["id"], {"Completed"})
    return svc


def _error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    doc = resp.json()
    assert doc["success"] is False, doc
    assert doc["error"]["code"] == code, doc
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"], doc
    assert "data" not in doc
    return dict(doc["error"])


def _fields(error: dict[str, Any]) -> set[str]:
    return {f["field"] for f in error["details"].get("fields", [])}


# (test id, request body as JSON data, status, code, field paths named, message fragments)
BAD_WORKFLOWS: list[tuple[str, Any, int, str, set[str], list[str]]] = [
    (
        "priority-is-a-word",
        _workflow(_task("a"), priority="high"),
        422,
        "validation_error",
        {"priority"},
        ["priority", "integer"],
    ),
    (
        "tasks-is-a-mapping",
        {"name": "bad", "tasks": {}},
        422,
        "validation_error",
        {"tasks"},
        ["tasks", "list"],
    ),
    (
        "timeout-is-negative",
        _workflow(_task("a"), _task("b", timeout_s=-1)),
        422,
        "validation_error",
        {"tasks[1].timeout_s"},
        ["tasks[1].timeout_s", "greater than 0"],
    ),
    (
        "retry-attempts-not-a-number",
        _workflow(_task("a", retry={"max_attempts": "many"})),
        422,
        "validation_error",
        {"tasks[0].retry.max_attempts"},
        ["tasks[0].retry.max_attempts"],
    ),
    (
        "name-missing",
        {"tasks": [_task("a")]},
        422,
        "validation_error",
        {"name"},
        ["name", "required"],
    ),
    (
        "no-tasks",
        _workflow(),
        422,
        "validation_error",
        {"tasks"},
        ["tasks"],
    ),
    (
        "command-and-action",
        _workflow({"name": "both", "command": ["true"], "action": "noop"}),
        422,
        "validation_error",
        {"tasks[0]"},
        ["tasks[0]", "both", "exactly one of `command` or `action`"],
    ),
    (
        "neither-command-nor-action",
        _workflow({"name": "idle"}),
        422,
        "validation_error",
        {"tasks[0]"},
        ["tasks[0]", "idle", "exactly one of `command` or `action`"],
    ),
    (
        "unknown-top-level-field",
        {**_workflow(_task("a")), "tasks_typo": []},
        422,
        "validation_error",
        {"tasks_typo"},
        ["tasks_typo", "not permitted"],
    ),
    (
        "unknown-task-field",
        _workflow(_task("a", comand=["true"])),
        422,
        "validation_error",
        {"tasks[0].comand"},
        ["tasks[0].comand", "not permitted"],
    ),
    (
        "cycle",
        _workflow(
            _task("start"),
            _task("a", depends_on=["start", "c"]),
            _task("b", depends_on=["a"]),
            _task("c", depends_on=["b"]),
        ),
        422,
        "invalid_dag",
        set(),
        ["cycle", "a", "b", "c"],
    ),
    (
        "self-dependency",
        _workflow(_task("loop", depends_on=["loop"])),
        422,
        "invalid_dag",
        set(),
        ["'loop' depends on itself"],
    ),
    (
        "unknown-dependency",
        _workflow(_task("a"), _task("b", depends_on=["a", "ghost"])),
        422,
        "invalid_dag",
        set(),
        ["'b'", "unknown task 'ghost'"],
    ),
    (
        "duplicate-task-name",
        _workflow(_task("twin"), _task("twin")),
        422,
        "invalid_dag",
        set(),
        ["duplicate task name 'twin'"],
    ),
    (
        "body-is-a-list",
        [_task("a")],
        422,
        "validation_error",
        set(),
        ["valid dictionary"],
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "fields", "fragments"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_WORKFLOWS],
)
async def test_a_bad_workflow_is_refused_naming_the_problem_and_stores_nothing(
    make_service: Callable[..., Any],
    body: Any,
    status: int,
    code: str,
    fields: set[str],
    fragments: list[str],
) -> None:
    svc = await _seeded(make_service)
    async with await _client(svc) as client:
        before = await _snapshot(client)
        error = _error(await client.post("/workflows", json=body), status, code)
        assert fields <= _fields(error), error
        for fragment in fragments:
            assert fragment in error["message"], (fragment, error)
        assert await _snapshot(client) == before


async def test_a_cycle_is_reported_in_dependency_order(make_service: Callable[..., Any]) -> None:
    svc = await _seeded(make_service)
    body = _workflow(
        _task("a", depends_on=["c"]), _task("b", depends_on=["a"]), _task("c", depends_on=["b"])
    )
    async with await _client(svc) as client:
        before = await _snapshot(client)
        error = _error(await client.post("/workflows", json=body), 422, "invalid_dag")
        cycle = error["details"]["cycle"]
        assert cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["a", "b", "c"], error
        assert " -> ".join(cycle) in error["message"], error
        assert await _snapshot(client) == before


async def test_malformed_json_is_refused_saying_the_json_is_malformed(
    make_service: Callable[..., Any],
) -> None:
    svc = await _seeded(make_service)
    async with await _client(svc) as client:
        before = await _snapshot(client)
        resp = await client.post(
            "/workflows",
            content=b'{"name": "x", "tasks": [',
            headers={"content-type": "application/json"},
        )
        assert 400 <= resp.status_code < 500, resp.text
        error = resp.json()["error"]
        assert error["code"] == "validation_error", error
        assert "malformed JSON" in error["message"], error
        assert await _snapshot(client) == before


async def test_a_workflow_over_max_tasks_is_refused_with_413(
    make_service: Callable[..., Any],
) -> None:
    svc = await _seeded(make_service)
    assert svc.settings.orchestrator.max_tasks == 5000  # the default
    body = _workflow(*(_task(f"t{i:05d}") for i in range(10_000)))
    async with await _client(svc) as client:
        before = await _snapshot(client)
        error = _error(await client.post("/workflows", json=body), 413, "limit_exceeded")
        assert "10000" in error["message"] and "5000" in error["message"], error
        assert "orchestrator.max_tasks" in error["message"], error
        assert error["details"] == {"tasks": 10_000, "max_tasks": 5000}
        assert await _snapshot(client) == before


async def test_a_body_over_max_body_bytes_is_refused_with_413(
    make_service: Callable[..., Any],
) -> None:
    svc = await _seeded(make_service, max_body_bytes=2048)
    body = json.dumps(_workflow(_task("a"), labels={"pad": "x" * 4096})).encode()
    async with await _client(svc) as client:
        before = await _snapshot(client)
        resp = await client.post(
            "/workflows", content=body, headers={"content-type": "application/json"}
        )
        error = _error(resp, 413, "limit_exceeded")
        assert "2048" in error["message"], error
        assert await _snapshot(client) == before


async def test_a_chunked_body_over_max_body_bytes_is_refused_with_413(
    make_service: Callable[..., Any],
) -> None:
    # No Content-Length: the limit must hold while the body streams in.
    svc = await _seeded(make_service, max_body_bytes=2048)
    body = json.dumps(_workflow(_task("a"), labels={"pad": "x" * 4096})).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 512):
            yield body[i : i + 512]

    async with await _client(svc) as client:
        before = await _snapshot(client)
        resp = await client.post(
            "/workflows", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in resp.request.headers
        error = _error(resp, 413, "limit_exceeded")
        assert "2048" in error["message"], error
        assert await _snapshot(client) == before


async def test_a_chunked_body_under_max_body_bytes_is_accepted(
    make_service: Callable[..., Any],
) -> None:
    svc = await _seeded(make_service, max_body_bytes=2048)
    body = json.dumps(_workflow(_task("a"), name="chunked")).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 16):
            yield body[i : i + 16]

    async with await _client(svc) as client:
        resp = await client.post(
            "/workflows", content=chunks(), headers={"content-type": "application/json"}
        )
        assert resp.status_code == 201, resp.text
        assert resp.json()["data"]["name"] == "chunked"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/workflows/{id}"),
        ("POST", "/workflows/{id}/cancel"),
        ("POST", "/workflows/{id}/pause"),
        ("POST", "/workflows/{id}/resume"),
        ("POST", "/workflows/{id}/retry"),
        ("POST", "/workflows/{id}/rollback"),
        ("GET", "/tasks/{id}"),
        ("GET", "/tasks/{id}/logs"),
        ("GET", "/tasks/{id}/logs?follow=1"),
    ],
)
async def test_an_unknown_id_answers_404_in_the_envelope(
    make_service: Callable[..., Any], method: str, path: str
) -> None:
    svc = await _seeded(make_service)
    unknown = "00000000-0000-4000-8000-000000000000"
    async with await _client(svc) as client:
        before = await _snapshot(client)
        resp = await client.request(method, path.format(id=unknown))
        error = _error(resp, 404, "not_found")
        assert unknown in error["message"], error
        assert await _snapshot(client) == before


@pytest.mark.parametrize("path", ["/workflows", "/tasks"])
@pytest.mark.parametrize(
    ("value", "fragment"),
    [("0", "greater than or equal to 1"), ("1001", "less than or equal to 1000"), ("x", "integer")],
)
async def test_a_limit_outside_1_to_1000_is_refused_naming_limit(
    make_service: Callable[..., Any], path: str, value: str, fragment: str
) -> None:
    svc = await _seeded(make_service)
    async with await _client(svc) as client:
        before = await _snapshot(client)
        error = _error(await client.get(path, params={"limit": value}), 422, "validation_error")
        assert _fields(error) == {"limit"}, error
        assert "limit" in error["message"] and fragment in error["message"], error
        assert await _snapshot(client) == before


@contextlib.asynccontextmanager
async def _serving(svc: OrchestratorService) -> AsyncIterator[str]:
    """Serve the service's app over real HTTP on 127.0.0.1 (a free port) in this event loop."""
    port = free_port()
    config = uvicorn.Config(
        svc.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", ws="none"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    deadline = asyncio.get_running_loop().time() + 10
    while not server.started:
        assert not serving.done(), "uvicorn exited before it started"
        assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start in 10 s"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)


BAD_NICKEL = """\
# A workflow whose second task breaks the contract: timeout_s must be > 0.
{
  name = "bad-nickel",
  tasks = [
    { name = "fine", action = "noop" },
    {
      name = "broken",
      action = "noop",
      timeout_s = -5,
    },
  ],
}
"""


async def test_a_nickel_contract_violation_exits_2_with_nickels_diagnostic_and_stores_nothing(
    make_service: Callable[..., Any], tmp_path: Path
) -> None:
    svc = await _seeded(make_service)
    # A path longer than a terminal line: the diagnostic must still show it whole.
    folder = tmp_path / ("workflows-" + "x" * 70)
    folder.mkdir()
    bad = folder / "bad.ncl"
    bad.write_text(BAD_NICKEL, encoding="utf-8")
    async with await _client(svc) as client, _serving(svc) as url:
        before = await _snapshot(client)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "provisioning.cli.main",
            "--url",
            url,
            "--data-dir",
            str(tmp_path / "cli-home"),
            "workflow",
            "submit",
            str(bad),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        stderr = err.decode()
        assert proc.returncode == 2, (out, stderr)
        assert "nickel_error" in stderr, stderr
        assert "timeout_s" in stderr, stderr
        # Nickel's own diagnostic: the user's file and the line of the bad value.
        assert f"{bad}:9:" in stderr, stderr
        assert "timeout_s = -5" in stderr, stderr
        assert out == b""
        assert await _snapshot(client) == before
