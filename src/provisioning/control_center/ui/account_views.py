"""The user's own account (``/ui/account``): name, roles, whether two-factor authentication
(TOTP) is on, and turning it on.

Enrolment runs in-process on the control center's
:class:`~provisioning.control_center.service.IdentityService`, exactly as ``POST
/auth/mfa/enroll`` and ``POST /auth/mfa/confirm`` call it, with the session's identity as the
actor (the service writes the audit records and refuses API keys). The new secret is shown only
in the answer to the POST that created it (and again next to a wrong code, to the same user):
never in a URL, a log or a page one can reload.

A user whose role requires MFA (``control_center.mfa_required_roles``) and who has none gets
tokens with ``enrol_mfa``: :meth:`WebUI.require` sends every other page here until they enrol.
Once the code is confirmed the login that enrolled is ended and the user logs in again with
password and code, so the new session is MFA-verified (``mfa: true``, no ``enrol_mfa``); the
session that enrolled was not (its login had no second factor) and is not upgraded in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from provisioning.control_center.routes import actor_of
from provisioning.control_center.ui.sessions import SESSION_COOKIE, UiSession, clear_cookie
from provisioning.control_center.ui.views import read_form
from provisioning.core.errors import InvalidState, ValidationError

if TYPE_CHECKING:
    from provisioning.control_center.ui.app import WebUI

__all__ = ["build_account_router", "grouped"]


def grouped(secret: str, size: int = 4) -> str:
    """``ABCD EFGH …``: a base32 secret in groups, easier to read and type."""
    return " ".join(secret[i : i + size] for i in range(0, len(secret), size))


def build_account_router(ui: WebUI) -> APIRouter:
    r = APIRouter()
    prefix = "/ui"

    async def account_page(
        request: Request, session: UiSession, *, status: int = 200, error: str = ""
    ) -> Response:
        who = session.identity
        user = await ui.identity.get_user(who.subject)
        return ui.page(
            request,
            "account/account.html",
            session,
            status=status,
            title="Your account",
            active="account",
            user=user,
            required=who.enrol_mfa,
            error=error,
        )

    def enrol_page(
        request: Request,
        session: UiSession,
        pending: dict[str, str],
        *,
        status: int = 200,
        error: str = "",
    ) -> Response:
        return ui.page(
            request,
            "account/mfa.html",
            session,
            status=status,
            title="Set up two-factor authentication",
            active="account",
            secret=grouped(pending["secret"]),
            uri=pending["uri"],
            required=session.identity.enrol_mfa,
            error=error,
        )

    @r.get("/account")
    async def account(request: Request) -> Response:
        session = await ui.require(request, enrolling=True)
        return await account_page(request, session)

    @r.post("/account/mfa")
    async def mfa_enroll(request: Request) -> Response:
        session = await ui.require(request, enrolling=True)
        who = session.identity
        try:
            pending = await ui.identity.mfa_enroll(who, actor_of(request, who))
        except InvalidState as exc:  # already on
            return await account_page(request, session, status=409, error=exc.message)
        return enrol_page(request, session, pending)

    @r.post("/account/mfa/confirm")
    async def mfa_confirm(request: Request) -> Response:
        session = await ui.require(request, enrolling=True)
        who = session.identity
        form = await read_form(request)
        code = form.get("code", "").strip()[:16]
        pending = ui.identity.mfa_pending(who)
        if pending is None:  # never started, already confirmed, or the service restarted
            return await account_page(
                request,
                session,
                status=409,
                error="No set-up is pending: start setting up two-factor authentication again.",
            )
        try:
            await ui.identity.mfa_confirm(who, code, actor_of(request, who))
        except ValidationError:
            return enrol_page(
                request,
                session,
                pending,
                status=422,
                error="That code is not valid. Check your authenticator app and try again.",
            )
        except InvalidState as exc:  # confirmed meanwhile (another tab)
            return await account_page(request, session, status=409, error=exc.message)
        # The login that enrolled had no second factor: end it, the next one will have.
        await ui.sessions.logout(request, session)
        response = enrolled_page(request, who.username)
        clear_cookie(response, SESSION_COOKIE)
        return response

    def enrolled_page(request: Request, username: str) -> Response:
        return ui.page(
            request,
            "account/mfa_done.html",
            None,
            title="Two-factor authentication is on",
            username=username,
            active="",
        )

    @r.get("/account/mfa")
    @r.get("/account/mfa/confirm")
    async def mfa_get(request: Request) -> Response:
        """The enrolment page exists only as the answer to its POST: a reload or a bookmark
        comes back to the account page."""
        await ui.require(request, enrolling=True)
        return RedirectResponse(f"{prefix}/account", status_code=303)

    return r
