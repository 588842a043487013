"""The operations page in real headless Chromium against a real platform whose keeper policy
makes `server.*` on `prod/*` wait for an operator's approval.

A requests an operation through the keeper's API; A's page shows it waiting with no way to
approve it; B (another operator) approves it in the browser with a reason and it ends
`published`; evaluate and freeze from the page; a viewer sees no control and a forged POST with
the viewer's own valid CSRF token is refused (403) with nothing changed. Screenshots of each
step go to the test's artifacts dir (see conftest)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from provisioning.platform.pidfile import PidFile
from tests.browser.conftest import UiPlatform, UiSession
from tests.helpers import until_sync as until

POLICY = """{
  policies = [
    { name = "dev-auto", op_types = ["server.*"], targets = ["dev/*"], decision = "approve" },
    { name = "prod-manual", op_types = ["server.*"], targets = ["prod/*"],
      decision = "require_approval", approver_role = "operator" },
  ],
}
"""
NAMES = ["dev-auto", "prod-manual"]


class Api:
    """The platform's JSON APIs as one user (a bearer token from the control center)."""

    def __init__(self, plat: UiPlatform, username: str, password: str) -> None:
        login = httpx.post(
            f"{plat.cc_url}/auth/login", json={"username": username, "password": password}
        )
        assert login.status_code == 200, login.text
        self.headers = {"Authorization": f"Bearer {login.json()['data']['access_token']}"}
        keeper = PidFile(plat.data_dir / "run").url(2)
        assert keeper, "the platform recorded no ops-keeper URL"
        self.keeper = keeper.rstrip("/")

    def call(self, method: str, path: str, **kw: Any) -> Any:
        resp = httpx.request(method, self.keeper + path, headers=self.headers, timeout=10, **kw)
        assert resp.is_success, resp.text
        return resp.json()["data"]


@pytest.fixture(scope="module")
def policy(ui_platform: UiPlatform) -> Iterator[None]:
    """The test policy, written once the platform runs and waited for (the keeper reloads)."""
    path = ui_platform.data_dir / "config" / "keeper_policy.ncl"
    path.with_suffix(".tmp").write_text(POLICY, encoding="utf-8")
    os.replace(path.with_suffix(".tmp"), path)

    def loaded() -> bool:
        done = ui_platform.prvng("--output", "json", "ops", "policy")
        return bool(json.loads(done.stdout).get("names") == NAMES)

    until("the keeper loads the test policy", loaded)
    yield


def test_another_operator_approves_in_the_browser(
    ui: UiSession, ui_platform: UiPlatform, policy: None
) -> None:
    a_name, a_password = ui_platform.create_user("operator")
    b_name, b_password = ui_platform.create_user("operator")
    a = Api(ui_platform, a_name, a_password)
    op = a.call(
        "POST",
        "/ops",
        json={"op_type": "server.delete", "target": "prod/web-01", "reason": "decommission"},
    )
    assert op["state"] == "pending_approval"

    # A sees their own request waiting, with no approve or reject button for it.
    ui.login(username=a_name, password=a_password)
    ui.goto("/ui/ops")
    row = ui.page.wait_for_selector(f'#pending [data-op-id="{op["id"]}"]')
    assert row.query_selector("[data-action]") is None
    assert "Your own request" in row.inner_text()
    ui.shot("01-requester-sees-own-request")
    ui.page.click("#logout")
    ui.page.wait_for_url("**/ui/login")

    # B approves it with a reason.
    ui.login(username=b_name, password=b_password)
    ui.goto("/ui/ops")
    row = ui.page.wait_for_selector(f'#pending [data-op-id="{op["id"]}"]')
    ui.shot("02-approver-inbox")
    row.query_selector("input[name=reason]").fill("change 42 reviewed")
    row.query_selector('[data-action="approve"]').click()
    ui.page.wait_for_selector("#ops-done")
    assert "approved" in ui.page.inner_text("#ops-done")

    def published() -> bool:
        return bool(a.call("GET", f"/ops/{op['id']}")["state"] == "published")

    until("the operation is published", published)
    done = a.call("GET", f"/ops/{op['id']}")
    assert done["approver_name"] == b_name and done["approver_reason"] == "change 42 reviewed"
    ui.goto("/ui/ops?state=published")
    ui.page.wait_for_selector(f'#ops-history [data-op-id="{op["id"]}"][data-state="published"]')
    ui.shot("03-history-published")

    # Evaluate: the decision, the policy and the trace; nothing recorded.
    before = len(a.call("GET", "/ops", params={"limit": 1000}))
    ui.page.fill("#evaluate-form input[name=op_type]", "server.create")
    ui.page.fill("#evaluate-form input[name=target]", "prod/web-09")
    ui.page.fill("#evaluate-form textarea[name=params]", '{"size": "small"}')
    ui.page.click("#evaluate-form button[type=submit]")
    ui.page.wait_for_selector("#evaluation")
    assert "prod-manual" in ui.page.inner_text("#evaluation")
    assert "dev-auto" in ui.page.inner_text("#trace")
    ui.shot("04-evaluate")
    assert len(a.call("GET", "/ops", params={"limit": 1000})) == before

    # A freeze: the banner shows it until it is lifted.
    ui.page.fill("#freeze-form input[name=reason]", "release week")
    ui.page.fill("#freeze-form input[name=scope]", "prod/*")
    ui.page.click('#freeze-form [data-action="freeze"]')
    ui.page.wait_for_selector("#freeze-banner")
    assert "release week" in ui.page.inner_text("#freeze-banner")
    ui.shot("05-freeze-banner")
    ui.page.emulate_media(color_scheme="dark")
    ui.shot("06-dark")
    ui.page.set_viewport_size({"width": 420, "height": 800})
    ui.shot("07-narrow")
    ui.page.set_viewport_size({"width": 1280, "height": 800})
    ui.page.emulate_media(color_scheme="light")
    ui.page.click('#freeze-banner [data-action="lift"]')
    ui.page.wait_for_selector("#ops-done")
    assert ui.page.query_selector("#freeze-banner") is None
    assert a.call("GET", "/ops/freezes") == []


def test_a_viewer_sees_no_control_and_a_forged_post_is_refused(
    ui: UiSession, ui_platform: UiPlatform, policy: None
) -> None:
    name, password = ui_platform.create_user("operator")
    a = Api(ui_platform, name, password)
    op = a.call("POST", "/ops", json={"op_type": "server.delete", "target": "prod/db-01"})
    ui.login("viewer")
    ui.goto("/ui/ops")
    ui.page.wait_for_selector(f'#ops-history [data-op-id="{op["id"]}"]')
    assert ui.page.query_selector("[data-action]") is None
    for absent in ("#pending", "#evaluate-form", "#freeze-form", "input[name=reason]"):
        assert ui.page.query_selector(absent) is None, absent
    ui.shot("01-viewer-ops")
    csrf = ui.page.get_attribute('meta[name="csrf-token"]', "content")
    assert csrf
    for path, form in (
        (f"/ui/ops/{op['id']}/approve", {"reason": "forged"}),
        ("/ui/ops/freeze", {"reason": "forged", "scope": "*"}),
    ):
        resp = ui.page.request.post(
            ui.url(path), form={**form, "csrf_token": csrf}, max_redirects=0
        )
        assert resp.status == 403, (path, resp.status)
    assert a.call("GET", f"/ops/{op['id']}")["state"] == "pending_approval"
    assert a.call("GET", "/ops/freezes") == []
