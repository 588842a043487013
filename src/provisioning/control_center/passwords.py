"""Password hashing (argon2id) and the password policy.

Hashes are argon2id in the PHC string format (``$argon2id$v=19$m=19456,t=2,p=1$salt$hash``), so
each stored hash carries its own parameters. When the configured :class:`HashParams` change,
:func:`verify_password` returns a fresh hash after a successful check and the caller stores it:
hashes are upgraded on login, never in bulk.

Passwords are NFKC-normalised before hashing and before the policy counts their length, so the
same password typed on two keyboards (composed or decomposed accents, full-width digits) is one
password. The policy (NIST SP 800-63B): 8 to 1,024 characters, no composition rules, and neither
one of the most common passwords (the list shipped in ``data/common-passwords.txt``) nor the
username. Error messages never contain the password.

When a login names a user that does not exist, call :func:`burn_equivalent_time` instead of
:func:`verify_password`: it does the same argon2 work, so the answer's timing does not reveal
whether the user exists.
"""

from __future__ import annotations

import functools
import logging
import secrets
import unicodedata
from dataclasses import dataclass
from importlib import resources

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from provisioning.core.errors import ConfigError, ValidationError

__all__ = [
    "DEFAULT_PARAMS",
    "MAX_LENGTH",
    "MIN_LENGTH",
    "HashParams",
    "burn_equivalent_time",
    "check_password_policy",
    "common_passwords",
    "hash_password",
    "is_common_password",
    "verify_password",
]

logger = logging.getLogger(__name__)

MIN_LENGTH = 8
MAX_LENGTH = 1024
# Floors from OWASP's argon2id recommendation (m=19 MiB, t=2, p=1); configuration may only go up.
_MIN_TIME_COST = 2
_MIN_MEMORY_KIB = 19456
_MIN_PARALLELISM = 1
# Past this a submitted password cannot match anything stored; it is cut before normalising so
# a huge login body costs no more than a normal one.
_VERIFY_INPUT_CAP = 4 * MAX_LENGTH
_COMMON_FILE = "common-passwords.txt"


@dataclass(frozen=True)
class HashParams:
    """argon2id cost parameters (``memory_cost_kib`` in KiB).

    Raises:
        ConfigError: a parameter is below the floor (t=2, m=19456 KiB, p=1).
    """

    time_cost: int = _MIN_TIME_COST
    memory_cost_kib: int = _MIN_MEMORY_KIB
    parallelism: int = _MIN_PARALLELISM

    def __post_init__(self) -> None:
        floors = {
            "time_cost": (self.time_cost, _MIN_TIME_COST),
            "memory_cost_kib": (self.memory_cost_kib, _MIN_MEMORY_KIB),
            "parallelism": (self.parallelism, _MIN_PARALLELISM),
        }
        for name, (value, floor) in floors.items():
            if value < floor:
                raise ConfigError(
                    f"password hashing {name}={value} is below the minimum {floor}: raise it",
                    setting=name,
                )


DEFAULT_PARAMS = HashParams()


@dataclass(frozen=True)
class _Hasher:
    hasher: argon2.PasswordHasher
    dummy_hash: str


@functools.cache
def _hasher(params: HashParams) -> _Hasher:
    hasher = argon2.PasswordHasher(
        time_cost=params.time_cost,
        memory_cost=params.memory_cost_kib,
        parallelism=params.parallelism,
        type=argon2.Type.ID,
    )
    # A hash of a random secret, verified by burn_equivalent_time: same parameters, same cost.
    return _Hasher(hasher, hasher.hash(secrets.token_urlsafe(32)))


def _normalise(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


def hash_password(password: str, *, params: HashParams = DEFAULT_PARAMS) -> str:
    """The argon2id PHC hash of ``password`` (NFKC-normalised), with a fresh random salt.

    Does not check the policy: call :func:`check_password_policy` first for a new password.
    """
    return _hasher(params).hasher.hash(_normalise(password))


def verify_password(
    stored_hash: str, password: str, *, params: HashParams = DEFAULT_PARAMS
) -> tuple[bool, str | None]:
    """Check ``password`` against ``stored_hash``.

    Returns ``(matches, new_hash)``: ``new_hash`` is set only when the password matches and the
    stored hash was made with other parameters (or another argon2 variant) than ``params``; the
    caller replaces the stored hash with it. A stored value that is not an argon2 hash never
    matches (a warning is logged, without the password).
    """
    if len(password) > _VERIFY_INPUT_CAP:
        burn_equivalent_time(password, params=params)
        return False, None
    h = _hasher(params)
    candidate = _normalise(password)
    try:
        h.hasher.verify(stored_hash, candidate)
    except VerifyMismatchError:
        return False, None
    except (InvalidHashError, VerificationError):
        logger.warning("stored password hash is not a valid argon2 hash; refusing the login")
        burn_equivalent_time(candidate, params=params)
        return False, None
    if h.hasher.check_needs_rehash(stored_hash):
        return True, h.hasher.hash(candidate)
    return True, None


def burn_equivalent_time(password: str, *, params: HashParams = DEFAULT_PARAMS) -> None:
    """Spend the time of one :func:`verify_password` without checking anything.

    Call it when the submitted username does not exist, so the response time does not tell
    whether it does.
    """
    h = _hasher(params)
    try:
        h.hasher.verify(h.dummy_hash, _normalise(password[:_VERIFY_INPUT_CAP]))
    except VerificationError:
        pass


@functools.cache
def common_passwords() -> frozenset[str]:
    """The shipped list of common passwords, lower-case (read once, on first use)."""
    text = (
        resources.files("provisioning.control_center")
        .joinpath("data", _COMMON_FILE)
        .read_text(encoding="utf-8")
    )
    return frozenset(
        line.strip().casefold()
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    )


def is_common_password(password: str) -> bool:
    """Whether ``password`` (NFKC-normalised, case-insensitively) is on the common list."""
    return _normalise(password).casefold() in common_passwords()


def check_password_policy(
    password: str,
    *,
    username: str | None = None,
    min_length: int = MIN_LENGTH,
    max_length: int = MAX_LENGTH,
) -> None:
    """Refuse a new password that breaks the policy.

    The length is counted in Unicode code points after NFKC normalisation. There are no
    composition rules (no "one digit, one symbol").

    Raises:
        ValidationError: too short, too long, one of the common passwords, or the username;
            ``details`` carry ``field="password"`` and a stable ``reason``.
    """
    normalised = _normalise(password)
    length = len(normalised)
    if length < min_length:
        raise ValidationError(
            f"password is too short: use at least {min_length} characters "
            "(a few unrelated words make a strong, memorable passphrase)",
            field="password",
            reason="too_short",
            min_length=min_length,
        )
    if length > max_length:
        raise ValidationError(
            f"password is too long: use at most {max_length:,} characters",
            field="password",
            reason="too_long",
            max_length=max_length,
        )
    folded = normalised.casefold()
    if username is not None and folded == _normalise(username).casefold():
        raise ValidationError(
            "password must not be the username: choose another one",
            field="password",
            reason="is_username",
        )
    if folded in common_passwords():
        raise ValidationError(
            "password is one of the most commonly used passwords and would be guessed quickly: "
            "choose another one",
            field="password",
            reason="too_common",
        )
