"""TOTP enrolment from the UI in real headless Chromium against a real platform: a user opens
their account page from the header, sets up two-factor authentication (a wrong code first, then
the right one from ``pyotp``), is logged out by it, logs in again through the TOTP step, finds
MFA on, and logs out.
Screenshots go to the test's artifacts dir (see conftest); the ``ui`` fixture also fails the
test when a page asks another host for anything or breaks its Content-Security-Policy."""

from __future__ import annotations

import re
import time

import pyotp

from tests.browser.conftest import UiSession


def test_a_user_enrols_mfa_from_the_account_page_and_logs_in_with_a_code(ui: UiSession) -> None:
    page = ui.page
    username, password = ui.platform.create_user("developer")
    ui.login(username=username, password=password)
    page.click("#account-link")
    page.wait_for_url(re.compile(r"/ui/account$"))
    page.wait_for_selector("#account-mfa[data-mfa=off]")
    assert page.inner_text("#account-username") == username
    ui.shot("01-account-mfa-off")

    page.click("#mfa-start-submit")
    page.wait_for_selector("#mfa-secret")
    shown = page.inner_text("#mfa-secret")
    assert re.fullmatch(r"[A-Z2-7]{4}( [A-Z2-7]{4})+", shown), shown
    secret = shown.replace(" ", "")
    assert "/ui/account/mfa" in page.url and secret not in page.url
    page.click("#mfa-secret-card summary")
    uri = page.inner_text("#mfa-uri")
    assert uri.startswith("otpauth://totp/") and f"secret={secret}" in uri
    ui.shot("02-enrolment")

    totp = pyotp.TOTP(secret)
    now = int(time.time())
    valid = {totp.at(now + d) for d in (-60, -30, 0, 30, 60)}
    wrong = next(c for c in (f"{d}" * 6 for d in range(10)) if c not in valid)
    page.fill("#mfa-confirm input[name=code]", wrong)
    page.click("#mfa-confirm-submit")
    page.wait_for_selector("#mfa-error")
    assert page.inner_text("#mfa-secret").replace(" ", "") == secret  # still there: try again
    ui.shot("03-enrolment-wrong-code")

    page.fill("#mfa-confirm input[name=code]", totp.now())
    page.click("#mfa-confirm-submit")
    page.wait_for_selector("#mfa-done")
    assert page.query_selector("#logout") is None  # the enrolling login is over
    ui.shot("04-enrolled")

    page.click("#mfa-done-login")
    page.wait_for_url(re.compile(r"/ui/login$"))
    ui.login(username=username, password=password, code=totp.at(int(time.time()) + 30))
    page.wait_for_selector("h1:has-text('Dashboard')")
    page.click("#account-link")
    page.wait_for_selector("#account-mfa[data-mfa=on]")
    assert page.query_selector("#mfa-start") is None
    ui.shot("05-account-mfa-on")

    page.click("#logout")
    page.wait_for_url(re.compile(r"/ui/login$"))
