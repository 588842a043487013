"""Workspace configuration through the control center (`/config/…`), SQLite and PostgreSQL.

A copy of examples/workspaces/demo is managed by an in-process control center; an operator
writes, a viewer reads. Covered: listing and reading, validation mapped to file and line,
validated atomic writes with optimistic concurrency (two writers from one version: exactly one
wins), history, diff and restore, refused paths, permissions, the audit trail (never the
content), changes made on disk outside the API, and a file whose evaluation never ends
stopped at ``control_center.nickel_timeout_s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.control_center.app import ControlCenterService
from provisioning.control_center.client import ControlCenterClient
from provisioning.control_center.config_files import clean_path, parse_workspaces
from provisioning.core.errors import ConfigError, Conflict, ValidationError
from provisioning.core.settings import load_settings
from tests.conftest import free_port

DEMO = Path(__file__).parents[2] / "examples" / "workspaces" / "demo"
ADMIN_PASSWORD = "config admin passphrase"
PASSWORD = "config user passphrase"
SETTINGS = "infra/demo/settings.ncl"
BASE = "/config/workspaces/demo"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


@dataclass
class Env:
    cc: ControlCenterService
    http: httpx.AsyncClient
    ws: Path
    operator: dict[str, str]
    viewer: dict[str, str]

    def client(self, headers: dict[str, str]) -> ControlCenterClient:
        token = headers["Authorization"].removeprefix("Bearer ")
        return ControlCenterClient(
            "http://cc", token=token, transport=httpx.ASGITransport(app=self.cc.app)
        )

    def disk(self, rel: str = SETTINGS) -> str:
        return (self.ws / rel).read_text(encoding="utf-8")

    async def put(
        self, content: str, expected: str | None, rel: str = SETTINGS, **kw: Any
    ) -> httpx.Response:
        body = {"content": content, "expected_sha256": expected, "message": "edit", **kw}
        return await self.http.put(f"{BASE}/files/{rel}", headers=self.operator, json=body)

    async def audit(self, action: str) -> list[dict[str, Any]]:
        rows = await self.cc.identity.audit_query(limit=1000, newest_first=True)
        return [r for r in rows if r["action"] == action]


@pytest.fixture
async def env(tmp_path: Path, state_url: str) -> AsyncIterator[Env]:
    async with open_env(tmp_path, state_url) as e:
        yield e


@asynccontextmanager
async def open_env(tmp_path: Path, state_url: str, **control_center: Any) -> AsyncIterator[Env]:
    """A control center managing a copy of the demo workspace; ``control_center`` settings
    added to the test's own."""
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
                **control_center,
            },
        },
    )
    cc = ControlCenterService(settings)
    await cc.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=cc.app), base_url="http://cc"
        ) as http:

            async def login(name: str, password: str) -> dict[str, str]:
                body = {"username": name, "password": password}
                resp = await http.post("/auth/login", json=body)
                assert resp.status_code == 200, resp.text
                return {"Authorization": f"Bearer {resp.json()['data']['access_token']}"}

            admin = await login("admin", ADMIN_PASSWORD)
            for role in ("operator", "viewer"):
                body = {"username": role, "password": PASSWORD, "roles": [role]}
                assert (await http.post("/users", headers=admin, json=body)).status_code == 201
            yield Env(
                cc, http, ws, await login("operator", PASSWORD), await login("viewer", PASSWORD)
            )
    finally:
        await cc.stop()


