"""Task logs over real HTTP: SSE following resumes with Last-Event-ID; search and text format.

The service runs in-process on both backends and is served by uvicorn on a free 127.0.0.1 port,
so the client sees real chunked streaming, real disconnects and real reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import uvicorn

from provisioning.orchestrator.app import OrchestratorService
from tests.conftest import free_port, wait_workflow

LINES = 30


@contextlib.asynccontextmanager
async def _serving(svc: OrchestratorService) -> AsyncIterator[str]:
    """Serve the service's app over real HTTP on 127.0.0.1 (a free port) in this event loop."""
    port = free_port()
    config = uvicorn.Config(
        svc.app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_level="warning",
        ws="none",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert not serving.done(), "uvicorn exited before it started"
        assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)


async def _submit(
    client: httpx.AsyncClient, script: str, env: dict[str, str] | None = None
) -> tuple[str, str]:
    """Submit a one-task workflow running ``script``; return (workflow id, task id)."""
    task = {
        "name": "writer",
        "command": ["sh", "-c", script],
        "env": env or {},
        "retry": {"max_attempts": 1},
    }
    resp = await client.post("/workflows", json={"name": "logs", "tasks": [task]})
    assert resp.status_code == 201, resp.text
    data = resp.json()["data"]
    return data["id"], data["tasks"][0]["id"]


def _numbered(n: int, pause: float) -> str:
    return f"i=1; while [ $i -le {n} ]; do echo line-$i; i=$((i+1)); sleep {pause}; done"


class _Event:
    def __init__(self, event: str, ident: str | None, data: str) -> None:
        self.event, self.id, self.data = event, ident, data

    def json(self) -> Any:
        return json.loads(self.data)


async def _events(resp: httpx.Response) -> AsyncIterator[_Event]:
    """Parse an SSE body: one event per blank-line-terminated block (comments skipped)."""
    event, ident, data = "message", None, []
    async for line in resp.aiter_lines():
        if line == "":
            if data:
                yield _Event(event, ident, "\n".join(data))
            event, ident, data = "message", None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("id:"):
            ident = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


