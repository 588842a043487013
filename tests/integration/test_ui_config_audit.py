"""The Config and Audit pages of the web UI, in-process (SQLite and PostgreSQL).

A copy of examples/workspaces/demo is managed by the control center. Covered: the workspaces
and files list; the editor; validation showing Nickel's diagnostic with file, line and the
offending line; the review diff; saving (with the sha256 read: a stale one is a 409 conflict
page, nothing written); history, a version's diff and restore; a viewer seeing no save or restore
control and refused by the server when forging one; the audit page's filters, paging, verify and
export (``audit:export``: an operator has none).
"""

from __future__ import annotations

import html
import json
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from provisioning.control_center.app import ControlCenterService
from provisioning.core.settings import load_settings
from tests.conftest import free_port

DEMO = Path(__file__).parents[2] / "examples" / "workspaces" / "demo"
ADMIN_PASSWORD = "config ui admin passphrase"
PASSWORD = "config ui user passphrase"
SETTINGS = "infra/demo/settings.ncl"
BASE = "https://cc.test"
SAME_SITE = {"Origin": BASE, "Sec-Fetch-Site": "same-origin"}
EDIT = f"/ui/config/demo/edit/{SETTINGS}"


class Browser:
    def __init__(self, cc: ControlCenterService) -> None:
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=cc.app), base_url=BASE)
        self.csrf = ""

    async def get(self, path: str) -> httpx.Response:
        resp = await self.http.get(path)
        found = re.search(r'<meta name="csrf-token" content="([^"]+)"', resp.text)
        if found:
            self.csrf = html.unescape(found.group(1))
        return resp

    async def post(self, path: str, data: dict[str, str], htmx: bool = False) -> httpx.Response:
        headers = {**SAME_SITE, **({"HX-Request": "true"} if htmx else {})}
        return await self.http.post(path, data={**data, "csrf_token": self.csrf}, headers=headers)

    async def login(self, username: str, password: str) -> None:
        page = await self.get("/ui/login")
        found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert found
        form = {"username": username, "password": password, "csrf_token": html.unescape(found[1])}
        resp = await self.http.post("/ui/login", data=form, headers=SAME_SITE)
        assert resp.status_code == 303, resp.text
        await self.get("/ui/config")


@dataclass
class Env:
    cc: ControlCenterService
    ws: Path
    admin: Browser
    operator: Browser
    viewer: Browser

    def disk(self) -> str:
        return (self.ws / SETTINGS).read_text(encoding="utf-8")