async def test_workspaces_and_their_nickel_files_are_listed_and_read(env: Env) -> None:
    resp = await env.http.get("/config/workspaces", headers=env.viewer)
    assert resp.json()["data"] == [{"id": "demo", "path": str(env.ws), "available": True}]

    files = (await env.http.get(f"{BASE}/files", headers=env.viewer)).json()["data"]
    by_path = {f["path"]: f for f in files}
    assert set(by_path) == {
        "config/workspace.ncl",
        SETTINGS,
        "infra/demo/workflows/site.ncl",
        "infra/demo-broken/settings.ncl",
        "infra/demo-broken/extensions/taskservs/broken/extension.ncl",
    }
    text = env.disk()
    assert by_path[SETTINGS]["sha256"] == sha(text)
    assert by_path[SETTINGS]["size"] == len(text.encode())
    assert by_path[SETTINGS]["version"] is None  # not read yet

    doc = (await env.http.get(f"{BASE}/files/{SETTINGS}", headers=env.viewer)).json()["data"]
    assert (doc["content"], doc["sha256"], doc["version"]) == (text, sha(text), 0)
    history = (await env.http.get(f"{BASE}/files/{SETTINGS}/history", headers=env.viewer)).json()
    assert [(v["version"], v["author"], v["message"]) for v in history["data"]] == [
        (0, "on-disk", "found on disk")
    ]
    assert history["data"][0]["created_at"].endswith("+00:00")
    assert doc["mtime"].endswith("+00:00")
    files = (await env.http.get(f"{BASE}/files", headers=env.viewer)).json()["data"]
    assert {f["path"]: f["version"] for f in files}[SETTINGS] == 0


async def test_validation_maps_nickel_diagnostics_to_the_file_and_line(env: Env) -> None:
    text = env.disk()
    bad = text.replace('hostname = "web-02",', "hostname = 5,")
    resp = await env.http.post(
        f"{BASE}/validate", headers=env.viewer, json={"path": SETTINGS, "content": bad}
    )
    res = resp.json()["data"]
    assert res["valid"] is False
    [diag] = res["diagnostics"]
    assert (diag["file"], diag["line"]) == (SETTINGS, line_of(bad, "hostname = 5"))
    assert diag["column"] == bad.splitlines()[diag["line"] - 1].index("5") + 1
    assert "hostname" in diag["message"] and diag["preexisting"] is False
    assert str(env.ws) not in json.dumps(res) and "prvng-config-check" not in json.dumps(res)

    # A syntax error in a file nothing imports; a reference to a provider that does not exist.
    lib = "{\n  a = 1,\n  b = 2 +,\n}\n"
    res = (
        await env.http.post(
            f"{BASE}/validate",
            headers=env.viewer,
            json={"path": "infra/demo/lib.ncl", "content": lib},
        )
    ).json()["data"]
    assert [(d["file"], d["line"]) for d in res["diagnostics"]] == [("infra/demo/lib.ncl", 3)]
    unknown = text.replace(
        'provider = "local",\n      labels = { role = "cache" }',
        'provider = "nope",\n      labels = { role = "cache" }',
    )
    res = (
        await env.http.post(
            f"{BASE}/validate", headers=env.viewer, json={"path": SETTINGS, "content": unknown}
        )
    ).json()["data"]
    [diag] = res["diagnostics"]
    assert (diag["file"], diag["line"]) == (SETTINGS, line_of(unknown, '"web-02"'))
    assert "no provider 'nope'" in diag["message"]

    ok = (
        await env.http.post(
            f"{BASE}/validate", headers=env.viewer, json={"path": SETTINGS, "content": text + "\n"}
        )
    ).json()["data"]
    assert (ok["valid"], ok["diagnostics"]) == (True, [])
    assert env.disk() == text and not (env.ws / "infra/demo/lib.ncl").exists()


