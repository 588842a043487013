"""Users, API keys and the system page in a real browser against a running platform: an admin
creates a user and an API key, sees the key once (a reload does not show it again), the key works
against the orchestrator and the control center until it is revoked in the page (then 401); a
viewer sees no control and a forged request is refused (403); the system page lists the services.
Screenshots of each step, light, dark and narrow."""

from __future__ import annotations

import re
import secrets

import httpx

from tests.browser.conftest import UiSession


def test_an_admin_creates_a_user_and_a_key_shown_once_that_works_until_revoked(
    ui: UiSession,
) -> None:
    ui.login("admin")
    ui.goto("/ui/users")
    ui.page.wait_for_selector("#users-table")
    ui.shot("01-users")
    username = f"newbie-{secrets.token_hex(3)}"
    ui.page.fill("#create-user input[name=username]", username)
    ui.page.fill("#create-user input[name=password]", "a browser-made passphrase")
    ui.page.check("#create-user input[name=roles][value=developer]")
    ui.page.click("#create-user-submit")
    ui.page.wait_for_selector(f'tr[data-user="{username}"]')
    row = ui.page.text_content(f'tr[data-user="{username}"]') or ""
    assert "developer" in row and "viewer" in row
    ui.shot("02-user-created")

    # An API key: shown once.
    ui.page.click("a[href='/ui/users/keys']")
    ui.page.wait_for_selector("#create-key")
    ui.page.fill("#create-key input[name=name]", "browser-key")
    ui.page.click("#create-key summary")
    ui.page.check("#create-key input[name=scopes][value='workflow:read']")
    ui.page.click("#create-key-submit")
    ui.page.wait_for_selector("#new-key-value")
    key = (ui.page.text_content("#new-key-value") or "").strip()
    assert key.startswith("prvng_") and key not in ui.page.url
    ui.shot("03-key-shown-once")
    ui.page.reload()
    ui.page.wait_for_selector("#keys-table")
    assert ui.page.query_selector("#new-key-value") is None
    assert key not in ui.page.content()
    ui.shot("04-after-reload")

    # It works against the API, within its scope.
    orchestrator = ui.platform.plat.url
    headers = {"X-API-Key": key}
    assert httpx.get(f"{orchestrator}/workflows", headers=headers).status_code == 200
    whoami = httpx.get(f"{ui.platform.cc_url}/auth/whoami", headers=headers)
    assert whoami.status_code == 200 and whoami.json()["data"]["scopes"] == ["workflow:read"]

    # Revoked in the page: refused at once.
    ui.page.click('tr[data-key-name="browser-key"] button[data-action=revoke]')
    ui.page.wait_for_selector("text=Key revoked")
    assert httpx.get(f"{orchestrator}/workflows", headers=headers).status_code == 401
    assert httpx.get(f"{ui.platform.cc_url}/auth/whoami", headers=headers).status_code == 401
    ui.shot("05-key-revoked")

    # The same pages narrow and dark.
    ui.page.emulate_media(color_scheme="dark")
    ui.goto("/ui/users")
    ui.page.wait_for_selector("#users-table")
    ui.shot("06-users-dark")
    ui.page.set_viewport_size({"width": 420, "height": 800})
    ui.goto("/ui/users/keys")
    ui.page.wait_for_selector("#keys-table")
    ui.shot("07-keys-narrow-dark")


def test_a_viewer_sees_no_user_control_and_a_forged_post_is_refused(ui: UiSession) -> None:
    me = ui.login("viewer")
    ui.goto("/ui/users")
    ui.page.wait_for_selector("#users-table")
    assert ui.page.query_selector("#create-user") is None
    assert ui.page.query_selector("[data-action]") is None
    users = ui.page.eval_on_selector_all("tr[data-user]", "els => els.map(e => e.dataset.user)")
    assert users == [me]
    ui.shot("01-viewer-users")
    csrf = ui.page.get_attribute("meta[name=csrf-token]", "content")
    assert csrf
    forged = ui.context.request.post(
        ui.url("/ui/users"),
        form={
            "username": "intruder",
            "password": "a forged passphrase",
            "roles": "admin",
            "csrf_token": csrf,
        },
        max_redirects=0,
    )
    assert forged.status == 403
    ui.page.reload()
    assert "intruder" not in ui.page.content()


def test_the_system_page_shows_the_services(ui: UiSession) -> None:
    ui.login("viewer")
    ui.page.click("[data-nav=system]")
    ui.page.wait_for_selector("#system-services")
    names = ui.page.eval_on_selector_all(
        "#system-services tr[data-service]", "els => els.map(e => e.dataset.service)"
    )
    assert {"control-center", "orchestrator"} <= set(names)
    assert re.search(r"up", ui.page.text_content('tr[data-service="control-center"]') or "")
    ui.shot("01-system")
    ui.page.emulate_media(color_scheme="dark")
    ui.page.reload()
    ui.page.wait_for_selector("#system-services")
    ui.shot("02-system-dark")
    ui.page.click("[data-nav=infrastructure]")
    ui.page.wait_for_selector("#servers-table")
    ui.shot("03-infrastructure-dark")
