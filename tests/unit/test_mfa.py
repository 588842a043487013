"""TOTP: enrolment, the ±1 step window, and replay refusal, at fixed times."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlparse

import pyotp

from provisioning.control_center.mfa import (
    current_step,
    new_secret,
    provisioning_uri,
    verify_totp,
)

T = 1_700_000_010.0  # 10 s into step 56_666_667
STEP = 56_666_667
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def code_at(step: int, secret: str = SECRET) -> str:
    return pyotp.TOTP(secret).generate_otp(step)


def test_a_new_secret_is_160_random_bits_in_base32() -> None:
    first, second = new_secret(), new_secret()
    assert first != second
    assert len(base64.b32decode(first)) == 20


def test_the_provisioning_uri_names_the_user_the_issuer_and_the_secret() -> None:
    uri = urlparse(provisioning_uri(SECRET, "alice"))
    assert (uri.scheme, uri.netloc) == ("otpauth", "totp")
    assert uri.path == "/Provisioning:alice"
    query = parse_qs(uri.query)
    assert query["secret"] == [SECRET]
    assert query["issuer"] == ["Provisioning"]
    assert "Acme" in provisioning_uri(SECRET, "alice", issuer="Acme")


def test_the_rfc_6238_test_vector_verifies() -> None:
    rfc_secret = base64.b32encode(b"12345678901234567890").decode()
    assert verify_totp(rfc_secret, "287082", last_used_step=None, at=59) == 1


def test_the_current_code_verifies_and_returns_its_step() -> None:
    assert current_step(T) == STEP
    assert verify_totp(SECRET, code_at(STEP), last_used_step=None, at=T) == STEP


def test_codes_one_step_early_or_late_are_accepted_two_steps_are_not() -> None:
    assert verify_totp(SECRET, code_at(STEP - 1), last_used_step=None, at=T) == STEP - 1
    assert verify_totp(SECRET, code_at(STEP + 1), last_used_step=None, at=T) == STEP + 1
    assert verify_totp(SECRET, code_at(STEP - 2), last_used_step=None, at=T) is None
    assert verify_totp(SECRET, code_at(STEP + 2), last_used_step=None, at=T) is None


def test_a_code_cannot_be_replayed_once_its_step_is_used() -> None:
    code = code_at(STEP)
    used = verify_totp(SECRET, code, last_used_step=None, at=T)
    assert used == STEP
    assert verify_totp(SECRET, code, last_used_step=used, at=T) is None
    assert verify_totp(SECRET, code, last_used_step=used, at=T + 25) is None


def test_an_older_code_is_refused_after_a_newer_one_was_used() -> None:
    assert verify_totp(SECRET, code_at(STEP - 1), last_used_step=STEP, at=T) is None
    assert verify_totp(SECRET, code_at(STEP + 1), last_used_step=STEP, at=T) == STEP + 1


def test_a_wrong_or_malformed_code_is_refused() -> None:
    right = code_at(STEP)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    full_width = "".join(chr(0xFF10 + int(d)) for d in right)
    for code in [wrong, right[:5], right + "0", "abcdef", "", full_width]:
        assert verify_totp(SECRET, code, last_used_step=None, at=T) is None, code


def test_a_code_typed_with_spaces_verifies() -> None:
    code = code_at(STEP)
    assert verify_totp(SECRET, f"{code[:3]} {code[3:]}", last_used_step=None, at=T) == STEP


def test_an_aware_datetime_works_as_the_time() -> None:
    at = datetime.fromtimestamp(T, tz=UTC)
    assert current_step(at) == STEP
    assert verify_totp(SECRET, code_at(STEP), last_used_step=None, at=at) == STEP


def test_a_code_of_another_secret_does_not_verify() -> None:
    other = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
    assert verify_totp(SECRET, code_at(STEP, other), last_used_step=None, at=T) is None
