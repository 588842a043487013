"""The UI in real headless Chromium against a real platform: log in (with and without the TOTP
step), the dashboard, the workflows list updating live when the CLI submits a workflow, a
workflow's page, narrow and dark layouts, logging out. Screenshots of every page go to the
test's artifacts dir (see conftest). Every test also fails when a page asks another host for
anything or breaks its Content-Security-Policy (checked by the ``ui`` fixture)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pyotp

from tests.browser.conftest import UiPlatform, UiSession

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
WORKFLOW = {
    "name": "browser-live",
    "tasks": [
        {"name": "first", "action": "sleep", "args": {"seconds": 1}},
        {"name": "second", "action": "sleep", "args": {"seconds": 1}, "depends_on": ["first"]},
    ],
}


def test_login_dashboard_live_workflows_and_logout(ui: UiSession, tmp_path: Path) -> None:
    page = ui.page
    ui.goto("/ui/")
    page.wait_for_url(re.compile(r"/ui/login\?next=/ui/$"))
    ui.shot("01-login")

    ui.login("admin")
    page.wait_for_selector("h1:has-text('Dashboard')")
    page.wait_for_selector("[data-service=orchestrator].ok")
    page.wait_for_selector("[data-service=control-center].ok")
    ui.shot("02-dashboard")
    cookies = {c["name"]: c for c in ui.context.cookies()}
    session = cookies["__Host-prvng_session"]
    assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Lax"
    assert page.evaluate("document.cookie") == ""  # nothing readable by the page's scripts

    page.click("[data-nav=workflows]")
    page.wait_for_selector("h1:has-text('Workflows')")
    page.wait_for_function("() => window.htmx !== undefined")
    page.evaluate("window.__notReloaded = true")
    ui.shot("03-workflows-empty")

    spec = tmp_path / "live.json"
    spec.write_text(json.dumps(WORKFLOW), encoding="utf-8")
    submitted = ui.platform.prvng("workflow", "submit", str(spec))
    wf_id = UUID.search(submitted.stdout)
    assert wf_id, submitted.stdout
    row = f"#workflow-rows tr[data-workflow-id='{wf_id[0]}']"
    page.wait_for_selector(row)  # no reload: the SSE event made htmx fetch the rows
    page.wait_for_selector(f"{row}[data-status=Completed]", timeout=30_000)
    assert page.evaluate("window.__notReloaded") is True
    # htmx's own requests carry the session's CSRF token (hx-headers set by app.js).
    token = page.get_attribute("meta[name=csrf-token]", "content")
    assert token and ui.htmx and {h.get("x-csrf-token") for h in ui.htmx} == {token}
    ui.shot("04-workflows-live")

    page.click(f"{row} a")
    page.wait_for_selector("#tasks-table tr[data-task=second][data-status=Completed]")
    assert page.is_visible("#workflow-actions [data-action=rollback]")  # an admin may
    ui.shot("05-workflow")

    page.click("[data-nav=dashboard]")
    page.wait_for_selector(f"#recent-workflows tr[data-workflow-id='{wf_id[0]}']")
    page.set_viewport_size({"width": 420, "height": 860})
    page.wait_for_selector("[data-service=orchestrator].ok")
    ui.shot("06-dashboard-narrow")
    page.set_viewport_size({"width": 1280, "height": 800})
    page.emulate_media(color_scheme="dark")
    ui.shot("07-dashboard-dark")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background != "rgb(245, 246, 248)", background  # the dark palette applies
    page.click("#theme-toggle")  # system -> light, whatever the system says
    assert page.get_attribute("html", "data-theme") == "light"
    page.emulate_media(color_scheme="light")

    page.click("#logout")
    page.wait_for_url(re.compile(r"/ui/login$"))
    ui.shot("08-logged-out")
    assert "__Host-prvng_session" not in {c["name"] for c in ui.context.cookies()}
    ui.goto("/ui/workflows")
    page.wait_for_url(re.compile(r"/ui/login\?next="))


def test_an_account_with_totp_logs_in_with_a_code(ui: UiSession, ui_platform: UiPlatform) -> None:
    username, password = ui_platform.create_user("operator")
    with httpx.Client(base_url=ui_platform.cc_url) as api:
        login = api.post("/auth/login", json={"username": username, "password": password})
        auth = {"Authorization": f"Bearer {login.json()['data']['access_token']}"}
        secret = api.post("/auth/mfa/enroll", headers=auth).json()["data"]["secret"]
        totp = pyotp.TOTP(secret)
        assert api.post("/auth/mfa/confirm", headers=auth, json={"code": totp.now()}).is_success
    page = ui.page
    ui.goto("/ui/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(re.compile(r"/ui/login/mfa$"))
    ui.shot("01-mfa-step")
    page.fill("input[name=code]", "000000" if totp.now() != "000000" else "111111")
    page.click("#mfa-form button[type=submit]")
    page.wait_for_selector("#mfa-error")
    ui.shot("02-mfa-wrong-code")
    page.fill("input[name=code]", totp.at(int(time.time()) + 30))  # the next step: unused
    page.click("#mfa-form button[type=submit]")
    page.wait_for_selector("h1:has-text('Dashboard')")
    assert page.inner_text(".whoami-name") == username
    nav = page.eval_on_selector_all("[data-nav]", "els => els.map(e => e.dataset.nav)")
    assert "workflows" in nav and "users" in nav
    ui.shot("03-dashboard-after-mfa")


def test_a_viewer_sees_no_control_buttons(ui: UiSession, tmp_path: Path) -> None:
    spec = tmp_path / "quick.json"
    spec.write_text(json.dumps({**WORKFLOW, "name": "for-the-viewer"}), encoding="utf-8")
    submitted = ui.platform.prvng("workflow", "submit", str(spec))
    wf_id = UUID.search(submitted.stdout)
    assert wf_id, submitted.stdout
    ui.login("viewer")
    ui.goto(f"/ui/workflows/{wf_id[0]}")
    ui.page.wait_for_selector("#tasks-table")
    assert ui.page.query_selector("[data-action]") is None
    nav = ui.page.eval_on_selector_all("[data-nav]", "els => els.map(e => e.dataset.nav)")
    assert "audit" not in nav and "workflows" in nav
    ui.shot("01-viewer-workflow")


def test_an_open_page_goes_to_the_login_once_its_user_is_disabled(ui: UiSession) -> None:
    username = ui.login("developer")
    ui.goto("/ui/workflows")
    ui.page.wait_for_selector("h1:has-text('Workflows')")
    ui.platform.prvng("user", "disable", username)
    # No click, no reload: the event stream says the session ended and the page leaves.
    ui.page.wait_for_url(re.compile(r"/ui/login\?next="))
    ui.shot("01-sent-to-login")
