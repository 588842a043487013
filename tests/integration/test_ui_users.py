"""The web UI's users, API keys and system pages, in-process (httpx against the control
center's app, SQLite and PostgreSQL): an admin creates a user, changes their roles, disables and
enables them (the audit log names the admin); an API key created in the UI is shown once, works
against the orchestrator and the control center, and stops working once revoked there; a viewer
sees only themselves and no control, and their forged requests are refused; the system page
shows the services."""

from __future__ import annotations

import re

from tests.integration import test_ui_security
from tests.integration.test_ui_security import USER_PASSWORD, Platform

platform = test_ui_security.platform  # the fixture: a platform in-process, the UI on it

NEW_PASSWORD = "a long passphrase for carol"


async def test_an_admin_creates_changes_disables_and_enables_a_user(platform: Platform) -> None:
    p = platform
    admin = await p.browser()
    page = await admin.get("/ui/users")
    assert page.status_code == 200
    assert 'data-user="admin"' in page.text and 'id="create-user"' in page.text
    assert 'data-role="viewer"' in page.text and "workflow:read" in page.text
    resp = await admin.post(
        "/ui/users",
        {
            "username": "carol",
            "password": NEW_PASSWORD,
            "roles": "viewer",
            "csrf_token": admin.csrf,
        },
    )
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/users?done=created"
    page = await admin.get("/ui/users?done=created")
    assert 'data-user="carol" data-disabled="no"' in page.text and "User created." in page.text
    carol = (await p.api.get("/users/carol", headers=p.admin)).json()["data"]
    assert carol["roles"] == ["viewer"]
    # A bad request shows its reason on the page and creates nothing.
    resp = await admin.post(
        "/ui/users",
        {"username": "dave", "password": "short", "roles": "viewer", "csrf_token": admin.csrf},
    )
    assert resp.status_code == 422 and 'id="users-error"' in resp.text
    assert (await p.api.get("/users/dave", headers=p.admin)).status_code == 404
    # Roles, then disable (carol's session ends) and enable.
    data = [("roles", "operator"), ("roles", "auditor"), ("csrf_token", admin.csrf)]
    resp = await admin.http.post(
        f"/ui/users/{carol['id']}/roles",
        content="&".join(f"{k}={v}" for k, v in data),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": "https://cc.test"},
    )
    assert resp.status_code == 303, resp.text
    carol = (await p.api.get("/users/carol", headers=p.admin)).json()["data"]
    assert carol["roles"] == ["auditor", "operator"]
    session = await p.browser("carol", NEW_PASSWORD)
    assert (await session.get("/ui/")).status_code == 200
    resp = await admin.post(f"/ui/users/{carol['id']}/disable", {"csrf_token": admin.csrf})
    assert resp.status_code == 303
    assert (await session.get("/ui/")).status_code == 303  # sent to the login page
    page = await admin.get("/ui/users")
    assert 'data-user="carol" data-disabled="yes"' in page.text
    resp = await admin.post(f"/ui/users/{carol['id']}/enable", {"csrf_token": admin.csrf})
    assert resp.status_code == 303
    assert not (await p.api.get("/users/carol", headers=p.admin)).json()["data"]["disabled"]
    # An admin cannot lock themselves out from here.
    admin_id = (await p.api.get("/auth/whoami", headers=p.admin)).json()["data"]["id"]
    resp = await admin.post(f"/ui/users/{admin_id}/disable", {"csrf_token": admin.csrf})
    assert resp.status_code == 422
    # The audit log names the admin as who did each change.
    audit = await p.api.get("/audit", headers=p.admin, params={"object_type": "User"})
    mine = [
        e
        for e in audit.json()["data"]
        if e["object_id"] in ("carol", carol["id"]) and e["action"].startswith("user:")
    ]
    assert len(mine) == 4 and {e["actor"] for e in mine} == {"admin"}


async def test_an_api_key_is_shown_once_works_and_is_revoked(platform: Platform) -> None:
    p = platform
    admin = await p.browser()
    page = await admin.get("/ui/users/keys")
    assert page.status_code == 200 and 'id="create-key"' in page.text
    resp = await admin.post(
        "/ui/users/keys",
        {"name": "ci", "scopes": "workflow:read", "expires_in_days": "7", "csrf_token": admin.csrf},
    )
    assert resp.status_code == 303, resp.text
    location = resp.headers["location"]
    assert location.startswith("/ui/users/keys?created=") and "prvng_" not in location
    page = await admin.get(location)
    found = re.search(r'<code class="secret" id="new-key-value">([^<]+)</code>', page.text)
    assert found, page.text
    key = found.group(1)
    # Shown once: the same address again (a reload) and the list show no secret.
    again = await admin.get(location)
    assert key not in again.text and 'id="new-key"' not in again.text
    assert key not in (await admin.get("/ui/users/keys")).text
    # It works, within its scopes.
    headers = {"X-API-Key": key}
    assert (await p.orch.get("/workflows", headers=headers)).status_code == 200
    assert (await p.api.get("/auth/whoami", headers=headers)).status_code == 200
    assert (await p.orch.post("/workflows", headers=headers, json={})).status_code == 403
    key_id = re.search(r'data-key-id="([^"]+)" data-key-name="ci"', again.text)
    assert key_id
    resp = await admin.post(f"/ui/users/keys/{key_id.group(1)}/revoke", {"csrf_token": admin.csrf})
    assert resp.status_code == 303
    assert (await p.orch.get("/workflows", headers=headers)).status_code == 401
    assert (await p.api.get("/auth/whoami", headers=headers)).status_code == 401
    page = await admin.get("/ui/users/keys")
    assert "revoked" in page.text
    audit = await p.api.get("/audit", headers=p.admin, params={"object_type": "ApiKey"})
    assert {e["action"] for e in audit.json()["data"]} >= {"apikey:create", "apikey:revoke"}
    assert {e["actor"] for e in audit.json()["data"]} == {"admin"}
    assert key not in audit.text


