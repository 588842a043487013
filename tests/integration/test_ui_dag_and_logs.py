"""The workflow page's DAG graph, the task detail and the task log pages of the web UI, in-process
against the embedded platform (the fixtures of ``test_ui_security``).

The graph's layout (layers, wrapping, linear size); the SVG with each task's state and its
edges; the detail refreshing itself only while the workflow runs; a task's attempts and
outputs; its log re-sent as SSE, downloaded and searched across the workflow; a viewer (no
``task:logs``) and another developer refused.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from provisioning.control_center.ui.dag_layout import layout
from tests.integration.test_ui_security import HEADERS, USER_PASSWORD, Platform, platform

__all__ = ["platform"]

LINES = {
    "name": "ui-dag-logs",
    "tasks": [
        {
            "name": "first",
            "command": ["sh", "-c", "for i in 1 2 3; do echo line-$i; done; echo oops >&2"],
        },
        {"name": "second", "command": ["sh", "-c", "echo second-done"], "depends_on": ["first"]},
        {
            "name": "third",
            "command": ["sh", "-c", "echo third-done"],
            "depends_on": [{"task": "first", "kind": "soft"}, "second"],
        },
    ],
}


async def finished(p: Platform, wf_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wf = await p.status(wf_id)
        if wf["status"] in ("Completed", "Failed", "Cancelled"):
            return wf
        await asyncio.sleep(0.1)
    raise AssertionError(f"workflow {wf_id} did not finish: {wf}")


# ---------------------------------------------------------------------- layout


def test_layout_layers_by_longest_path_and_wraps_a_wide_layer() -> None:
    tasks = [
        {"name": "a", "id": "1", "status": "Completed", "depends_on": []},
        {"name": "b", "id": "2", "status": "Running", "depends_on": ["a"]},
        {"name": "c", "id": "3", "status": "Pending", "depends_on": ["a", {"task": "b"}]},
    ]
    g = layout(tasks)
    layers = {n.name: n.layer for n in g.nodes}
    assert layers == {"a": 0, "b": 1, "c": 2}
    assert len(g.edges) == 3 and all(e.path.startswith("M") for e in g.edges)
    xs = {n.name: n.x for n in g.nodes}
    assert xs["a"] < xs["b"] < xs["c"]

    fan = [{"name": "root", "depends_on": []}] + [
        {"name": f"leaf-{i}", "depends_on": ["root"]} for i in range(499)
    ]
    started = time.perf_counter()
    big = layout(fan)
    assert time.perf_counter() - started < 0.5
    assert big.layers == 2 and len(big.edges) == 499
    rows = {n.y for n in big.nodes if n.layer == 1}
    assert len(rows) <= 23  # wrapped into sub-columns, not one 499-row column
    assert big.height < 1200 and big.width < 6000


def test_layout_survives_unknown_dependencies_and_cycles() -> None:
    g = layout(
        [
            {"name": "a", "depends_on": ["ghost"]},
            {"name": "b", "depends_on": ["c"]},
            {"name": "c", "depends_on": ["b"]},
        ]
    )
    assert {n.name for n in g.nodes} == {"a", "b", "c"}
    assert [n.layer for n in g.nodes if n.name == "a"] == [0]


# ---------------------------------------------------------------------- pages


async def test_the_graph_shows_each_tasks_state_and_refreshes_only_while_running(
    platform: Platform,
) -> None:
    p = platform
    wf = await p.workflow(LINES)
    b = await p.browser()
    page = await b.get(f"/ui/workflows/{wf['id']}")
    assert page.status_code == 200
    assert '<svg class="dag"' in page.text
    await finished(p, wf["id"])
    live = await b.get(f"/ui/workflows/{wf['id']}/live")
    assert live.status_code == 200
    nodes = dict(re.findall(r'class="dag-node [^"]*"[^>]*data-task="([^"]+)"[^>]*'
                            r'data-status="([^"]+)"', live.text))  # fmt: skip
    assert nodes == {"first": "Completed", "second": "Completed", "third": "Completed"}
    assert len(re.findall(r'class="dag-edge[ "]', live.text)) == 3
    assert 'class="dag-edge soft"' in live.text
    assert "every 2s" not in live.text  # finished: no more polling
    slow = await p.workflow()
    running = await b.get(f"/ui/workflows/{slow['id']}/live")
    assert 'hx-trigger="sse:workflows, every 2s"' in running.text
    assert 'hx-swap="outerHTML"' in running.text


async def test_a_big_workflow_shows_every_node_and_a_table_of_the_tasks_that_matter(
    platform: Platform,
) -> None:
    """130 tasks: the graph has all of them, the table the first 100 with the failed one (the
    129th) among them, and "Show all" gives 130 rows, kept across the live refresh. The
    workflow's name is free text: it reaches the SVG escaped."""
    p = platform
    tasks: list[dict[str, Any]] = [{"name": f"t{i:03}", "action": "noop"} for i in range(130)]
    tasks[128] = {"name": "t128", "action": "fail", "on_failure": "continue"}
    name = '<b onmouseover="x()">big</b>'
    wf = await p.workflow({"name": name, "tasks": tasks})
    await finished(p, wf["id"])
    b = await p.browser()

    page = await b.get(f"/ui/workflows/{wf['id']}")
    assert page.status_code == 200
    assert len(re.findall(r'<g class="dag-node ', page.text)) == 130
    rows = re.findall(r'<tr data-task="([^"]+)" data-status="([^"]+)"', page.text)
    assert len(rows) == 100
    assert ("t128", "Failed") in rows
    assert [n for n, _ in rows] == sorted(n for n, _ in rows)  # in the workflow's order
    assert "Showing 100 of 130 tasks" in page.text
    assert f'href="/ui/workflows/{wf["id"]}?tasks=all#tasks-table"' in page.text
    assert name not in page.text and "&lt;b onmouseover=&#34;x()&#34;&gt;big&lt;/b&gt;" in page.text

    every = await b.get(f"/ui/workflows/{wf['id']}?tasks=all")
    assert len(re.findall(r'<tr data-task="', every.text)) == 130
    assert "Showing" not in every.text
    assert f'hx-get="/ui/workflows/{wf["id"]}/live?tasks=all"' in every.text
    live = await b.get(f"/ui/workflows/{wf['id']}/live?tasks=all")
    assert len(re.findall(r'<tr data-task="', live.text)) == 130