async def test_a_valid_write_changes_the_file_and_records_a_version_and_an_audit_record(
    env: Env,
) -> None:
    text = env.disk()
    new = text.replace('content = "hello from web-01"', 'content = "marker-7f3a from web-01"')
    async with env.client(env.operator) as c:
        doc = await c.config_write(
            "demo", SETTINGS, new, expected_sha256=sha(text), message="new greeting"
        )
        assert (doc["version"], doc["sha256"], doc["previous_sha256"]) == (1, sha(new), sha(text))
        assert env.disk() == new
        history = await c.config_history("demo", SETTINGS)
        assert [(v["version"], v["author"], v["message"]) for v in history] == [
            (1, "operator", "new greeting"),
            (0, "on-disk", "found on disk"),
        ]
        assert (await c.config_read("demo", SETTINGS))["version"] == 1
        # The same content again: nothing new.
        again = await c.config_write("demo", SETTINGS, new, expected_sha256=sha(new), message="x")
        assert (again["version"], again["unchanged"]) == (1, True)

    [record, *_] = await env.audit("config:write")
    assert record["actor"] == "operator" and record["result"] == "success"
    assert record["details"]["unchanged"] is True
    first = (await env.audit("config:write"))[-1]
    assert first["details"] | {"message": "new greeting"} == {
        "workspace": "demo",
        "path": SETTINGS,
        "version": 1,
        "sha256": sha(new),
        "previous_sha256": sha(text),
        "message": "new greeting",
    }
    rows = await env.cc.identity.audit_query(limit=1000)
    assert "marker-7f3a" not in json.dumps(rows, default=str)
    assert not [p for p in (env.ws / "infra/demo").iterdir() if p.name.endswith(".tmp")]


async def test_an_invalid_write_is_refused_with_diagnostics_and_changes_nothing(env: Env) -> None:
    text = env.disk()
    bad = text.replace('hostname = "web-02",', "hostname = 5,")
    resp = await env.put(bad, sha(text))
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    [diag] = err["details"]["diagnostics"]
    assert (diag["file"], diag["line"]) == (SETTINGS, line_of(bad, "hostname = 5"))
    assert f"{SETTINGS}:{diag['line']}:" in err["message"]
    assert env.disk() == text
    history = (await env.http.get(f"{BASE}/files/{SETTINGS}/history", headers=env.viewer)).json()
    assert [v["version"] for v in history["data"]] == [0]
    [refused] = await env.audit("config:write")
    assert (refused["result"], refused["details"]["reason"]) == ("failure", "validation_error")


async def test_a_file_that_never_ends_evaluating_is_refused_naming_the_time_limit(
    tmp_path: Path, state_url: str
) -> None:
    # The whole check of the demo workspace takes well under a second; 3 s leaves room.
    async with open_env(tmp_path, state_url, nickel_timeout_s=3) as env:
        text = env.disk()
        fib = "let rec fib = fun n => if n < 2 then n else fib (n - 1) + fib (n - 2) in"
        looping = text.replace(
            "  description = ",
            f"  description = {fib} std.to_string (fib 100) ++ ",
            1,
        )
        assert looping != text
        async with asyncio.timeout(120):
            resp = await env.put(looping, sha(text))
        assert resp.status_code == 422, resp.text
        err = resp.json()["error"]
        [diag] = err["details"]["diagnostics"]
        assert (diag["file"], diag["line"], diag["preexisting"]) == (SETTINGS, None, False)
        assert f"{SETTINGS} took longer than 3 s and was stopped" in diag["message"]
        assert "nickel_timeout_s" in diag["message"]
        assert "prvng-config-check" not in json.dumps(err)
        assert env.disk() == text
        history = await env.http.get(f"{BASE}/files/{SETTINGS}/history", headers=env.viewer)
        assert [v["version"] for v in history.json()["data"]] == [0]

        # The control center goes on: the next valid write is checked and stored.
        async with asyncio.timeout(120):
            resp = await env.put(text + "# ok\n", sha(text))
        assert resp.status_code == 200, resp.text
        assert env.disk() == text + "# ok\n"


async def test_a_problem_the_workspace_already_had_does_not_block_a_write(env: Env) -> None:
    broken = env.ws / "infra/demo-broken/settings.ncl"
    broken.write_text(broken.read_text().replace('provider = "local"', 'provider = "gone"', 1))
    text = env.disk()
    new = text + "# a comment\n"
    resp = await env.put(new, sha(text))
    assert resp.status_code == 200, resp.text
    check = await env.http.post(
        f"{BASE}/validate", headers=env.viewer, json={"path": SETTINGS, "content": new}
    )
    [diag] = check.json()["data"]["diagnostics"]
    assert (diag["file"], diag["preexisting"]) == ("infra/demo-broken/settings.ncl", True)
    assert check.json()["data"]["valid"] is True


