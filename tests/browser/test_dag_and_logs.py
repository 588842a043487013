"""A workflow's DAG graph and a task's live log in real headless Chromium against a real
platform: submit a workflow of dependent tasks with the CLI, watch its nodes turn Completed in
the SVG without reloading, open a task's attempts from the graph, follow its log while it is
written, filter it, search the workflow's logs; narrow and dark layouts. Screenshots go to the
test's artifacts dir (see conftest)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.browser.conftest import UiSession

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TICKS = 12
WORKFLOW = {
    "name": "browser-dag",
    "tasks": [
        {"name": "intro", "command": ["sh", "-c", "sleep 1; echo intro-done"]},
        {
            "name": "talker",
            "command": [
                "sh",
                "-c",
                f"i=1; while [ $i -le {TICKS} ]; do echo tick-$i; i=$((i+1)); sleep 0.4; done",
            ],
            "depends_on": ["intro"],
        },
        {
            "name": "side",
            "command": ["sh", "-c", "sleep 1; echo side-done"],
            "depends_on": ["intro"],
        },
        {
            "name": "outro",
            "command": ["sh", "-c", "sleep 1; echo outro-done"],
            "depends_on": ["talker", "side"],
        },
    ],
}


def node(name: str, status: str = "") -> str:
    sel = f"svg.dag .dag-node[data-task={name}]"
    return sel + (f"[data-status={status}]" if status else "")


def test_the_graph_updates_live_and_a_task_log_is_followed(ui: UiSession, tmp_path: Path) -> None:
    page = ui.page
    ui.login("admin")
    spec = tmp_path / "dag.json"
    spec.write_text(json.dumps(WORKFLOW), encoding="utf-8")
    submitted = ui.platform.prvng("workflow", "submit", str(spec))
    found = UUID.search(submitted.stdout)
    assert found, submitted.stdout
    wf_id = found[0]

    ui.goto(f"/ui/workflows/{wf_id}")
    page.wait_for_selector(node("outro"))
    page.wait_for_function("() => window.htmx !== undefined")
    page.evaluate("window.__notReloaded = true")
    assert page.locator("svg.dag .dag-edge").count() == 4
    ui.shot("01-graph-starting")

    # The graph refreshes itself: intro turns Completed (green) with no reload.
    page.wait_for_selector(node("intro", "Completed"), timeout=30_000)
    page.wait_for_selector(node("talker", "Running"), timeout=30_000)
    fill = page.evaluate(
        "s => getComputedStyle(document.querySelector(s + ' rect')).fill", node("intro")
    )
    ok = page.evaluate(
        "() => getComputedStyle(document.documentElement).getPropertyValue('--ok-bg').trim()"
    )
    assert fill != "none" and ok, (fill, ok)
    assert page.evaluate("window.__notReloaded") is True
    ui.shot("02-graph-running")

    # A click on a node shows its attempts and a link to its logs.
    page.click(node("talker"))
    page.wait_for_selector("#task-detail[data-task-id] #attempts-table")
    assert page.get_attribute(node("talker"), "class").find("selected") >= 0
    ui.shot("03-task-detail")
    page.click("#task-logs-link")

    # The log, followed while the task writes it.
    page.wait_for_selector("#log-lines .log-line:has-text('tick-1')", timeout=15_000)
    page.wait_for_selector("#log-lines .log-line:has-text('tick-3')", timeout=15_000)
    assert page.get_attribute("#log-viewer", "data-ended") is None  # still being written
    ui.shot("04-log-following")
    page.wait_for_selector("#log-viewer[data-ended=yes]", timeout=30_000)
    ticks = page.locator("#log-lines .log-line:not(.system):has-text('tick-')").count()
    assert ticks == TICKS, ticks
    assert "ended (Completed)" in page.inner_text("#log-state")

    # Filtering the lines the page holds.
    page.fill("#log-filter", "tick-1")
    page.wait_for_function(
        "() => document.querySelectorAll('#log-lines .log-line:not(.hidden)').length === 4"
    )
    assert page.locator("#log-lines mark").count() == 4
    ui.shot("05-log-filtered")
    assert page.get_attribute("#log-download", "href", timeout=1000)

    # Back on the workflow: everything Completed; search across the workflow's logs.
    ui.goto(f"/ui/workflows/{wf_id}")
    page.wait_for_selector(node("outro", "Completed"), timeout=30_000)
    assert page.locator("svg.dag .dag-node.st-completed").count() == 4
    page.fill("#log-search input[name=q]", "tick-7")
    page.click("#log-search button[type=submit]")
    page.wait_for_selector("#log-search-hits td:has-text('tick-7')")
    assert page.url.endswith(wf_id)  # htmx put the results in the page
    ui.shot("06-graph-done-search")

    page.set_viewport_size({"width": 420, "height": 860})
    ui.shot("07-workflow-narrow")
    page.set_viewport_size({"width": 1280, "height": 800})
    page.emulate_media(color_scheme="dark")
    page.click(node("talker"))
    page.wait_for_selector("#task-detail[data-task-id] #attempts-table")
    ui.shot("08-workflow-dark")
    page.click("#task-logs-link")
    page.wait_for_selector("#log-viewer[data-ended=yes]", timeout=15_000)
    ui.shot("09-log-dark")