async def _follow(
    client: httpx.AsyncClient,
    task_id: str,
    *,
    last_event_id: str | None = None,
    stop_after: int | None = None,
) -> list[_Event]:
    """Follow the task's log; hang up after ``stop_after`` log events, or read to the end."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    got: list[_Event] = []
    async with client.stream(
        "GET", f"/tasks/{task_id}/logs", params={"follow": "1"}, headers=headers
    ) as resp:
        assert resp.status_code == 200, await resp.aread()
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for ev in _events(resp):
            got.append(ev)
            if ev.event == "end":
                break
            if stop_after is not None and len(got) >= stop_after:
                break
    return got


async def test_a_follower_that_reconnects_with_last_event_id_gets_every_line_once_in_order(
    make_service: Callable[..., Any],
) -> None:
    svc = await make_service()
    async with (
        _serving(svc) as url,
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as client,
    ):
        wf_id, task_id = await _submit(client, _numbered(LINES, 0.1))
        first = await _follow(client, task_id, stop_after=10)
        assert [e.event for e in first] == ["log"] * 10
        # The task is still writing: the reconnect picks up mid-stream.
        assert (await client.get(f"/tasks/{task_id}")).json()["data"]["status"] == "Running"
        second = await _follow(client, task_id, last_event_id=first[-1].id)
        await wait_workflow(svc, wf_id, {"Completed"})
        full = (await client.get(f"/tasks/{task_id}/logs")).json()["data"]["lines"]

    assert second[-1].event == "end"
    assert second[-1].json() == {"status": "Completed"}
    events = first + second[:-1]
    assert all(e.event == "log" for e in events)
    ids = [e.id for e in events]
    assert ids == [f"{ln['attempt']}:{ln['n']}" for ln in full], "lost or repeated lines"
    assert [e.json() for e in events] == full
    stdout = [e.json()["line"] for e in events if e.json()["stream"] == "stdout"]
    assert stdout == [f"line-{i}" for i in range(1, LINES + 1)]


async def test_following_a_finished_task_sends_its_whole_log_then_end(
    make_service: Callable[..., Any],
) -> None:
    svc = await make_service()
    async with (
        _serving(svc) as url,
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as client,
    ):
        wf_id, task_id = await _submit(client, _numbered(5, 0))
        await wait_workflow(svc, wf_id, {"Completed"})
        events = await _follow(client, task_id)
        # Resuming after the last line of a finished task yields only the end event.
        last_log = [e for e in events if e.event == "log"][-1]
        tail = await _follow(client, task_id, last_event_id=last_log.id)

    assert events[-1].event == "end" and events[-1].json() == {"status": "Completed"}
    stdout = [
        e.json()["line"] for e in events if e.event == "log" and e.json()["stream"] == "stdout"
    ]
    assert stdout == [f"line-{i}" for i in range(1, 6)]
    assert [e.event for e in tail] == ["end"]


async def test_a_bad_last_event_id_is_refused_with_422(make_service: Callable[..., Any]) -> None:
    svc = await make_service()
    async with (
        _serving(svc) as url,
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as client,
    ):
        wf_id, task_id = await _submit(client, "echo hi")
        await wait_workflow(svc, wf_id, {"Completed"})
        for bad in ("nonsense", "1:", ":3", "1:x", "-1:2", "1;2"):
            resp = await client.get(
                f"/tasks/{task_id}/logs", params={"follow": "1"}, headers={"Last-Event-ID": bad}
            )
            assert resp.status_code == 422, (bad, resp.text)
            error = resp.json()["error"]
            assert error["code"] == "validation_error", error
            assert "Last-Event-ID" in error["message"] and "<attempt>:<line>" in error["message"]


async def test_a_search_returns_only_the_matching_lines(make_service: Callable[..., Any]) -> None:
    svc = await make_service()
    async with (
        _serving(svc) as url,
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as client,
    ):
        # The words come from the environment: the log's first line, which shows the command,
        # must not match the search.
        script = 'echo "$A one"; echo "$B two"; echo "$C three"; echo "$G" >&2; echo "${A}bet"'
        env = {"A": "alpha", "B": "beta", "C": "ALPHA", "G": "gamma"}
        wf_id, task_id = await _submit(client, script, env)
        await wait_workflow(svc, wf_id, {"Completed"})
        resp = await client.get(f"/tasks/{task_id}/logs", params={"q": "alpha"})
        none = await client.get(f"/tasks/{task_id}/logs", params={"q": "no such text"})
        stderr = await client.get(f"/tasks/{task_id}/logs", params={"q": "gamma"})

    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert data["task_id"] == task_id
    assert [ln["line"] for ln in data["lines"]] == ["alpha one", "ALPHA three", "alphabet"]
    assert none.json()["data"]["lines"] == []
    [gamma] = stderr.json()["data"]["lines"]
    assert (gamma["line"], gamma["stream"]) == ("gamma", "stderr")


async def test_format_text_returns_the_log_as_plain_text(make_service: Callable[..., Any]) -> None:
    svc = await make_service()
    async with (
        _serving(svc) as url,
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as client,
    ):
        script = 'echo "$ONE"; echo "$TWO" >&2'
        wf_id, task_id = await _submit(client, script, {"ONE": "first", "TWO": "second"})
        await wait_workflow(svc, wf_id, {"Completed"})
        resp = await client.get(f"/tasks/{task_id}/logs", params={"format": "text"})
        full = (await client.get(f"/tasks/{task_id}/logs")).json()["data"]["lines"]
        searched = await client.get(f"/tasks/{task_id}/logs", params={"format": "text", "q": "sec"})
        bad = await client.get(f"/tasks/{task_id}/logs", params={"format": "xml"})

    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    # One line per log line, in log order: "[<attempt>:<n>] <stream>: <text>".
    expected = [f"[{ln['attempt']}:{ln['n']}] {ln['stream']}: {ln['line']}" for ln in full]
    assert resp.text.splitlines() == expected
    assert {ln["line"] for ln in full} >= {"first", "second"}
    [second] = [ln for ln in full if ln["line"] == "second"]
    assert second["stream"] == "stderr"
    assert searched.text.splitlines() == [f"[1:{second['n']}] stderr: second"]
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"]["code"] == "validation_error"