async def test_a_write_from_a_stale_version_is_refused_with_both_hashes(env: Env) -> None:
    text = env.disk()
    stale = "0" * 64
    resp = await env.put(text + "\n", stale)
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert err["code"] == "conflict"
    assert stale in err["message"] and sha(text) in err["message"]
    assert err["details"] == {
        "path": SETTINGS,
        "expected_sha256": stale,
        "current_sha256": sha(text),
    }
    assert env.disk() == text
    async with env.client(env.operator) as c:
        with pytest.raises(Conflict):
            await c.config_write("demo", SETTINGS, text, expected_sha256=None, message="create?")


async def test_of_two_writers_from_the_same_version_exactly_one_wins(env: Env) -> None:
    text = env.disk()
    first, second = text + "# first\n", text + "# second\n"
    answers = await asyncio.gather(env.put(first, sha(text)), env.put(second, sha(text)))
    assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
    won = first if answers[0].status_code == 200 else second
    assert env.disk() == won
    history = (await env.http.get(f"{BASE}/files/{SETTINGS}/history", headers=env.viewer)).json()
    assert [v["sha256"] for v in history["data"]] == [sha(won), sha(text)]


async def test_a_new_file_is_created_from_a_null_hash(env: Env) -> None:
    rel = "infra/demo/workflows/extra.ncl"
    content = (env.ws / "infra/demo/workflows/site.ncl").read_text()
    resp = await env.put(content, None, rel=rel)
    assert resp.status_code == 201, resp.text
    assert resp.json()["data"] | {"sha256": "-"} == {
        "workspace": "demo",
        "path": rel,
        "version": 0,
        "sha256": "-",
        "previous_sha256": None,
        "size": len(content.encode()),
        "created": True,
        "unchanged": False,
    }
    assert env.disk(rel) == content
    assert (await env.put(content, None, rel=rel)).status_code == 409
    resp = await env.put('{ note = "été" }', None, rel="infra/demo/été.ncl")
    assert resp.status_code == 201, resp.text
    assert env.disk("infra/demo/été.ncl") == '{ note = "été" }'