async def test_a_viewer_sees_only_themselves_and_no_control_and_forgeries_fail(
    platform: Platform,
) -> None:
    p = platform
    await p.user("vera", "viewer")
    admin_key = await p.api.post("/apikeys", headers=p.admin, json={"name": "admin-key"})
    admin_key_id = admin_key.json()["data"]["id"]
    viewer = await p.browser("vera", USER_PASSWORD)
    page = await viewer.get("/ui/users")
    assert page.status_code == 200
    assert 'data-user="vera"' in page.text and 'data-user="admin"' not in page.text
    assert 'id="create-user"' not in page.text and "data-action=" not in page.text
    admin_id = (await p.api.get("/auth/whoami", headers=p.admin)).json()["data"]["id"]
    forged = {
        "/ui/users": {"username": "eve", "password": NEW_PASSWORD, "roles": "admin"},
        f"/ui/users/{admin_id}/disable": {},
        f"/ui/users/{admin_id}/roles": {"roles": "viewer"},
    }
    for path, form in forged.items():
        resp = await viewer.post(path, {**form, "csrf_token": viewer.csrf})
        assert resp.status_code == 403, (path, resp.text)
    assert (await p.api.get("/users/eve", headers=p.admin)).status_code == 404
    me = (await p.api.get("/users/admin", headers=p.admin)).json()["data"]
    assert me["roles"] == ["admin"] and not me["disabled"]
    # Another's key is none of the viewer's business.
    keys = await viewer.get("/ui/users/keys")
    assert "admin-key" not in keys.text
    resp = await viewer.post(f"/ui/users/keys/{admin_key_id}/revoke", {"csrf_token": viewer.csrf})
    assert resp.status_code == 404
    listed = await p.api.get("/apikeys", headers=p.admin)
    assert [k["revoked_at"] for k in listed.json()["data"]] == [None]
    audit = await p.api.get("/audit", headers=p.admin, params={"actor": "vera", "result": "denied"})
    assert "user:manage" in {e["action"] for e in audit.json()["data"]}


async def test_the_system_page_shows_the_services(platform: Platform) -> None:
    p = platform
    admin = await p.browser()
    page = await admin.get("/ui/system")
    assert page.status_code == 200
    for name in ("control-center", "orchestrator"):
        assert f'data-service="{name}"' in page.text
    assert 'id="system-orchestrator"' in page.text and 'id="queue-depth"' in page.text
    live = await admin.get("/ui/system/live", **{"HX-Request": "true"})
    assert live.status_code == 200 and 'data-service="control-center"' in live.text
    nav = re.findall(r'data-nav="([a-z]+)"', page.text)
    assert "system" in nav and "users" in nav


async def test_the_infrastructure_page_lists_the_inventory(platform: Platform) -> None:
    from provisioning.workspace.inventory import Inventory

    p = platform
    inv = Inventory(p.orchestrator.engine.store.db)
    await inv.migrate()
    for infra, host in (("prod", "web-1"), ("prod", "db-1"), ("lab", "box-1")):
        await inv.record_server(
            workspace="/ws/acme",
            workspace_name="acme",
            infra=infra,
            hostname=host,
            provider="local",
            provider_id=f"id-{host}",
            address="10.0.0.5",
            status="running",
        )
    await p.user("vera", "viewer")
    viewer = await p.browser("vera", USER_PASSWORD)
    page = await viewer.get("/ui/infrastructure")
    assert page.status_code == 200
    assert re.findall(r'data-server="([^"]+)"', page.text) == ["box-1", "db-1", "web-1"]
    assert "acme" in page.text
    page = await viewer.get("/ui/infrastructure?infra=prod")
    assert re.findall(r'data-server="([^"]+)"', page.text) == ["db-1", "web-1"]
    # An infra name that is not one is ignored, not passed on.
    page = await viewer.get("/ui/infrastructure?infra=../x")
    assert page.status_code == 200 and len(re.findall(r"data-server=", page.text)) == 3
