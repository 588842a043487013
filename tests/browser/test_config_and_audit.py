"""The Config editor and the Audit page in real headless Chromium against a real platform that
manages a copy of examples/workspaces/demo: a Nickel error shown in place with its line, the
fix reviewed as a diff and saved, the new version in the history, the config:write record on the
audit page, the export downloaded; a viewer's read-only editor; narrow and dark layouts.
Screenshots go to the test's artifacts dir (see conftest)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning.platform.pidfile import PidFile
from tests.browser.conftest import UiPlatform, UiSession
from tests.e2e.platform_proc import running_platform

DEMO = Path(__file__).parents[2] / "examples" / "workspaces" / "demo"
SETTINGS = "infra/demo/settings.ncl"
EDIT = f"/ui/config/demo/edit/{SETTINGS}"


@pytest.fixture(scope="module")
def ui_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiPlatform]:
    """The conftest's platform, managing a copy of the demo workspace."""
    root = tmp_path_factory.mktemp("ui-config")
    ws = root / "demo"
    shutil.copytree(DEMO, ws)
    extra = f"{{ control_center = {{ workspaces = [{json.dumps(str(ws))}] }} }}"
    with running_platform(root / "data", extra_config=extra) as plat:
        cc_url = PidFile(root / "data" / "run").url(1)
        assert cc_url, "the platform did not record the control center's URL"
        yield UiPlatform(plat, cc_url.rstrip("/"))


def test_edit_validate_review_save_history_and_audit(ui: UiSession, tmp_path: Path) -> None:
    page = ui.page
    ui.login("admin")
    page.click("[data-nav=config]")
    page.wait_for_selector("h1:has-text('Config')")
    page.wait_for_selector(f"[data-workspace=demo] tr[data-file='{SETTINGS}']")
    ui.shot("01-config-workspaces")

    page.click(f"tr[data-file='{SETTINGS}'] a")
    page.wait_for_selector("#editor")
    page.wait_for_function("() => window.htmx !== undefined")
    original = page.input_value("#editor")
    assert 'hostname = "web-02",' in original

    # A Nickel error: the diagnostic appears under the editor with the file and the line.
    broken = original.replace('hostname = "web-02",', 'hostname = "web-02" oops,', 1)
    bad_line = next(n for n, t in enumerate(broken.splitlines(), 1) if "oops" in t)
    page.fill("#editor", broken)
    page.click("#validate")
    diag = page.wait_for_selector(f"#diagnostics .cfg-diag[data-line='{bad_line}']", timeout=60_000)
    assert SETTINGS in diag.inner_text() and "oops" in diag.inner_text()
    assert page.is_visible("#diagnostics [data-valid=false]")
    page.click(f"#diagnostics a.cfg-goto[data-line='{bad_line}']")  # selects that line
    assert page.inner_text("#cursor-pos").startswith(f"Line {bad_line},")
    selected = page.evaluate(
        "() => { const t = document.getElementById('editor');"
        " return t.value.slice(t.selectionStart, t.selectionEnd); }"
    )
    assert "oops" in selected
    ui.shot("02-config-error-in-place")

    # Fixed: valid; the review shows the diff; saved with a message.
    fixed = original.replace('content = "hello from web-01"', 'content = "hello from the ui"')
    page.fill("#editor", fixed)
    page.click("#validate")
    page.wait_for_selector("#diagnostics [data-valid=true]", timeout=60_000)
    page.click("#review")
    page.wait_for_selector("#review-diff .d-add:has-text('hello from the ui')")
    assert page.is_visible("#review-diff .d-del:has-text('hello from web-01')")
    ui.shot("03-config-review-diff")
    page.fill("#save-message", "greet from the browser")
    page.click("#save")
    page.wait_for_selector("#saved")
    assert page.input_value("#editor") == fixed
    row = page.wait_for_selector("#history tr[data-version='1']")
    assert "greet from the browser" in row.inner_text()
    assert ui.username in row.inner_text()
    ui.shot("04-config-saved-history")

    # A version's page: its diff, and restore.
    page.click("#history tr[data-version='1'] a")
    page.wait_for_selector("#version-diff .d-add:has-text('hello from the ui')")
    ui.shot("05-config-version")
    page.goto(ui.url(f"/ui/config/demo/versions/0/{SETTINGS}"))
    page.wait_for_selector("#current-diff")
    assert page.is_visible("#restore")

    # Audit: the config:write record; the chain verifies; the export downloads.
    page.click("[data-nav=audit]")
    page.wait_for_selector("h1:has-text('Audit')")
    page.wait_for_selector("#verify-result[data-ok=true]")
    page.fill("input[name=action]", "config:*")
    page.click("#audit-filters button[type=submit]")
    page.wait_for_url(re.compile(r"/ui/audit\?action=config"))
    record = page.wait_for_selector(
        "#audit-table tr[data-action='config:write'][data-result=success]"
    )
    assert ui.username in record.inner_text()
    ui.shot("06-audit")
    with page.expect_download() as info:
        page.click("#export")
    download = info.value
    assert download.suggested_filename.endswith(".jsonl")
    saved = tmp_path / "audit.jsonl"
    download.save_as(str(saved))
    lines = [json.loads(line) for line in saved.read_text(encoding="utf-8").splitlines()]
    assert any(r["action"] == "config:write" for r in lines)
    assert {r["action"].split(":")[0] for r in lines} == {"config"}

    page.set_viewport_size({"width": 420, "height": 860})
    ui.shot("07-audit-narrow")
    page.goto(ui.url(EDIT))
    page.wait_for_selector("#editor")
    ui.shot("08-config-editor-narrow")
    page.set_viewport_size({"width": 1280, "height": 800})
    page.emulate_media(color_scheme="dark")
    ui.shot("09-config-editor-dark")
    page.goto(ui.url("/ui/audit"))
    page.wait_for_selector("#verify-result")
    ui.shot("10-audit-dark")


def test_a_viewer_gets_a_read_only_editor(ui: UiSession) -> None:
    page = ui.page
    ui.login("viewer")
    page.goto(ui.url(EDIT))
    page.wait_for_selector("#read-only")
    assert page.get_attribute("#editor", "readonly") is not None
    assert page.query_selector("#review") is None and page.query_selector("#save") is None
    page.wait_for_function("() => window.htmx !== undefined")
    page.click("#validate")
    page.wait_for_selector("#diagnostics [data-valid]", timeout=60_000)
    ui.shot("01-viewer-read-only")
    assert page.query_selector("[data-nav=audit]") is None