async def test_history_diff_versions_and_restore(env: Env) -> None:
    v0 = env.disk()
    v1 = v0.replace("dnsmasq", "dnsmasq", 1) + "# one\n"
    v2 = v1 + "# two\n"
    assert (await env.put(v1, sha(v0), message="one")).status_code == 200
    assert (await env.put(v2, sha(v1), message="two")).status_code == 200
    async with env.client(env.viewer) as c:
        last = await c.config_diff("demo", SETTINGS)
        assert (last["from"], last["to"]) == (1, 2)
        assert "+# two\n" in last["diff"] and "+# one" not in last["diff"]
        assert last["diff"].startswith(f"--- a/{SETTINGS}@1\n+++ b/{SETTINGS}@2\n")
        whole = await c.config_diff("demo", SETTINGS, 0, 2)
        assert "+# one\n" in whole["diff"] and "+# two\n" in whole["diff"]
        assert (await c.config_version("demo", SETTINGS, 0))["content"] == v0
        resp = await env.http.get(f"{BASE}/files/{SETTINGS}/versions/9", headers=env.viewer)
        assert resp.status_code == 404 and "versions: 0 to 2" in resp.json()["error"]["message"]
    async with env.client(env.operator) as c:
        doc = await c.config_restore("demo", SETTINGS, 0, expected_sha256=sha(v2))
        assert (doc["version"], doc["sha256"]) == (3, sha(v0))
        history = await c.config_history("demo", SETTINGS)
    assert env.disk() == v0
    assert (history[0]["restored_from"], history[0]["message"]) == (0, "restore version 0")
    [record] = await env.audit("config:restore")
    assert record["details"]["restored_from"] == 0 and record["details"]["sha256"] == sha(v0)


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("infra/%2E%2E/%2E%2E/secret.ncl", 422, "'..'"),
        ("infra/demo/broken.sh", 422, "only Nickel files"),
        ("runtime/state.ncl", 422, "runtime/"),
        (".git/config.ncl", 422, "hidden"),
        ("infra/demo/escape.ncl", 422, "outside"),
        ("infra/out/x.ncl", 422, "outside"),
        ("infra/demo/missing.ncl", 404, "infra/demo/missing.ncl"),
    ],
)
async def test_paths_outside_the_workspace_or_not_nickel_are_refused(
    env: Env, tmp_path: Path, path: str, status: int, says: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.ncl").write_text("{ secret = 1 }")
    (env.ws / "infra/demo/escape.ncl").symlink_to(outside / "x.ncl")
    (env.ws / "infra/out").symlink_to(outside)
    resp = await env.http.get(f"{BASE}/files/{path}", headers=env.viewer)
    assert resp.status_code == status, resp.text
    assert says in resp.json()["error"]["message"]
    if status == 422:
        put = await env.put("{ secret = 2 }", None, rel=path)
        assert put.status_code == 422, put.text
    assert (outside / "x.ncl").read_text() == "{ secret = 1 }"
    files = (await env.http.get(f"{BASE}/files", headers=env.viewer)).json()["data"]
    assert not [f for f in files if "escape" in f["path"] or f["path"].startswith("infra/out")]


async def test_a_link_inside_the_workspace_is_read_through_but_never_written_through(
    env: Env,
) -> None:
    text = env.disk()
    (env.ws / "infra/demo/alias.ncl").symlink_to("settings.ncl")
    (env.ws / "infra/alias").symlink_to(env.ws / "infra/demo")  # absolute, still inside
    for rel in ("infra/demo/alias.ncl", "infra/alias/settings.ncl"):
        doc = (await env.http.get(f"{BASE}/files/{rel}", headers=env.viewer)).json()["data"]
        assert doc["content"] == text
        resp = await env.put(text + "# via link\n", sha(text), rel=rel)
        assert resp.status_code == 422, resp.text
        assert f"edit {SETTINGS}" in resp.json()["error"]["message"]
        body = {"path": rel, "content": "{ broken = }"}
        resp = await env.http.post(f"{BASE}/validate", headers=env.viewer, json=body)
        assert resp.status_code == 422, resp.text
    assert env.disk() == text


async def test_odd_paths_and_files_get_a_client_error_never_a_server_error(env: Env) -> None:
    (env.ws / "folder.ncl").mkdir()
    (env.ws / "latin1.ncl").write_bytes(b'{ a = "\xe9" }')
    odd = ["%00.ncl", "%25%7B.ncl", "x" * 300 + ".ncl", "a//b.ncl", "infra"]
    odd += ["config/workspace.ncl/x.ncl", "a%5Cb.ncl", "folder.ncl", "latin1.ncl"]
    put = {"content": "{}", "expected_sha256": None, "message": "m"}
    for path in odd:
        for method, suffix, body in (
            ("GET", "", None),
            ("GET", "/history", None),
            ("GET", f"/diff?from=0&to={2**31 - 1}", None),
            ("PUT", "", put),
            ("POST", "/restore", {"version": 0}),
        ):
            url = f"{BASE}/files/{path}{suffix}"
            resp = await env.http.request(method, url, headers=env.operator, json=body)
            assert 400 <= resp.status_code < 500, (method, url, resp.text)
    resp = await env.http.get(f"{BASE}/files/latin1.ncl", headers=env.viewer)
    assert "latin1.ncl is not UTF-8 text" in resp.json()["error"]["message"]
    assert (await env.http.get(f"{BASE}/files", headers=env.viewer)).status_code == 200


async def test_refused_requests_name_what_is_wrong(env: Env) -> None:
    for body, says in (
        ({"path": "../x.ncl", "content": "{}"}, "'..'"),
        ({"path": "/etc/x.ncl", "content": "{}"}, "absolute"),
        ({"path": SETTINGS}, "both path and content"),
    ):
        resp = await env.http.post(f"{BASE}/validate", headers=env.viewer, json=body)
        assert resp.status_code == 422 and says in resp.json()["error"]["message"], resp.text
    resp = await env.http.get("/config/workspaces/nope/files", headers=env.viewer)
    assert resp.status_code == 404 and "'nope'" in resp.json()["error"]["message"]
    resp = await env.http.get(
        f"{BASE}/files/infra/demo/settings.ncl/diff?from=7", headers=env.viewer
    )
    assert resp.status_code == 404 and "no version 7" in resp.json()["error"]["message"]


async def test_a_viewer_reads_but_may_not_write_and_the_denial_is_audited(env: Env) -> None:
    text = env.disk()
    assert (await env.http.get(f"{BASE}/files/{SETTINGS}", headers=env.viewer)).status_code == 200
    body = {"content": text + "\n", "expected_sha256": sha(text), "message": "sneaky"}
    resp = await env.http.put(f"{BASE}/files/{SETTINGS}", headers=env.viewer, json=body)
    assert resp.status_code == 403 and "config:write" in resp.json()["error"]["message"]
    body = {"version": 0, "expected_sha256": sha(text)}
    resp = await env.http.post(f"{BASE}/files/{SETTINGS}/restore", headers=env.viewer, json=body)
    assert resp.status_code == 403
    assert env.disk() == text
    denied = [r for r in await env.audit("config:write") if r["result"] == "denied"]
    assert [r["actor"] for r in denied] == ["viewer", "viewer"]
    assert (await env.http.get(f"{BASE}/files", headers={})).status_code == 401


async def test_a_change_made_on_disk_is_recorded_as_an_on_disk_version(env: Env) -> None:
    v0 = env.disk()
    assert (await env.http.get(f"{BASE}/files/{SETTINGS}", headers=env.viewer)).status_code == 200
    by_hand = v0 + "# edited in vi\n"
    (env.ws / SETTINGS).write_text(by_hand)
    files = (await env.http.get(f"{BASE}/files", headers=env.viewer)).json()["data"]
    assert {f["path"]: f["version"] for f in files}[SETTINGS] is None  # differs from history
    doc = (await env.http.get(f"{BASE}/files/{SETTINGS}", headers=env.viewer)).json()["data"]
    assert (doc["version"], doc["sha256"]) == (1, sha(by_hand))
    # Changed again by hand, then written through the API from the version it read.
    by_hand_2 = by_hand + "# again\n"
    (env.ws / SETTINGS).write_text(by_hand_2)
    resp = await env.put(by_hand_2 + "# api\n", sha(by_hand_2))
    assert resp.status_code == 200 and resp.json()["data"]["version"] == 3
    history = (await env.http.get(f"{BASE}/files/{SETTINGS}/history", headers=env.viewer)).json()
    assert [(v["version"], v["author"]) for v in history["data"]] == [
        (3, "operator"),
        (2, "on-disk"),
        (1, "on-disk"),
        (0, "on-disk"),
    ]
    diff = (
        await env.http.get(f"{BASE}/files/{SETTINGS}/diff?from=0&to=1", headers=env.viewer)
    ).json()["data"]["diff"]
    assert "+# edited in vi\n" in diff


def test_the_workspaces_setting_names_each_workspace_once_by_an_absolute_path() -> None:
    assert parse_workspaces(["/srv/ws/demo", "prod=/srv/ws/production"]) == {
        "demo": Path("/srv/ws/demo"),
        "prod": Path("/srv/ws/production"),
    }
    for bad, says in (
        (["ws/demo"], "absolute"),
        (["/a/demo", "/b/demo"], "used twice"),
        (["bad id=/a/b"], "letters, digits"),
    ):
        with pytest.raises(ConfigError, match=says):
            parse_workspaces(bad)
    with pytest.raises(ValidationError):
        clean_path("a/../b.ncl")