@pytest.fixture
async def env(tmp_path: Path, state_url: str) -> AsyncIterator[Env]:
    ws = tmp_path / "demo"
    shutil.copytree(DEMO, ws)
    settings = load_settings(
        home=tmp_path / "home",
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
            "control_center": {
                "admin_password": ADMIN_PASSWORD,
                "port": free_port(),
                "workspaces": [str(ws)],
            },
        },
    )
    cc = ControlCenterService(settings)
    await cc.start()
    browsers: list[Browser] = []
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=cc.app), base_url="http://cc"
        ) as api:
            login = await api.post(
                "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            token = {"Authorization": f"Bearer {login.json()['data']['access_token']}"}
            for role in ("operator", "viewer"):
                body = {"username": role, "password": PASSWORD, "roles": [role]}
                assert (await api.post("/users", headers=token, json=body)).status_code == 201
        for name, password in (
            ("admin", ADMIN_PASSWORD),
            ("operator", PASSWORD),
            ("viewer", PASSWORD),
        ):
            b = Browser(cc)
            browsers.append(b)
            await b.login(name, password)
        yield Env(cc, ws, *browsers)
    finally:
        for b in browsers:
            await b.http.aclose()
        await cc.stop()


def textarea(page: httpx.Response) -> str:
    found = re.search(r'<textarea id="editor"[^>]*>\n(.*?)</textarea>', page.text, re.DOTALL)
    assert found, page.text
    return html.unescape(found[1])


def hidden(page: httpx.Response, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', page.text)
    assert found, name
    return html.unescape(found[1])


async def test_edit_validate_review_save_history_restore(env: Env) -> None:
    op = env.operator
    listing = await op.get("/ui/config")
    assert listing.status_code == 200
    assert f'href="/ui/config/demo/edit/{SETTINGS}"' in listing.text

    page = await op.get(EDIT)
    assert page.status_code == 200
    original = textarea(page)
    assert original == env.disk()
    sha = hidden(page, "expected_sha256")
    assert 'id="review"' in page.text and 'id="read-only"' not in page.text

    # A Nickel error: the diagnostic names the file and line, and shows that line.
    broken = original.replace('hostname = "web-02",', 'hostname = "web-02" oops,', 1)
    bad_line = next(n for n, t in enumerate(broken.splitlines(), 1) if "oops" in t)
    resp = await op.post(
        f"/ui/config/demo/validate/{SETTINGS}", {"content": broken.replace("\n", "\r\n")}, True
    )
    assert resp.status_code == 200
    assert 'data-valid="false"' in resp.text
    assert f'data-file="{SETTINGS}" data-line="{bad_line}"' in resp.text
    assert "oops" in resp.text  # the offending line, shown under the message

    # Saving it anyway is refused with the diagnostics, nothing written.
    form = {"content": broken, "expected_sha256": sha, "message": "broken"}
    resp = await op.post(f"/ui/config/demo/save/{SETTINGS}", form)
    assert resp.status_code == 422 and f'data-line="{bad_line}"' in resp.text
    assert textarea(resp) == broken  # the edit is kept
    assert env.disk() == original

    # Fixed: valid, the review shows the diff and the save form.
    fixed = original.replace('content = "hello from web-01"', 'content = "hello again"')
    resp = await op.post(f"/ui/config/demo/validate/{SETTINGS}", {"content": fixed}, True)
    assert 'data-valid="true"' in resp.text
    resp = await op.post(
        f"/ui/config/demo/review/{SETTINGS}", {"content": fixed, "expected_sha256": sha}, True
    )
    assert resp.status_code == 200
    assert '<span class="d-del">-' in resp.text and "hello again" in resp.text
    assert 'id="save"' in resp.text and "changed since you opened" not in resp.text

    form = {"content": fixed.replace("\n", "\r\n"), "expected_sha256": sha, "message": "greet"}
    resp = await op.post(f"/ui/config/demo/save/{SETTINGS}", form)
    assert resp.status_code == 303, resp.text
    assert resp.headers["location"] == f"{EDIT}?saved=1"
    assert env.disk() == fixed
    page = await op.get(resp.headers["location"])
    assert "Saved as version 1." in page.text
    assert re.search(r'<tr data-version="1">.*?operator.*?greet', page.text, re.DOTALL)

    # The same stale sha256 again: a conflict, nothing written, the edit kept.
    form = {"content": fixed + "\n", "expected_sha256": sha, "message": "late"}
    resp = await op.post(f"/ui/config/demo/save/{SETTINGS}", form)
    assert resp.status_code == 409 and 'id="conflict"' in resp.text
    assert env.disk() == fixed
    # The review warns about it too.
    resp = await op.post(
        f"/ui/config/demo/review/{SETTINGS}", {"content": fixed, "expected_sha256": sha}, True
    )
    assert "changed since you opened" in resp.text

    # History: version 1's page shows its diff; restoring version 0 makes version 2.
    v1 = await op.get(f"/ui/config/demo/versions/1/{SETTINGS}")
    assert v1.status_code == 200 and '<span class="d-add">+' in v1.text
    v0 = await op.get(f"/ui/config/demo/versions/0/{SETTINGS}")
    assert 'id="restore"' in v0.text
    current = hidden(v0, "expected_sha256")
    resp = await op.post(
        f"/ui/config/demo/restore/{SETTINGS}",
        {"version": "0", "expected_sha256": current, "message": ""},
    )
    assert resp.status_code == 303 and resp.headers["location"] == f"{EDIT}?saved=2"
    assert env.disk() == original

    # The audit page shows the writes; the export carries them as JSON lines.
    audit = await env.admin.get("/ui/audit?action=config:*")
    assert audit.status_code == 200
    assert 'data-action="config:write" data-result="success"' in audit.text
    assert 'data-action="config:restore"' in audit.text
    assert 'id="export"' in audit.text
    resp = await env.admin.get("/ui/audit/export?action=config:write")
    assert resp.status_code == 200
    assert resp.headers["content-disposition"].startswith("attachment;")
    lines = [json.loads(line) for line in resp.text.splitlines()]
    assert lines and {r["action"] for r in lines} == {"config:write"}
    verify = await env.admin.get("/ui/audit/verify")
    assert 'data-ok="true"' in verify.text
    # Nothing the Content-Security-Policy would block.
    for resp in (listing, page, v0, v1, audit, verify):
        assert resp.headers["content-security-policy"], resp.request.url
        assert "<style" not in resp.text and " style=" not in resp.text, resp.request.url
        assert not re.search(r"<script(?![^>]*\bsrc=)", resp.text), resp.request.url
        assert not re.search(r"\son[a-z]+=", resp.text), resp.request.url


async def test_a_viewer_reads_and_validates_but_may_not_write(env: Env) -> None:
    v = env.viewer
    page = await v.get(EDIT)
    assert page.status_code == 200
    assert 'id="read-only"' in page.text and "readonly" in page.text
    assert 'id="review"' not in page.text and 'id="save"' not in page.text
    resp = await v.post(f"/ui/config/demo/validate/{SETTINGS}", {"content": textarea(page)}, True)
    assert resp.status_code == 200 and 'data-valid="true"' in resp.text
    v0 = await v.get(f"/ui/config/demo/versions/0/{SETTINGS}")
    assert v0.status_code == 200 and 'id="restore"' not in v0.text

    sha = hidden(page, "expected_sha256")
    form = {"content": "{}", "expected_sha256": sha, "message": "forged"}
    for path, data in (
        (f"/ui/config/demo/save/{SETTINGS}", form),
        (f"/ui/config/demo/review/{SETTINGS}", form),
        (f"/ui/config/demo/restore/{SETTINGS}", {"version": "0", "expected_sha256": sha}),
    ):
        resp = await v.post(path, data)
        assert resp.status_code == 403, (path, resp.status_code)
    assert env.disk() == (DEMO / SETTINGS).read_text(encoding="utf-8")

    # Audit: neither a viewer nor an operator exports; a viewer does not even search.
    assert (await v.get("/ui/audit")).status_code == 403
    assert (await v.get("/ui/audit/export")).status_code == 403
    op = await env.operator.get("/ui/audit?action=config:write&result=denied")
    assert op.status_code == 200 and 'id="export"' not in op.text
    assert (await env.operator.get("/ui/audit/export")).status_code == 403
    # The refused forgeries are in the log.
    denied = await env.admin.get("/ui/audit?action=config:write&result=denied&actor=viewer")
    assert 'data-action="config:write" data-result="denied"' in denied.text


async def test_unknown_workspace_and_bad_paths_are_not_found_or_refused(env: Env) -> None:
    op = env.operator
    assert (await op.get("/ui/config/nope/edit/a.ncl")).status_code == 404
    assert (await op.get("/ui/config/demo/edit/../etc/passwd.ncl")).status_code in (404, 422)
    assert (await op.get("/ui/config/demo/edit/runtime/x.ncl")).status_code in (404, 422)
    assert (await op.get("/ui/config/demo/versions/9/" + SETTINGS)).status_code == 404
    assert (await op.get("/ui/audit?offset=abc&result=bogus&since=never")).status_code == 200
