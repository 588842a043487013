"""Submitting a workflow from the web UI in real headless Chromium against a real platform: a
broken Nickel file chosen from disk shows its line (which selects that line in the editor),
"Check" says a fixed one is valid, "Submit" lands on the new workflow's page, which turns
Completed by itself; narrow and dark layouts. Screenshots go to the test's artifacts dir."""

from __future__ import annotations

from pathlib import Path

from tests.browser.conftest import UiSession

BROKEN = """{
  name = "browser-submit",
  tasks = [
    { name = "hello", command = ["sh", "-c", "sleep 1; echo hello"], bogus = 1 },
  ],
}
"""
FIXED = BROKEN.replace(", bogus = 1", "")


def test_a_nickel_file_is_checked_submitted_and_watched(ui: UiSession, tmp_path: Path) -> None:
    page = ui.page
    ui.login("developer")
    ui.goto("/ui/workflows")
    page.click("#submit-link")
    page.wait_for_url("**/ui/workflows/new")
    ui.shot("01-empty-form")

    broken = tmp_path / "nightly.ncl"
    broken.write_text(BROKEN, encoding="utf-8")
    page.set_input_files("#submit-file", str(broken))
    page.wait_for_function("() => document.getElementById('submit-text').value.includes('bogus')")
    assert page.input_value("#submit-format") == "ncl"
    page.click("#submit-check")
    problem = page.wait_for_selector(".submit-problem[data-line='4']")
    assert "nightly.ncl:4" in problem.inner_text()
    page.click(".submit-goto")
    selected = page.evaluate(
        "() => { const a = document.getElementById('submit-text');"
        " return a.value.slice(a.selectionStart, a.selectionEnd); }"
    )
    assert "bogus = 1" in selected
    ui.shot("02-error-with-line")

    page.fill("#submit-text", FIXED)
    page.click("#submit-check")
    page.wait_for_selector("#submit-checked")
    ui.shot("03-checked")

    page.fill("input[name=priority]", "5")
    page.click("#submit-go")
    page.wait_for_url("**/ui/workflows/*-*")
    page.wait_for_selector("h1:has-text('browser-submit')")
    page.wait_for_selector("#workflow-live[data-finished=yes]", timeout=30_000)
    assert page.locator("tr[data-task=hello][data-status=Completed]").count() == 1
    ui.shot("04-completed")

    ui.goto("/ui/workflows/new")
    page.fill("#submit-text", BROKEN)
    page.select_option("#submit-format", "ncl")
    page.click("#submit-check")
    page.wait_for_selector(".submit-problem")
    page.set_viewport_size({"width": 420, "height": 860})
    ui.shot("05-narrow")
    page.set_viewport_size({"width": 1280, "height": 800})
    page.emulate_media(color_scheme="dark")
    ui.shot("06-dark")
