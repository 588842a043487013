"""Sessions of the control center: tokens, refresh rotation, logout, timeouts, revocation.

Every test runs the embedded platform (control center + orchestrator sharing one store and one
identity, as `prvng platform start` does) on SQLite and on PostgreSQL, and talks HTTP to both
apps in-process. Time is moved by ageing a login's refresh-token rows in the database (every
timestamp of the family shifted back), never by sleeping; only the key-rotation overlap is
waited out, polling with a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from provisioning.control_center.app import ControlCenterService
from provisioning.control_center.identity import hash_secret
from provisioning.control_center.tables import refresh_tokens
from provisioning.core.settings import load_settings
from provisioning.core.signing import KeyRing
from provisioning.orchestrator.app import OrchestratorService
from provisioning.platform.embedded import build_services
from tests.conftest import free_port

ADMIN_PASSWORD = "admin passphrase for sessions"
DEV_PASSWORD = "developer passphrase 1"


@dataclass
class Platform:
    cc: ControlCenterService
    orchestrator: OrchestratorService
    http: httpx.AsyncClient  # the control center
    orch: httpx.AsyncClient  # the orchestrator

    async def login(self, username: str, password: str) -> dict[str, Any]:
        resp = await self.http.post(
            "/auth/login", json={"username": username, "password": password}
        )
        assert resp.status_code == 200, resp.text
        return dict(resp.json()["data"])

    async def refresh(self, refresh_token: str) -> httpx.Response:
        return await self.http.post("/auth/refresh", json={"refresh_token": refresh_token})

    async def create_user(self, admin: dict[str, Any], username: str, role: str) -> str:
        resp = await self.http.post(
            "/users",
            headers=bearer(admin),
            json={"username": username, "password": DEV_PASSWORD, "roles": [role]},
        )
        assert resp.status_code == 201, resp.text
        return str(resp.json()["data"]["id"])

    async def works(self, headers: dict[str, str]) -> tuple[int, int]:
        """Status of the same credentials on the control center and on the orchestrator."""
        who = await self.http.get("/auth/whoami", headers=headers)
        wfs = await self.orch.get("/workflows", headers=headers)
        return who.status_code, wfs.status_code


def bearer(tokens: dict[str, Any] | str) -> dict[str, str]:
    token = tokens if isinstance(tokens, str) else tokens["access_token"]
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def make_platform(tmp_path: Path, state_url: str) -> AsyncIterator[Callable[..., Any]]:
    """``await make_platform(**control_center_settings)``: the embedded platform, started."""
    async with AsyncExitStack() as stack:

        async def factory(**control_center: Any) -> Platform:
            settings = load_settings(
                home=tmp_path / "home",
                env={},
                overrides={
                    "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
                    "orchestrator": {"poll_interval_s": 0.05, "port": free_port()},
                    "control_center": {
                        "admin_password": ADMIN_PASSWORD,
                        "port": free_port(),
                        **control_center,
                    },
                },
            )
            cc, services = build_services(settings)
            for svc in services:
                await svc.start()
            orchestrator = services[1]
            assert isinstance(orchestrator, OrchestratorService)
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
            return Platform(cc, orchestrator, http, orch)

        yield factory


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


async def family_of(p: Platform, refresh_token: str) -> str:
    digest = hash_secret(refresh_token)
    return str(
        await p.cc.db.run_read(
            lambda c: c.execute(
                select(refresh_tokens.c.family_id).where(refresh_tokens.c.token_hash == digest)
            ).scalar_one()
        )
    )


async def age_login(p: Platform, family_id: str, seconds: float) -> None:
    """Pretend ``seconds`` went by for one login: every timestamp of its family moves back."""
    delta = timedelta(seconds=seconds)
    columns = ("issued_at", "family_started_at", "expires_at", "used_at", "revoked_at")

    def body(conn: Connection) -> None:
        rows = conn.execute(
            select(refresh_tokens).where(refresh_tokens.c.family_id == family_id)
        ).all()
        assert rows
        for row in rows:
            values = {}
            for name in columns:
                stamp = _utc(getattr(row, name))
                values[name] = None if stamp is None else stamp - delta
            conn.execute(
                update(refresh_tokens).where(refresh_tokens.c.id == row.id).values(**values)
            )

    await p.cc.db.run_write(body)


async def audit(p: Platform, admin: dict[str, Any], **filters: str) -> list[dict[str, Any]]:
    resp = await p.http.get("/audit", headers=bearer(admin), params={**filters, "limit": 1000})
    assert resp.status_code == 200, resp.text
    return list(resp.json()["data"])


def seconds_until(stamp: str) -> float:
    return (datetime.fromisoformat(stamp) - datetime.now(UTC)).total_seconds()


# ---------------------------------------------------------------------- login and refresh


async def test_login_returns_a_signed_access_token_and_a_refresh_token(make_platform: Any) -> None:
    p = await make_platform(access_ttl_s=300)
    tokens = await p.login("admin", ADMIN_PASSWORD)

    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 300
    assert tokens["user"]["username"] == "admin"
    header = jwt.get_unverified_header(tokens["access_token"])
    assert header["alg"] == "EdDSA"
    assert header["kid"] == p.cc.ring.current.kid
    claims = await p.cc.verifier.verify(tokens["access_token"])
    assert claims["sub"] == tokens["user"]["id"]
    assert claims["aud"] == "prvng"
    assert 299 <= claims["exp"] - time.time() <= 301
    assert claims["sid"] == await family_of(p, tokens["refresh_token"])
    assert len(tokens["refresh_token"]) >= 40  # 256 random bits, base64url
    assert tokens["refresh_token"] != tokens["access_token"]
    assert await p.works(bearer(tokens)) == (200, 200)


async def test_a_refresh_token_works_once_and_is_replaced_by_the_next_of_its_login(
    make_platform: Any,
) -> None:
    p = await make_platform()
    first = await p.login("admin", ADMIN_PASSWORD)

    resp = await p.refresh(first["refresh_token"])
    assert resp.status_code == 200, resp.text
    second = resp.json()["data"]

    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert await family_of(p, second["refresh_token"]) == await family_of(p, first["refresh_token"])
    assert await p.works(bearer(second)) == (200, 200)
    again = await p.refresh(first["refresh_token"])
    assert again.status_code == 401
    assert again.headers["www-authenticate"] == "Bearer"


async def test_reusing_a_rotated_refresh_token_revokes_its_whole_family(
    make_platform: Any,
) -> None:
    p = await make_platform()
    admin = await p.login("admin", ADMIN_PASSWORD)  # another login, which must survive
    stolen = await p.login("admin", ADMIN_PASSWORD)
    family = await family_of(p, stolen["refresh_token"])
    newest = (await p.refresh(stolen["refresh_token"])).json()["data"]
    assert await p.works(bearer(newest)) == (200, 200)

    reuse = await p.refresh(stolen["refresh_token"])

    assert reuse.status_code == 401
    assert "revoked" in reuse.json()["error"]["message"]
    assert (await p.refresh(newest["refresh_token"])).status_code == 401
    assert await p.works(bearer(newest)) == (401, 401)
    assert await p.works(bearer(stolen)) == (401, 401)
    records = await audit(p, admin, action="auth:refresh", result="denied")
    assert [r["details"] for r in records] == [
        {"reason": "reuse: family revoked", "session": family}
    ]
    assert records[0]["object_id"] == admin["user"]["id"]
    # Another login of the same user is not that family.
    assert await p.works(bearer(admin)) == (200, 200)
    assert (await p.refresh(admin["refresh_token"])).status_code == 200


async def test_logout_ends_the_refresh_family_and_the_access_token_of_that_login(
    make_platform: Any,
) -> None:
    p = await make_platform()
    other = await p.login("admin", ADMIN_PASSWORD)
    session = await p.login("admin", ADMIN_PASSWORD)
    rotated = (await p.refresh(session["refresh_token"])).json()["data"]

    resp = await p.http.post(
        "/auth/logout", headers=bearer(rotated), json={"refresh_token": rotated["refresh_token"]}
    )

    assert resp.status_code == 200, resp.text
    assert (await p.refresh(rotated["refresh_token"])).status_code == 401
    assert await p.works(bearer(rotated)) == (401, 401)
    assert await p.works(bearer(session)) == (401, 401)  # an earlier token of the same login
    assert await p.works(bearer(other)) == (200, 200)
    assert (await p.refresh(other["refresh_token"])).status_code == 200
    records = await audit(p, other, action="auth:logout")
    assert [(r["result"], r["object_id"]) for r in records] == [("success", other["user"]["id"])]


async def test_logout_with_the_access_token_alone_ends_its_login(make_platform: Any) -> None:
    p = await make_platform()
    session = await p.login("admin", ADMIN_PASSWORD)

    assert (await p.http.post("/auth/logout", headers=bearer(session))).status_code == 200

    assert (await p.refresh(session["refresh_token"])).status_code == 401
    assert await p.works(bearer(session)) == (401, 401)


# ---------------------------------------------------------------------- timeouts


async def test_a_login_left_unused_for_the_idle_timeout_expires(make_platform: Any) -> None:
    p = await make_platform(refresh_idle_s=60, refresh_absolute_s=3600)
    busy = await p.login("admin", ADMIN_PASSWORD)
    idle = await p.login("admin", ADMIN_PASSWORD)
    assert 55 < seconds_until(busy["refresh_expires_at"]) <= 60

    await age_login(p, await family_of(p, busy["refresh_token"]), 50)
    await age_login(p, await family_of(p, idle["refresh_token"]), 61)

    kept = await p.refresh(busy["refresh_token"])
    assert kept.status_code == 200, kept.text
    # Each use restarts the idle clock.
    assert 55 < seconds_until(kept.json()["data"]["refresh_expires_at"]) <= 60
    expired = await p.refresh(idle["refresh_token"])
    assert expired.status_code == 401
    assert "expired" in expired.json()["error"]["message"]


async def test_a_login_ends_at_the_absolute_timeout_however_often_it_is_used(
    make_platform: Any,
) -> None:
    p = await make_platform(refresh_idle_s=60, refresh_absolute_s=150)
    tokens = await p.login("admin", ADMIN_PASSWORD)
    family = await family_of(p, tokens["refresh_token"])

    for _ in range(2):  # used every 50 s: never idle
        await age_login(p, family, 50)
        resp = await p.refresh(tokens["refresh_token"])
        assert resp.status_code == 200, resp.text
        tokens = resp.json()["data"]
    # 100 s into the login: the next token may live only until 150 s, not 160 s.
    assert 45 < seconds_until(tokens["refresh_expires_at"]) <= 50

    await age_login(p, family, 50)
    resp = await p.refresh(tokens["refresh_token"])

    assert resp.status_code == 401
    assert "expired" in resp.json()["error"]["message"]


# ---------------------------------------------------------------------- revocation by the admin


async def test_tokens_issued_before_a_password_change_are_refused_after_it(
    make_platform: Any,
) -> None:
    p = await make_platform()
    admin = await p.login("admin", ADMIN_PASSWORD)
    dev_id = await p.create_user(admin, "dev", "developer")
    before = await p.login("dev", DEV_PASSWORD)
    assert await p.works(bearer(before)) == (200, 200)

    resp = await p.http.patch(
        f"/users/{dev_id}", headers=bearer(admin), json={"password": "a brand new passphrase"}
    )

    assert resp.status_code == 200, resp.text
    assert await p.works(bearer(before)) == (401, 401)
    assert (await p.refresh(before["refresh_token"])).status_code == 401
    old = await p.http.post("/auth/login", json={"username": "dev", "password": DEV_PASSWORD})
    assert old.status_code == 401
    # A login right after the change (the same second) works at once.
    after = await p.login("dev", "a brand new passphrase")
    assert await p.works(bearer(after)) == (200, 200)
    assert await p.works(bearer(admin)) == (200, 200)


async def test_ending_a_users_sessions_logs_out_every_login_but_not_others(
    make_platform: Any,
) -> None:
    p = await make_platform()
    admin = await p.login("admin", ADMIN_PASSWORD)
    dev_id = await p.create_user(admin, "dev", "developer")
    logins = [await p.login("dev", DEV_PASSWORD) for _ in range(2)]

    resp = await p.http.patch(
        f"/users/{dev_id}", headers=bearer(admin), json={"end_sessions": True}
    )

    assert resp.status_code == 200, resp.text
    for tokens in logins:
        assert await p.works(bearer(tokens)) == (401, 401)
        assert (await p.refresh(tokens["refresh_token"])).status_code == 401
    assert await p.works(bearer(await p.login("dev", DEV_PASSWORD))) == (200, 200)
    assert await p.works(bearer(admin)) == (200, 200)


async def test_a_disabled_users_tokens_and_api_keys_stop_working_on_the_next_request(
    make_platform: Any,
) -> None:
    p = await make_platform()
    admin = await p.login("admin", ADMIN_PASSWORD)
    dev_id = await p.create_user(admin, "dev", "developer")
    dev = await p.login("dev", DEV_PASSWORD)
    created = await p.http.post("/apikeys", headers=bearer(dev), json={"name": "ci"})
    assert created.status_code == 201, created.text
    key = {"X-API-Key": created.json()["data"]["key"]}
    key_as_bearer = bearer(created.json()["data"]["key"])
    dev_headers = bearer(dev)
    # Used once, so the authenticator's token and API-key caches hold them.
    assert await p.works(dev_headers) == (200, 200)
    assert await p.works(key) == (200, 200)
    assert await p.works(key_as_bearer) == (200, 200)

    resp = await p.http.patch(f"/users/{dev_id}", headers=bearer(admin), json={"disabled": True})

    assert resp.status_code == 200, resp.text
    assert await p.works(dev_headers) == (401, 401)
    assert await p.works(key) == (401, 401)
    assert await p.works(key_as_bearer) == (401, 401)
    assert (await p.refresh(dev["refresh_token"])).status_code == 401
    refused = await p.http.post("/auth/login", json={"username": "dev", "password": DEV_PASSWORD})
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "invalid username or password"
    # Enabling the user again brings the key back, not the sessions ended by the disable.
    resp = await p.http.patch(f"/users/{dev_id}", headers=bearer(admin), json={"disabled": False})
    assert resp.status_code == 200, resp.text
    assert await p.works(key) == (200, 200)
    assert await p.works(dev_headers) == (401, 401)


async def test_disabling_a_user_and_ending_their_sessions_in_one_request_works(
    make_platform: Any,
) -> None:
    p = await make_platform()
    admin = await p.login("admin", ADMIN_PASSWORD)
    dev_id = await p.create_user(admin, "dev", "developer")
    dev = await p.login("dev", DEV_PASSWORD)

    resp = await p.http.patch(
        f"/users/{dev_id}",
        headers=bearer(admin),
        json={"disabled": True, "end_sessions": True, "roles": ["viewer"]},
    )

    assert resp.status_code == 200, resp.text
    assert resp.json()["data"]["disabled"] is True
    assert resp.json()["data"]["roles"] == ["viewer"]
    assert await p.works(bearer(dev)) == (401, 401)


# ---------------------------------------------------------------------- access-token lifetime


async def test_an_expired_access_token_is_refused(make_platform: Any) -> None:
    p = await make_platform()
    tokens = await p.login("admin", ADMIN_PASSWORD)
    claims = await p.cc.verifier.verify(tokens["access_token"])
    mint = {k: claims[k] for k in ("sub", "name", "roles", "mfa", "sid")}
    cc = p.cc.settings.control_center

    def signed_at(when: float, ttl_s: float) -> str:
        # The platform's own signing key, with a clock set to ``when``.
        ring = KeyRing(p.cc.ring.directory, clock=lambda: when)
        return ring.sign(mint, audience=cc.audience, ttl_s=ttl_s, issuer=cc.issuer)

    fresh = signed_at(time.time(), 60)
    expired = signed_at(time.time() - 120, 60)  # expired 60 s ago, beyond the 30 s leeway

    assert await p.works(bearer(fresh)) == (200, 200)
    assert await p.works(bearer(expired)) == (401, 401)
    resp = await p.http.get("/auth/whoami", headers=bearer(expired))
    assert resp.json()["error"]["details"] == {"reason": "expired"}


async def wait_until_key_leaves_the_jwks(p: Platform, kid: str) -> None:
    deadline = time.monotonic() + 20
    while kid in [k["kid"] for k in (await p.http.get("/.well-known/jwks.json")).json()["keys"]]:
        assert time.monotonic() < deadline, "the old key is still published after its overlap"
        await asyncio.sleep(0.1)


async def test_a_token_of_a_rotated_out_key_is_refused_once_the_overlap_ends(
    make_platform: Any,
) -> None:
    p = await make_platform(key_overlap_s=2)
    used = await p.login("admin", ADMIN_PASSWORD)
    unused = await p.login("admin", ADMIN_PASSWORD)
    old_kid = jwt.get_unverified_header(unused["access_token"])["kid"]

    resp = await p.http.post("/keys/rotate", headers=bearer(used))

    assert resp.status_code == 200, resp.text
    new_kid = resp.json()["data"]["kid"]
    assert new_kid != old_kid
    assert await p.works(bearer(used)) == (200, 200)  # inside the overlap
    new = await p.login("admin", ADMIN_PASSWORD)
    assert jwt.get_unverified_header(new["access_token"])["kid"] == new_kid
    await wait_until_key_leaves_the_jwks(p, old_kid)
    assert await p.works(bearer(unused)) == (401, 401)
    resp = await p.http.get("/auth/whoami", headers=bearer(unused))
    assert resp.json()["error"]["details"] == {"reason": "unknown_kid"}
    assert await p.works(bearer(new)) == (200, 200)


async def test_a_token_used_before_a_rotation_is_refused_once_the_overlap_ends(
    make_platform: Any,
) -> None:
    p = await make_platform(key_overlap_s=1)
    used = await p.login("admin", ADMIN_PASSWORD)
    old_kid = jwt.get_unverified_header(used["access_token"])["kid"]
    assert await p.works(bearer(used)) == (200, 200)

    assert (await p.http.post("/keys/rotate", headers=bearer(used))).status_code == 200
    await wait_until_key_leaves_the_jwks(p, old_kid)

    assert await p.works(bearer(used)) == (401, 401)
