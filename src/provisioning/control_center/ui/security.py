"""What protects the web UI beyond authentication: response headers, CSRF and origin checks.

* :class:`SecurityHeadersMiddleware` puts a strict Content-Security-Policy (no inline script or
  style, nothing from another host), HSTS, ``nosniff``, ``Referrer-Policy: same-origin`` and
  ``X-Frame-Options: DENY`` on every answer of the UI; pages also get ``Cache-Control:
  no-store``.
* :class:`CsrfMiddleware` refuses, with 403 and before any handler runs, every state-changing
  request (``POST``/``PUT``/``PATCH``/``DELETE``) of the UI that comes from another site
  (``Sec-Fetch-Site`` other than ``same-origin``, or an ``Origin`` that is not the UI's own) or
  does not carry the CSRF token of its session — in the form field ``csrf_token`` or the
  ``X-CSRF-Token`` header. A session's token is an HMAC of its login (refresh family) id under
  a server secret (:class:`UiSecret`), so it is stable for the session, different for every
  other, and useless without the secret; before login, the token is bound the same way to a
  random nonce kept in the ``__Host-prvng_pre`` cookie. Tokens are compared in constant time.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from provisioning.core.logging import get_logger

__all__ = [
    "CSP",
    "SECURITY_HEADERS",
    "CsrfMiddleware",
    "SecurityHeadersMiddleware",
    "UiSecret",
    "same_origin",
]

log = get_logger("control_center.ui")

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CSP,
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CSRF_FIELD = "csrf_token"
_CSRF_HEADER = "x-csrf-token"


class UiSecret:
    """The server secret CSRF tokens are derived from: 32 random bytes in a 0600 file,
    created on first use, so tokens survive a restart of the control center."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def key(self) -> bytes:
        if self._key is None:
            with self._lock:
                if self._key is None:
                    self._key = self._load_or_create()
        return self._key

    def _load_or_create(self) -> bytes:
        with contextlib.suppress(FileNotFoundError):
            data = self.path.read_bytes()
            if len(data) >= 32:
                return data
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_bytes(32)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, self.path)  # fails if another process won the race: use theirs
        except FileExistsError:
            return self.path.read_bytes()
        finally:
            tmp.unlink()
        return key

    def token(self, purpose: str, subject: str) -> str:
        """The CSRF token for ``subject`` (a login's family id, or a pre-login nonce)."""
        mac = hmac.new(self.key(), f"{purpose}\x00{subject}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def check(self, purpose: str, subject: str, presented: str | None) -> bool:
        if not presented or not subject:
            return False
        return hmac.compare_digest(self.token(purpose, subject).encode(), presented.encode())


def same_origin(headers: Headers) -> bool:
    """False when the browser says the request comes from another site.

    ``Sec-Fetch-Site`` (sent by every current browser) must be ``same-origin``; an ``Origin``
    header must name the host the request was sent to. A request with neither (not a browser)
    is left to the CSRF token alone.
    """
    site = headers.get("sec-fetch-site")
    if site is not None and site.lower() != "same-origin":
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    return _netloc(parts.netloc, parts.scheme) == _netloc(headers.get("host", ""), parts.scheme)


def _netloc(netloc: str, scheme: str) -> str:
    netloc = netloc.lower()
    default = ":443" if scheme == "https" else ":80"
    return netloc.removesuffix(default)


def _refused(reason: str) -> HTMLResponse:
    body = (
        "<!doctype html><html lang=en><meta charset=utf-8><title>Refused</title>"
        "<h1>Request refused</h1><p>This form is stale or was sent from another site "
        f"({reason}). Reload the page and try again.</p></html>"
    )
    return HTMLResponse(body, status_code=403)


Expected = Callable[[Request], Awaitable[list[tuple[str, str]]]]
"""``request -> [(purpose, subject), ...]``: the tokens this request may carry."""


class CsrfMiddleware:
    """See the module docstring. ``expected(request)`` names the (purpose, subject) pairs whose
    token the request may present: its session's, or before login the nonce's."""

    def __init__(self, app: ASGIApp, secret: UiSecret, expected: Expected) -> None:
        self.app = app
        self.secret = secret
        self.expected = expected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in UNSAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not same_origin(headers):
            log.warning("cross-site request refused", extra={"path": scope.get("path")})
            await _refused("cross-site request")(scope, receive, send)
            return
        body = await _read_body(receive)
        presented = headers.get(_CSRF_HEADER)
        if presented is None and headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            values = parse_qs(body.decode("latin-1"), max_num_fields=1000).get(_CSRF_FIELD)
            presented = values[0] if values else None
        request = Request(scope)
        pairs = await self.expected(request)
        if not any(self.secret.check(p, s, presented) for p, s in pairs):
            log.warning("request without a valid CSRF token", extra={"path": scope.get("path")})
            await _refused("missing or wrong CSRF token")(scope, receive, send)
            return
        await self.app(scope, _replay(body), send)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


class SecurityHeadersMiddleware:
    """Adds :data:`SECURITY_HEADERS` to every answer; ``Cache-Control: no-store`` to all but
    the static files (which are public and versioned)."""

    def __init__(self, app: ASGIApp, static_prefix: str = "/static/") -> None:
        self.app = app
        self.static_prefix = static_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        static = path.removeprefix(root).startswith(self.static_prefix)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", []))
                present = {k.lower() for k, _ in raw}
                for name, value in SECURITY_HEADERS.items():
                    if name.lower().encode() not in present:
                        raw.append((name.lower().encode(), value.encode()))
                if not static and b"cache-control" not in present:
                    raw.append((b"cache-control", b"no-store"))
                message["headers"] = raw
            await send(message)

        await self.app(scope, receive, with_headers)
