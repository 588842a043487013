"""Submitting a workflow from the web UI (``/ui/workflows/new``), in-process against the
embedded platform (the fixtures of ``test_ui_security``).

A JSON and a Nickel workflow submitted through the form become workflows owned by the user, the
form's name and priority applied; "Check" validates and submits nothing; a broken Nickel text
and bad JSON come back with the line, nothing submitted; a Nickel text may not import; a viewer
sees no way to submit and a forged POST of theirs is refused. A Nickel text that never ends
evaluating is stopped at ``control_center.nickel_timeout_s`` and shown with its problem.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import isolated_children
from tests.integration.test_ui_security import (
    USER_PASSWORD,
    Browser,
    Platform,
    platform,
    start_platform,
)

__all__ = ["platform"]

QUICK = {"name": "quick", "tasks": [{"name": "wait", "action": "sleep", "args": {"seconds": 0}}]}
NICKEL = """{
  name = "from-nickel",
  priority = 3,
  tasks = [
    { name = "first", action = "sleep", args = { seconds = 0 } },
    { name = "second", action = "sleep", args = { seconds = 0 }, depends_on = ["first"] },
  ],
}
"""
BROKEN = """{
  name = "broken",
  tasks = [
    { name = "first", action = "sleep", args = { seconds = 0 }, bogus = 1 },
  ],
}
"""
# Exponential time, little memory: never ends in practice.
NEVER_ENDS = """let rec fib = fun n => if n < 2 then n else fib (n - 1) + fib (n - 2) in
{
  name = "never",
  tasks = [{ name = "wait", action = "sleep", args = { seconds = fib 100 } }],
}
"""
QUICK_TIMEOUT_S = 1.0


@pytest.fixture
async def quick_platform(tmp_path: Path, state_url: str) -> AsyncIterator[Platform]:
    """The platform with a short Nickel time limit."""
    async with start_platform(tmp_path, state_url, nickel_timeout_s=QUICK_TIMEOUT_S) as p:
        yield p


async def workflows(p: Platform) -> list[dict[str, object]]:
    resp = await p.orch.get("/workflows", headers=p.admin)
    return list(resp.json()["data"])


async def submit(b: Browser, **form: str) -> httpx.Response:
    page = await b.get("/ui/workflows/new")
    assert page.status_code == 200, page.text
    return await b.post("/ui/workflows/new", {"csrf_token": b.csrf, "intent": "submit", **form})


async def test_json_and_nickel_workflows_are_submitted_as_the_user(platform: Platform) -> None:
    p = platform
    dev_id = await p.user("dora", "developer")
    b = await p.browser("dora", USER_PASSWORD)
    listing = await b.get("/ui/workflows")
    assert 'href="/ui/workflows/new"' in listing.text

    resp = await submit(b, format="json", text=json.dumps(QUICK), name="renamed", priority="7")
    assert resp.status_code == 303, resp.text
    wf_id = resp.headers["location"].removeprefix("/ui/workflows/")
    wf = await p.status(wf_id)
    assert (wf["owner"], wf["name"], wf["priority"]) == (dev_id, "renamed", 7)
    page = await b.get(resp.headers["location"])
    assert page.status_code == 200 and "renamed" in page.text

    resp = await submit(b, format="ncl", text=NICKEL, filename="nightly.ncl")
    assert resp.status_code == 303, resp.text
    wf = await p.status(resp.headers["location"].rsplit("/", 1)[1])
    assert (wf["owner"], wf["name"], wf["priority"]) == (dev_id, "from-nickel", 3)
    assert [t["name"] for t in wf["tasks"]] == ["first", "second"]


async def test_check_validates_without_submitting(platform: Platform) -> None:
    p = platform
    b = await p.browser()
    before = len(await workflows(p))
    resp = await submit(
        b, format="yaml", text="name: y\ntasks:\n  - name: a\n    action: sleep\n", intent="check"
    )
    assert resp.status_code == 200, resp.text
    assert 'id="submit-checked"' in resp.text and "workflow <strong>y</strong>" in resp.text
    assert len(await workflows(p)) == before


async def test_a_broken_file_shows_its_line_and_submits_nothing(platform: Platform) -> None:
    p = platform
    b = await p.browser()
    before = len(await workflows(p))

    resp = await submit(b, format="ncl", text=BROKEN, filename="broken.ncl")
    assert resp.status_code == 422
    assert re.search(r'data-line="4"', resp.text), resp.text
    assert "broken.ncl:4:" in resp.text and "extra field `bogus`" in resp.text
    assert "/tmp/" not in resp.text  # the scratch file is named as the user's
    assert BROKEN.splitlines()[3].replace('"', "&#34;") in resp.text  # the text is kept

    resp = await submit(b, format="ncl", text=BROKEN)  # named like the shipped contract
    assert resp.status_code == 422 and 'data-line="4"' in resp.text

    resp = await submit(b, format="json", text='{\n  "name": "x",\n  "tasks": [,]\n}')
    assert resp.status_code == 422 and 'data-line="3"' in resp.text

    resp = await submit(b, format="ncl", text='{\n  name = import "/etc/hostname",\n}')
    assert resp.status_code == 422 and 'data-line="2"' in resp.text
    assert "cannot use `import`" in resp.text

    resp = await submit(b, format="json", text=json.dumps(QUICK), priority="5000")
    assert resp.status_code == 422 and "priority" in resp.text
    assert len(await workflows(p)) == before


async def test_a_viewer_gets_no_form_and_a_forged_submission_is_refused(
    platform: Platform,
) -> None:
    p = platform
    await p.user("vera", "viewer")
    viewer = await p.browser("vera", USER_PASSWORD)
    listing = await viewer.get("/ui/workflows")
    assert listing.status_code == 200 and "/ui/workflows/new" not in listing.text
    assert (await viewer.get("/ui/workflows/new")).status_code == 403
    before = len(await workflows(p))
    for intent in ("submit", "check"):
        resp = await viewer.post(
            "/ui/workflows/new",
            {
                "csrf_token": viewer.csrf,
                "intent": intent,
                "format": "json",
                "text": json.dumps(QUICK),
            },
        )
        assert resp.status_code == 403
    assert len(await workflows(p)) == before


async def test_a_nickel_text_that_never_ends_is_stopped_and_shown_as_a_problem(
    quick_platform: Platform,
) -> None:
    p = quick_platform
    b = await p.browser()
    before = len(await workflows(p))

    async with asyncio.timeout(60):
        resp = await submit(b, format="ncl", text=NEVER_ENDS, filename="never.ncl")
    assert resp.status_code == 422, resp.text
    assert 'id="submit-problems"' in resp.text
    assert "never.ncl took longer than 1 s and was stopped" in resp.text
    assert "/tmp/" not in resp.text
    assert not isolated_children()  # the child was killed, not left running
    assert len(await workflows(p)) == before

    # The control center still answers, and evaluates the next text.
    async with asyncio.timeout(60):
        resp = await submit(b, format="ncl", text=NICKEL, filename="nightly.ncl")
    assert resp.status_code == 303, resp.text
    assert len(await workflows(p)) == before + 1
