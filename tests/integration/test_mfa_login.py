"""TOTP end to end: enrolment, a code at login, replay refused, roles that demand MFA."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pyotp
import pytest

from provisioning.control_center.app import ControlCenterService
from provisioning.core.settings import load_settings

ADMIN_PW = "mfa-admin-password-1"


@pytest.fixture
async def cc(tmp_path: Path, state_url: str) -> AsyncIterator[ControlCenterService]:
    settings = load_settings(
        home=tmp_path,
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
            "control_center": {"admin_password": ADMIN_PW, "mfa_required_roles": ["operator"]},
        },
    )
    svc = ControlCenterService(settings)
    await svc.start()
    yield svc
    await svc.stop()


def _client(svc: ControlCenterService) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://cc")


async def _login(
    c: httpx.AsyncClient, user: str, pw: str, code: str | None = None
) -> httpx.Response:
    return await c.post("/auth/login", json={"username": user, "password": pw, "mfa_code": code})


async def test_an_enrolled_user_needs_a_fresh_code_and_a_code_cannot_be_replayed(
    cc: ControlCenterService,
) -> None:
    async with _client(cc) as c:
        token = (await _login(c, "admin", ADMIN_PW)).json()["data"]["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        secret = (await c.post("/auth/mfa/enroll", headers=auth)).json()["data"]["secret"]
        totp = pyotp.TOTP(secret)
        confirmed = await c.post("/auth/mfa/confirm", headers=auth, json={"code": totp.now()})
        assert confirmed.status_code == 200, confirmed.text

        missing = await _login(c, "admin", ADMIN_PW)
        assert missing.status_code == 401
        assert missing.json()["error"]["details"]["mfa_required"] is True
        wrong = await _login(c, "admin", ADMIN_PW, "000000" if totp.now() != "000000" else "111111")
        assert wrong.status_code == 401

        # The confirmation used the current step: the same code cannot log in again.
        replay = await _login(c, "admin", ADMIN_PW, totp.now())
        assert replay.status_code == 401
        later = totp.at(int(time.time()) + 30)
        ok = await _login(c, "admin", ADMIN_PW, later)
        assert ok.status_code == 200, ok.text
        who = await c.get(
            "/auth/whoami", headers={"Authorization": f"Bearer {ok.json()['data']['access_token']}"}
        )
        assert who.json()["data"]["mfa"] is True


async def test_a_role_that_demands_mfa_can_only_enrol_until_it_has(
    cc: ControlCenterService,
) -> None:
    async with _client(cc) as c:
        admin = (await _login(c, "admin", ADMIN_PW)).json()["data"]["access_token"]
        created = await c.post(
            "/users",
            headers={"Authorization": f"Bearer {admin}"},
            json={"username": "ops1", "password": "operator-password-1", "roles": ["operator"]},
        )
        assert created.status_code == 201, created.text
        token = (await _login(c, "ops1", "operator-password-1")).json()["data"]["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        refused = await c.get("/audit", headers=auth)
        assert refused.status_code == 403
        assert refused.json()["error"]["details"]["mfa_enrolment_required"] is True
        secret = (await c.post("/auth/mfa/enroll", headers=auth)).json()["data"]["secret"]
        assert (
            await c.post("/auth/mfa/confirm", headers=auth, json={"code": pyotp.TOTP(secret).now()})
        ).status_code == 200
        later = pyotp.TOTP(secret).at(int(time.time()) + 30)
        fresh = (await _login(c, "ops1", "operator-password-1", later)).json()["data"][
            "access_token"
        ]
        allowed = await c.get("/audit", headers={"Authorization": f"Bearer {fresh}"})
        assert allowed.status_code == 200, allowed.text


async def test_enrolling_ends_the_other_logins_made_without_mfa(cc: ControlCenterService) -> None:
    async with _client(cc) as c:
        logins = [(await _login(c, "admin", ADMIN_PW)).json()["data"] for _ in range(3)]
        enrolling, *others = logins
        auth = {"Authorization": f"Bearer {enrolling['access_token']}"}
        secret = (await c.post("/auth/mfa/enroll", headers=auth)).json()["data"]["secret"]
        for other in others:  # still fine while enrolment waits for its code
            ok = await c.get(
                "/auth/whoami", headers={"Authorization": f"Bearer {other['access_token']}"}
            )
            assert ok.status_code == 200, ok.text
        confirmed = await c.post(
            "/auth/mfa/confirm", headers=auth, json={"code": pyotp.TOTP(secret).now()}
        )
        assert confirmed.status_code == 200, confirmed.text

        for other in others:
            gone = await c.get(
                "/auth/whoami", headers={"Authorization": f"Bearer {other['access_token']}"}
            )
            assert gone.status_code == 401, gone.text
            refreshed = await c.post(
                "/auth/refresh", json={"refresh_token": other["refresh_token"]}
            )
            assert refreshed.status_code == 401, refreshed.text
        # The login that proved the code goes on, and the record says what was ended.
        assert (await c.get("/auth/whoami", headers=auth)).status_code == 200
        records = await c.get(
            "/audit", headers=auth, params={"action": "auth:mfa_enroll", "limit": 10}
        )
        details = [r["details"] for r in records.json()["data"]]
        assert {"other_logins_ended": 2} in details, details


async def test_only_the_login_that_started_an_enrolment_can_see_or_confirm_it(
    cc: ControlCenterService,
) -> None:
    async with _client(cc) as c:
        tokens = [(await _login(c, "admin", ADMIN_PW)).json()["data"] for _ in range(2)]
        mine, other = ({"Authorization": f"Bearer {t['access_token']}"} for t in tokens)
        secret = (await c.post("/auth/mfa/enroll", headers=mine)).json()["data"]["secret"]
        code = pyotp.TOTP(secret).now()
        # Another login of the same user (a stolen password, say) cannot finish it.
        refused = await c.post("/auth/mfa/confirm", headers=other, json={"code": code})
        assert refused.status_code == 409, refused.text
        assert "same login" in refused.json()["error"]["message"]
        confirmed = await c.post("/auth/mfa/confirm", headers=mine, json={"code": code})
        assert confirmed.status_code == 200, confirmed.text


async def test_an_enrolment_left_waiting_too_long_must_be_started_again(
    cc: ControlCenterService, monkeypatch: pytest.MonkeyPatch
) -> None:
    from provisioning.control_center import service

    async with _client(cc) as c:
        token = (await _login(c, "admin", ADMIN_PW)).json()["data"]["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        secret = (await c.post("/auth/mfa/enroll", headers=auth)).json()["data"]["secret"]
        monkeypatch.setattr(service, "_MFA_PENDING_S", -1.0)  # every enrolment is too old now
        late = await c.post(
            "/auth/mfa/confirm", headers=auth, json={"code": pyotp.TOTP(secret).now()}
        )
        assert late.status_code == 409, late.text
        assert "no enrolment of this login is waiting" in late.json()["error"]["message"]
        monkeypatch.setattr(service, "_MFA_PENDING_S", 900.0)
        again = (await c.post("/auth/mfa/enroll", headers=auth)).json()["data"]["secret"]
        ok = await c.post("/auth/mfa/confirm", headers=auth, json={"code": pyotp.TOTP(again).now()})
        assert ok.status_code == 200, ok.text
