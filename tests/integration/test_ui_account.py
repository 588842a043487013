"""The web UI's account page and TOTP enrolment, in-process against the embedded platform (the
fixtures of ``test_ui_security``; SQLite and PostgreSQL).

A user turns MFA on from the UI (the secret parsed from the page, the code from ``pyotp``), a
wrong code is refused in place with the pending secret kept, the enrolling login is ended and
the next login asks for the code and is MFA-verified; a user of a role in
``control_center.mfa_required_roles`` is sent to the account page after login and from every
other page until enrolled, and works normally once logged in again; the enrolment routes refuse
a missing, foreign or cross-site CSRF token and change nothing; the secret reaches no log, no
audit record, no URL and no header.
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pyotp
from starlette.requests import Request

from provisioning.control_center.ui.sessions import SESSION_COOKIE
from tests.integration.test_ui_security import (
    SLOW,
    USER_PASSWORD,
    Browser,
    Platform,
    b_request,
    form_token,
    platform,
    set_cookie_headers,
    start_platform,
    state_changing_routes,
    works,
)

__all__ = ["platform"]

ENROL_ROUTES = {("POST", "/ui/account/mfa"), ("POST", "/ui/account/mfa/confirm")}


def secret_of(page: httpx.Response) -> str:
    """The TOTP secret the enrolment page shows (in groups of four)."""
    found = re.search(r'id="mfa-secret">([A-Z2-7 ]+)<', page.text)
    assert found, page.text
    return found.group(1).replace(" ", "")


def uri_of(page: httpx.Response) -> str:
    found = re.search(r'id="mfa-uri">([^<]+)<', page.text)
    assert found, page.text
    return html.unescape(found.group(1))


def wrong_code(totp: pyotp.TOTP) -> str:
    now = int(time.time())
    valid = {totp.at(now + d) for d in (-60, -30, 0, 30, 60)}
    return next(c for c in (f"{d}" * 6 for d in range(10)) if c not in valid)


async def mfa_enabled(p: Platform, username: str) -> bool:
    resp = await p.api.get(f"/users/{username}", headers=p.admin)
    assert resp.status_code == 200, resp.text
    return bool(resp.json()["data"]["mfa_enabled"])


async def enrol_records(p: Platform, user_id: str) -> list[dict[str, Any]]:
    resp = await p.api.get(
        "/audit", headers=p.admin, params={"action": "auth:mfa_enroll", "object_id": user_id}
    )
    assert resp.status_code == 200, resp.text
    return list(resp.json()["data"])


async def login_with_code(p: Platform, username: str, code: str) -> Browser:
    """A new browser through both login steps (the password, then the TOTP code)."""
    b = await p.browser("")
    page = await b.get("/ui/login")
    resp = await b.post(
        "/ui/login",
        {"username": username, "password": USER_PASSWORD, "csrf_token": form_token(page)},
    )
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/login/mfa", resp.text
    assert b.session is None
    page = await b.get("/ui/login/mfa")
    resp = await b.post("/ui/login/mfa", {"code": code, "csrf_token": form_token(page)})
    assert resp.status_code == 303, resp.text
    assert b.session
    return b


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(f"{record.getMessage()} {record.__dict__!r}")


@contextmanager
def every_log_record() -> Iterator[_Records]:
    """Every log record of the process, whatever the loggers' levels and propagation."""
    handler = _Records()
    loggers = [logging.getLogger(), logging.getLogger("provisioning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


# ---------------------------------------------------------------------- a user turns MFA on


async def test_a_user_turns_mfa_on_and_the_next_login_asks_for_the_code(
    platform: Platform,
) -> None:
    p = platform
    dora_id = await p.user("dora", "developer")
    b = await p.browser("dora", USER_PASSWORD)
    home = await b.get("/ui/")
    assert 'id="account-link" href="/ui/account"' in home.text  # the header links the page
    page = await b.get("/ui/account")
    assert page.status_code == 200
    assert 'id="account-username">dora<' in page.text and ">developer<" in page.text
    assert 'data-mfa="off"' in page.text and 'id="mfa-start"' in page.text
    assert 'id="mfa-required"' not in page.text  # the developer role does not require it

    with every_log_record() as logs:
        started = await b.post("/ui/account/mfa", {"csrf_token": b.csrf})
        assert started.status_code == 200, started.text
        assert started.headers["cache-control"] == "no-store"
        secret = secret_of(started)
        totp = pyotp.TOTP(secret)
        uri = uri_of(started)
        assert uri.startswith("otpauth://totp/") and f"secret={secret}" in uri
        assert "dora" in uri
        assert 'action="/ui/account/mfa/confirm"' in started.text
        assert form_token(started) == b.csrf

        # A wrong code: refused in place, the same secret still shown, MFA still off.
        wrong = await b.post(
            "/ui/account/mfa/confirm", {"code": wrong_code(totp), "csrf_token": b.csrf}
        )
        assert wrong.status_code == 422
        assert 'id="mfa-error"' in wrong.text and "not valid" in wrong.text
        assert secret_of(wrong) == secret and 'name="code"' in wrong.text
        assert not await mfa_enabled(p, "dora")
        assert await works(b)

        # The right code: MFA on, this login ended, a confirmation with a way back in.
        old_cookie = b.session
        done = await b.post("/ui/account/mfa/confirm", {"code": totp.now(), "csrf_token": b.csrf})
        assert done.status_code == 200, done.text
        assert 'id="mfa-done"' in done.text and 'href="/ui/login"' in done.text
        [cleared] = set_cookie_headers(done, SESSION_COOKIE)
        assert "Max-Age=0" in cleared
        assert b.session is None
    assert await mfa_enabled(p, "dora")

    # The secret went nowhere else: no log record, no header, no audit record.
    assert not [line for line in logs.seen if secret in line]
    for resp in (started, wrong, done):
        assert secret not in json.dumps(dict(resp.headers)) and secret not in str(resp.url)
    records = await enrol_records(p, dora_id)
    assert len(records) == 2 and {r["actor"] for r in records} == {"dora"}
    assert secret not in json.dumps(records, default=str)

    # The old cookie opens nothing; the next login asks for a code and is MFA-verified.
    stale = Request(
        {"type": "http", "headers": [(b"cookie", f"{SESSION_COOKIE}={old_cookie}".encode())]}
    )
    assert await p.cc.ui.sessions.resolve(stale) is None
    later = totp.at(int(time.time()) + 30)  # the confirmation used the current step
    again = await login_with_code(p, "dora", later)
    who = await p.cc.ui.sessions.resolve(b_request(again))
    assert who is not None and who.identity.mfa and not who.identity.enrol_mfa
    page = await again.get("/ui/account")
    assert 'data-mfa="on"' in page.text and 'id="mfa-start"' not in page.text
    # Starting again is refused: MFA is already on.
    resp = await again.post("/ui/account/mfa", {"csrf_token": again.csrf})
    assert resp.status_code == 409 and "already enabled" in resp.text
    assert 'id="mfa-secret"' not in resp.text


async def test_the_enrolment_page_is_only_the_answer_to_its_post(platform: Platform) -> None:
    p = platform
    await p.user("erin", "viewer")
    b = await p.browser("erin", USER_PASSWORD)
    for path in ("/ui/account/mfa", "/ui/account/mfa/confirm"):
        resp = await b.get(path)
        assert resp.status_code == 303 and resp.headers["location"] == "/ui/account"
    # A confirmation without an enrolment started: told to start again, nothing changes.
    resp = await b.post("/ui/account/mfa/confirm", {"code": "123456", "csrf_token": b.csrf})
    assert resp.status_code == 409 and 'id="account-error"' in resp.text
    assert not await mfa_enabled(p, "erin")
    # Without a session: the login page, nothing else.
    stranger = await p.browser("")
    resp = await stranger.get("/ui/account")
    assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/login")


# ---------------------------------------------------------------------- a role that requires it


async def test_a_role_that_requires_mfa_is_sent_to_enrolment_until_it_is_done(
    tmp_path: Path, state_url: str
) -> None:
    async with start_platform(tmp_path, state_url, mfa_required_roles=["operator"]) as p:
        olga_id = await p.user("olga", "operator")
        b = await p.browser("olga", USER_PASSWORD)
        # After login (to /ui/) and from every other page: the account page.
        for path in ("/ui/", "/ui/workflows", "/ui/users/keys", "/ui/ops", "/ui/audit"):
            resp = await b.get(path)
            assert resp.status_code == 303, (path, resp.status_code)
            assert resp.headers["location"] == "/ui/account", path
        resp = await b.get("/ui/dashboard/live", **{"HX-Request": "true"})
        assert resp.status_code == 204 and resp.headers["hx-redirect"] == "/ui/account"
        assert (await b.get("/ui/session")).status_code == 204  # the session itself lives
        page = await b.get("/ui/account")
        assert page.status_code == 200
        assert 'id="mfa-required"' in page.text
        assert "Your role requires two-factor authentication" in page.text
        assert 'data-nav="workflows"' not in page.text  # nothing else is offered
        # A state-changing request goes to enrolment too, and changes nothing.
        resp = await b.post(
            "/ui/workflows/new",
            {"format": "json", "text": json.dumps(SLOW), "intent": "submit", "csrf_token": b.csrf},
        )
        assert resp.status_code == 303 and resp.headers["location"] == "/ui/account"
        assert (await p.orch.get("/workflows", headers=p.admin)).json()["data"] == []
        # An admin (not a role that requires it) is not bothered.
        admin = await p.browser()
        assert (await admin.get("/ui/")).status_code == 200

        started = await b.post("/ui/account/mfa", {"csrf_token": b.csrf})
        assert started.status_code == 200 and 'id="mfa-required"' in started.text
        totp = pyotp.TOTP(secret_of(started))
        done = await b.post("/ui/account/mfa/confirm", {"code": totp.now(), "csrf_token": b.csrf})
        assert done.status_code == 200 and 'id="mfa-done"' in done.text
        assert b.session is None
        assert len(await enrol_records(p, olga_id)) == 2

        again = await login_with_code(p, "olga", totp.at(int(time.time()) + 30))
        who = await p.cc.ui.sessions.resolve(b_request(again))
        assert who is not None and who.identity.mfa and not who.identity.enrol_mfa
        for path in ("/ui/", "/ui/workflows", "/ui/ops", "/ui/audit"):
            resp = await again.get(path)
            assert resp.status_code == 200, (path, resp.status_code)
            assert 'id="mfa-required-banner"' not in resp.text
        page = await again.get("/ui/account")
        assert 'data-mfa="on"' in page.text and 'id="mfa-required"' not in page.text


# ---------------------------------------------------------------------- CSRF


async def test_the_enrolment_routes_refuse_a_missing_foreign_or_cross_site_token(
    platform: Platform,
) -> None:
    p = platform
    assert ENROL_ROUTES <= state_changing_routes(p.cc)
    victim_id = await p.user("victor", "operator")
    await p.user("mallory", "operator")
    victim = await p.browser("victor", USER_PASSWORD)
    attacker = await p.browser("mallory", USER_PASSWORD)
    stranger = await p.browser("")
    login_token = form_token(await stranger.get("/ui/login"))

    async def refused(path: str, form: dict[str, str]) -> None:
        for b, token, extra in (
            (victim, None, {}),  # no token at all
            (victim, attacker.csrf, {}),  # another session's token
            (victim, victim.csrf, {"Origin": "https://evil.test"}),
            (victim, victim.csrf, {"Sec-Fetch-Site": "cross-site"}),
            (victim, victim.csrf, {"Sec-Fetch-Site": "same-site"}),
            (victim, victim.csrf, {"Origin": "null"}),
            (stranger, None, {}),
            (stranger, victim.csrf, {}),  # a session's token is not a login token
            (stranger, login_token, {}),  # nor is a login token a session's
        ):
            data = dict(form) if token is None else {**form, "csrf_token": token}
            resp = await b.post(path, data, **extra)
            assert resp.status_code == 403, (path, token is None, extra, resp.status_code)
            assert "set-cookie" not in resp.headers and "mfa-secret" not in resp.text
        resp = await victim.post(path, form, **{"X-CSRF-Token": attacker.csrf})
        assert resp.status_code == 403

    # Starting: nothing started (no audit record), nothing shown.
    await refused("/ui/account/mfa", {})
    assert await enrol_records(p, victim_id) == []
    # Confirming an enrolment the victim started, with the right code: nothing confirmed.
    started = await victim.post("/ui/account/mfa", {"csrf_token": victim.csrf})
    assert started.status_code == 200
    totp = pyotp.TOTP(secret_of(started))
    await refused("/ui/account/mfa/confirm", {"code": totp.now()})
    assert not await mfa_enabled(p, "victor")
    assert len(await enrol_records(p, victim_id)) == 1
    assert await works(victim) and stranger.session is None
    # The same confirmation with the victim's own token, from the same site, works.
    done = await victim.post(
        "/ui/account/mfa/confirm", {"code": totp.now(), "csrf_token": victim.csrf}
    )
    assert done.status_code == 200 and 'id="mfa-done"' in done.text
    assert await mfa_enabled(p, "victor")
