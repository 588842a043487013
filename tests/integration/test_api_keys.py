"""API keys from creation to revocation, on the embedded platform (SQLite and PostgreSQL).

A key is `prvng_<id>_<secret>`, shown once, stored only as a hash, listed by its prefix,
limited to scopes its owner holds, and refused on the next request once expired, revoked or
its owner disabled — by the control center and by the orchestrator alike. The last test dumps
every row of every table and looks for any password, key or token used in plain text.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text, update
from sqlalchemy.engine import Connection

from provisioning.control_center.app import ControlCenterService
from provisioning.control_center.identity import hash_secret
from provisioning.control_center.tables import api_keys
from provisioning.core.settings import load_settings
from provisioning.orchestrator.app import OrchestratorService
from provisioning.platform.embedded import build_services
from tests.conftest import free_port

ADMIN_PASSWORD = "admin passphrase for keys"
DEV_PASSWORD = "developer passphrase 1"
KEY_RE = re.compile(r"prvng_([0-9a-f]{16})_([A-Za-z0-9_-]+)")
WORKFLOW = {"name": "keys", "tasks": [{"name": "a", "action": "noop"}]}


@dataclass
class Platform:
    cc: ControlCenterService
    orchestrator: OrchestratorService
    http: httpx.AsyncClient
    orch: httpx.AsyncClient
    admin: dict[str, str]  # headers of a logged-in admin

    async def login(self, username: str, password: str) -> dict[str, Any]:
        resp = await self.http.post(
            "/auth/login", json={"username": username, "password": password}
        )
        assert resp.status_code == 200, resp.text
        return dict(resp.json()["data"])

    async def user(self, username: str, role: str) -> dict[str, str]:
        """Create a user; answer the headers of its login."""
        resp = await self.http.post(
            "/users",
            headers=self.admin,
            json={"username": username, "password": DEV_PASSWORD, "roles": [role]},
        )
        assert resp.status_code == 201, resp.text
        return bearer((await self.login(username, DEV_PASSWORD))["access_token"])

    async def new_key(self, headers: dict[str, str], **body: Any) -> dict[str, Any]:
        resp = await self.http.post("/apikeys", headers=headers, json={"name": "k", **body})
        assert resp.status_code == 201, resp.text
        return dict(resp.json()["data"])

    async def statuses(self, key: str) -> tuple[int, int]:
        """What the key gets from the control center and from the orchestrator."""
        headers = {"X-API-Key": key}
        who = await self.http.get("/auth/whoami", headers=headers)
        wfs = await self.orch.get("/workflows", headers=headers)
        return who.status_code, wfs.status_code

    async def listed(self, headers: dict[str, str]) -> list[dict[str, Any]]:
        resp = await self.http.get("/apikeys", headers=headers)
        assert resp.status_code == 200, resp.text
        return list(resp.json()["data"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def platform(tmp_path: Path, state_url: str) -> AsyncIterator[Platform]:
    settings = load_settings(
        home=tmp_path / "home",
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
            "orchestrator": {"poll_interval_s": 0.05, "port": free_port()},
            "control_center": {"admin_password": ADMIN_PASSWORD, "port": free_port()},
        },
    )
    cc, services = build_services(settings)
    orchestrator = services[1]
    assert isinstance(orchestrator, OrchestratorService)
    async with AsyncExitStack() as stack:
        for svc in services:
            await svc.start()
        stack.push_async_callback(cc.stop)  # last: it owns the shared store
        stack.push_async_callback(orchestrator.stop, kill_running=True)
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=cc.app), base_url="http://cc")
        )
        orch = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=orchestrator.app), base_url="http://orch"
            )
        )
        login = await http.post(
            "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        admin = bearer(login.json()["data"]["access_token"])
        yield Platform(cc, orchestrator, http, orch, admin)


def since(stamp: str | None) -> float:
    assert stamp is not None
    return (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()


async def test_a_new_key_is_shown_once_with_at_least_128_random_bits(platform: Platform) -> None:
    p = platform
    dev = await p.user("dev", "developer")

    created = await p.new_key(dev, name="ci", scopes=["workflow:read"])
    other = await p.new_key(dev, name="laptop")

    match = KEY_RE.fullmatch(created["key"])
    assert match is not None, created["key"]
    key_id, secret = match.groups()
    assert key_id == created["id"]
    assert created["prefix"] == f"prvng_{key_id}"
    assert len(secret) * 6 >= 128  # base64url: 6 bits a character
    assert len(set(secret)) > 10  # not a degenerate string
    other_secret = KEY_RE.fullmatch(other["key"]).group(2)  # type: ignore[union-attr]
    assert other_secret != secret
    listing = await p.listed(dev)
    assert [(k["prefix"], k["name"], k["scopes"]) for k in listing] == [
        (other["prefix"], "laptop", []),
        (created["prefix"], "ci", ["workflow:read"]),
    ]
    assert all("key" not in k for k in listing)
    assert secret not in json.dumps(listing)
    assert other_secret not in json.dumps(await p.listed(p.admin) + listing)
    who = await p.http.get("/auth/whoami", headers={"X-API-Key": created["key"]})
    assert who.json()["data"]["kind"] == "apikey"
    assert who.json()["data"]["key_id"] == key_id
    assert who.json()["data"]["scopes"] == ["workflow:read"]


async def test_a_key_cannot_have_a_scope_its_owner_lacks(platform: Platform) -> None:
    p = platform
    dev = await p.user("dev", "developer")

    for scopes in (["user:manage"], ["workflow:read", "audit:read"]):
        resp = await p.http.post("/apikeys", headers=dev, json={"name": "k", "scopes": scopes})
        assert resp.status_code == 403, resp.text
    unknown = await p.http.post(
        "/apikeys", headers=dev, json={"name": "k", "scopes": ["workflow:destroy"]}
    )

    assert unknown.status_code == 422
    assert await p.listed(dev) == []
    assert (await p.new_key(p.admin, scopes=["user:manage"]))["scopes"] == ["user:manage"]


async def test_a_scoped_key_can_do_only_what_its_scopes_name(platform: Platform) -> None:
    p = platform
    read_only = {"X-API-Key": (await p.new_key(p.admin, scopes=["workflow:read"]))["key"]}
    everything = {"X-API-Key": (await p.new_key(p.admin))["key"]}

    assert (await p.orch.get("/workflows", headers=read_only)).status_code == 200
    assert (await p.orch.post("/workflows", headers=read_only, json=WORKFLOW)).status_code == 403
    assert (await p.http.get("/users", headers=read_only)).status_code == 403
    assert (await p.http.get("/audit", headers=read_only)).status_code == 403
    assert (await p.http.get("/apikeys", headers=read_only)).status_code == 403
    # A key without scopes may do all its owner may.
    assert (await p.orch.post("/workflows", headers=everything, json=WORKFLOW)).status_code == 201
    assert (await p.http.get("/users", headers=everything)).status_code == 200
    assert (await p.http.get("/audit", headers=everything)).status_code == 200


async def test_an_expired_key_is_refused(platform: Platform) -> None:
    p = platform
    dev = await p.user("dev", "developer")
    expiring = await p.new_key(dev, expires_in_days=0.001)  # 86.4 s
    lasting = await p.new_key(dev, expires_in_days=30)
    assert -90 < since(expiring["expires_at"]) < -80
    assert -30 * 86400 - 10 < since(lasting["expires_at"]) < -30 * 86400 + 10

    past = datetime.now(UTC) - timedelta(seconds=1)
    await p.cc.db.run_write(
        lambda c: c.execute(
            update(api_keys).where(api_keys.c.id == expiring["id"]).values(expires_at=past)
        )
    )

    assert await p.statuses(expiring["key"]) == (401, 401)
    assert await p.statuses(lasting["key"]) == (200, 200)
    resp = await p.http.get("/auth/whoami", headers={"X-API-Key": expiring["key"]})
    assert resp.json()["error"]["message"] == "API key is not valid"


async def test_a_key_used_just_before_it_expires_is_refused_right_after(
    platform: Platform,
) -> None:
    # The services cache a key's answer for a few seconds; that answer must not outlive the key.
    p = platform
    dev = await p.user("dev", "developer")
    key = await p.new_key(dev, expires_in_days=3 / 86400)
    assert await p.statuses(key["key"]) == (200, 200)  # now cached by the orchestrator

    deadline = datetime.fromisoformat(key["expires_at"]) + timedelta(milliseconds=50)
    await asyncio.sleep(max(0.0, (deadline - datetime.now(UTC)).total_seconds()))

    assert await p.statuses(key["key"]) == (401, 401)


async def test_using_a_key_records_when_it_was_last_used(platform: Platform) -> None:
    p = platform
    dev = await p.user("dev", "developer")
    key = await p.new_key(dev)
    assert key["last_used_at"] is None

    assert await p.statuses(key["key"]) == (200, 200)

    (listed,) = await p.listed(dev)
    assert 0 <= since(listed["last_used_at"]) < 30


async def test_a_revoked_key_is_refused_on_the_next_request_everywhere(
    platform: Platform,
) -> None:
    p = platform
    dev = await p.user("dev", "developer")
    other = await p.user("other", "developer")
    key = await p.new_key(dev)
    assert await p.statuses(key["key"]) == (200, 200)  # now in the orchestrator's key cache

    foreign = await p.http.delete(f"/apikeys/{key['id']}", headers=other)
    assert foreign.status_code == 404
    assert await p.statuses(key["key"]) == (200, 200)
    resp = await p.http.delete(f"/apikeys/{key['id']}", headers=dev)

    assert resp.status_code == 200, resp.text
    assert since(resp.json()["data"]["revoked_at"]) >= 0
    assert await p.statuses(key["key"]) == (401, 401)
    as_bearer = await p.orch.get("/workflows", headers=bearer(key["key"]))
    assert as_bearer.status_code == 401
    records = await p.cc.identity.audit_query(action="apikey:revoke")
    assert [(r["actor"], r["object_id"], r["result"]) for r in records] == [
        ("dev", key["id"], "success")
    ]


async def test_an_api_key_cannot_create_api_keys(platform: Platform) -> None:
    p = platform
    key = (await p.new_key(p.admin))["key"]

    for headers in ({"X-API-Key": key}, bearer(key)):
        resp = await p.http.post("/apikeys", headers=headers, json={"name": "child"})
        assert resp.status_code in (403, 422), resp.text
        assert "cannot create API keys" in resp.json()["error"]["message"]

    assert [k["name"] for k in await p.listed(p.admin)] == ["k"]


# ---------------------------------------------------------------------- at rest


def dump_database(conn: Connection) -> str:
    """Every row of every table of the store, as text."""
    if conn.dialect.name == "sqlite":
        tables = conn.execute(
            text("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        ).scalars()
        names = [f'"{t}"' for t in tables]
    else:
        tables = conn.execute(
            text(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_type = 'BASE TABLE' "
                "AND table_schema NOT IN ('pg_catalog', 'information_schema') "
                "ORDER BY 1, 2"
            )
        ).all()
        names = [f'"{schema}"."{table}"' for schema, table in tables]
    assert len(names) > 5, names
    lines = []
    for name in names:
        for row in conn.execute(text(f"SELECT * FROM {name}")):
            lines.append(f"{name}: " + " | ".join(map(_as_text, row)))
    return "\n".join(lines)


def _as_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("latin-1")
    return str(value)


async def test_the_database_holds_no_plaintext_password_key_or_token(
    platform: Platform, state_url: str
) -> None:
    p = platform
    secrets: list[str] = [ADMIN_PASSWORD, DEV_PASSWORD]
    dev = await p.user("dev", "developer")
    key_ids = []
    for headers, body in ((dev, {}), (dev, {"scopes": ["workflow:read"]}), (p.admin, {})):
        key = await p.new_key(headers, **body)
        key_ids.append(key["id"])
        secrets += [key["key"], KEY_RE.fullmatch(key["key"]).group(2)]  # type: ignore[union-attr]
        assert await p.statuses(key["key"]) == (200, 200)
    new_password = "a fresh passphrase 2"
    secrets.append(new_password)
    resp = await p.http.patch("/users/dev", headers=p.admin, json={"password": new_password})
    assert resp.status_code == 200, resp.text
    wrong = "a mistyped passphrase"
    secrets.append(wrong)
    assert (
        await p.http.post("/auth/login", json={"username": "dev", "password": wrong})
    ).status_code == 401
    tokens = await p.login("dev", new_password)
    rotated = (
        await p.http.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    ).json()["data"]
    for issued in (tokens, rotated):
        secrets += [issued["refresh_token"], issued["access_token"]]
        secrets.append(issued["access_token"].rsplit(".", 1)[1])  # the signature alone
    assert (
        await p.http.post("/auth/logout", headers=bearer(rotated["access_token"]))
    ).status_code == 200
    await p.orch.post("/workflows", headers={"X-API-Key": secrets[2]}, json=WORKFLOW)

    dump = await p.cc.db.run_read(dump_database)

    # The dump does hold the data: names, key ids, and the hashes standing for the secrets.
    for name in ("admin", "dev", *key_ids):
        assert name in dump
    assert hash_secret(secrets[3]) in dump  # the first key's secret part
    assert hash_secret(tokens["refresh_token"]) in dump
    leaked = [s for s in secrets if s in dump]
    assert leaked == []
    if state_url.startswith("sqlite:///"):
        # The files too, journal included: nothing was ever written in plain text.
        db_file = Path(state_url.removeprefix("sqlite:///"))
        files = sorted(db_file.parent.glob(db_file.name + "*"))
        assert db_file in files
        for path in files:
            raw = path.read_bytes()
            assert [s for s in secrets if s.encode() in raw] == [], path
