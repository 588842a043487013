"""TOTP second factor (RFC 6238 via pyotp): secrets, enrolment URIs, replay-safe verification.

Codes are 6 digits over 30-second time steps, SHA-1 (what every authenticator app supports). A
code is accepted for the current step and one step either side, to absorb clock drift and
typing time. :func:`verify_totp` returns the step the code matched; the caller stores it as the
user's last used step and passes it back next time, so a code (or any code of an earlier step)
can be used only once.
"""

from __future__ import annotations

import hmac
import time
from datetime import datetime

import pyotp

__all__ = ["DIGITS", "STEP_S", "current_step", "new_secret", "provisioning_uri", "verify_totp"]

DIGITS = 6
STEP_S = 30
_SECRET_CHARS = 32  # base32: 160 bits, the key size RFC 4226 recommends


def new_secret() -> str:
    """A fresh random base32 TOTP secret (160 bits) to store with the user."""
    return pyotp.random_base32(length=_SECRET_CHARS)


def provisioning_uri(secret: str, username: str, issuer: str = "Provisioning") -> str:
    """The ``otpauth://totp/...`` URI an authenticator app enrols from (shown as a QR code)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S).provisioning_uri(
        name=username, issuer_name=issuer
    )


def current_step(at: float | datetime | None = None) -> int:
    """The TOTP time step for ``at`` (a Unix time or aware datetime; now when None)."""
    if at is None:
        ts = time.time()
    elif isinstance(at, datetime):
        ts = at.timestamp()
    else:
        ts = at
    return int(ts // STEP_S)


def verify_totp(
    secret: str,
    code: str,
    *,
    last_used_step: int | None,
    at: float | datetime | None = None,
    window: int = 1,
) -> int | None:
    """The time step ``code`` is valid for, or None when it is wrong, stale or replayed.

    ``code`` may contain spaces (``"123 456"``). A step at or before ``last_used_step`` is
    refused, so a code cannot be replayed, nor an older one used after a newer one. ``at``
    fixes the time (tests); ``window`` is the number of steps accepted either side of it.
    """
    candidate = code.replace(" ", "")
    if len(candidate) != DIGITS or not candidate.isascii() or not candidate.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S)
    now = current_step(at)
    matched: int | None = None
    # Every step in the window is compared (constant-time), so timing does not tell which matched.
    for step in range(now - window, now + window + 1):
        if hmac.compare_digest(totp.generate_otp(step), candidate) and matched is None:
            if last_used_step is None or step > last_used_step:
                matched = step
    return matched