async def test_a_task_shows_its_attempts_outputs_and_its_log(platform: Platform) -> None:
    p = platform
    wf = await finished(p, (await p.workflow(LINES))["id"])
    first = next(t for t in wf["tasks"] if t["name"] == "first")
    b = await p.browser()

    detail = await b.get(f"/ui/tasks/{first['id']}", **{"HX-Request": "true"})
    assert detail.status_code == 200
    assert 'id="attempts-table"' in detail.text and "<html" not in detail.text
    assert f'href="/ui/tasks/{first["id"]}/logs"' in detail.text
    assert 'hx-trigger="every 2s"' not in detail.text
    full = await b.get(f"/ui/tasks/{first['id']}")
    assert "<html" in full.text and 'id="attempts-table"' in full.text

    logs = await b.get(f"/ui/tasks/{first['id']}/logs")
    assert logs.status_code == 200
    assert f'data-stream="/ui/tasks/{first["id"]}/logs/stream"' in logs.text
    assert "logs.js" in logs.text

    stream = await b.get(f"/ui/tasks/{first['id']}/logs/stream")
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = re.findall(r"id: (\d+:\d+)\nevent: log\ndata: (.*)\n", stream.text)
    # The runner's own lines ("system": the command, the exit code) frame the task's output.
    assert [e[0] for e in events] == [f"1:{n}" for n in range(1, 7)], stream.text
    assert '"stream": "stderr", "line": "oops"' in events[4][1]
    assert "event: end" in stream.text and "Completed" in stream.text
    resumed = await b.get(f"/ui/tasks/{first['id']}/logs/stream", **{"Last-Event-ID": "1:4"})
    assert re.findall(r"id: (\d+:\d+)\nevent: log", resumed.text) == ["1:5", "1:6"]

    download = await b.get(f"/ui/tasks/{first['id']}/logs/download")
    assert download.status_code == 200
    assert download.headers["content-disposition"] == f'attachment; filename="{first["id"]}.log"'
    assert "line-1" in download.text and "stderr: oops" in download.text

    search = await b.get(f"/ui/workflows/{wf['id']}/logs/search?q=-DONE")
    assert search.status_code == 200
    hits = re.findall(r'<a href="/ui/tasks/[^"]+/logs">([a-z]+)</a>', search.text)
    assert set(hits) == {"second", "third"}  # case-insensitive; each output and command line
    page = await b.get(f"/ui/workflows/{wf['id']}")
    assert 'id="log-search"' in page.text and 'data-logs="first"' in page.text


async def test_logs_are_refused_to_a_viewer_and_to_another_developer(platform: Platform) -> None:
    p = platform
    wf = await finished(p, (await p.workflow(LINES))["id"])
    task_id = wf["tasks"][0]["id"]
    await p.user("vera", "viewer")
    await p.user("dave", "developer")
    viewer = await p.browser("vera", USER_PASSWORD)
    page = await viewer.get(f"/ui/workflows/{wf['id']}")
    assert page.status_code == 200 and '<svg class="dag"' in page.text
    assert "/logs" not in page.text  # no logs link, no log search
    detail = await viewer.get(f"/ui/tasks/{task_id}", **{"HX-Request": "true"})
    assert detail.status_code == 200 and 'id="task-logs-link"' not in detail.text
    for path in ("logs", "logs/stream", "logs/download"):
        resp = await viewer.get(f"/ui/tasks/{task_id}/{path}")
        assert resp.status_code == 403, (path, resp.text)
    resp = await viewer.get(f"/ui/workflows/{wf['id']}/logs/search?q=line")
    assert resp.status_code == 403

    dave = await p.browser("dave", USER_PASSWORD)
    for path in ("", "/logs", "/logs/stream", "/logs/download"):
        resp = await dave.get(f"/ui/tasks/{task_id}{path}")
        assert resp.status_code == 404, (path, resp.text)
        assert "line-1" not in resp.text
    resp = await dave.get(f"/ui/workflows/{wf['id']}/logs/search?q=line")
    assert resp.status_code == 404


async def test_the_new_pages_carry_the_security_headers_and_no_inline_code(
    platform: Platform,
) -> None:
    p = platform
    wf = await finished(p, (await p.workflow(LINES))["id"])
    task_id = wf["tasks"][0]["id"]
    b = await p.browser()
    answers = [
        await b.get(f"/ui/workflows/{wf['id']}"),
        await b.get(f"/ui/tasks/{task_id}"),
        await b.get(f"/ui/tasks/{task_id}", **{"HX-Request": "true"}),
        await b.get(f"/ui/tasks/{task_id}/logs"),
        await b.get(f"/ui/tasks/{task_id}/logs/stream"),
        await b.get(f"/ui/tasks/{task_id}/logs/download"),
        await b.get(f"/ui/workflows/{wf['id']}/logs/search?q=line"),
        await b.get("/ui/tasks/no-such-task/logs"),
        await b.get("/ui/static/dag.js"),
        await b.get("/ui/static/logs.js"),
        await b.get("/ui/static/dag.css"),
    ]
    for resp in answers:
        for name, value in HEADERS.items():
            assert resp.headers.get(name) == value, (resp.request.url, name)
        if resp.headers.get("content-type", "").startswith("text/html"):
            assert "<style" not in resp.text and " style=" not in resp.text, resp.request.url
            assert not re.search(r"<script(?![^>]*\bsrc=)", resp.text), resp.request.url
            assert not re.search(r"\son[a-z]+=", resp.text), resp.request.url
    assert answers[7].status_code == 404
