"""Password hashing (argon2id, upgraded on login) and the password policy."""

from __future__ import annotations

from typing import Any

import argon2
import pytest

from provisioning.control_center.passwords import (
    HashParams,
    burn_equivalent_time,
    check_password_policy,
    common_passwords,
    hash_password,
    is_common_password,
    verify_password,
)
from provisioning.core.errors import ConfigError, ValidationError

GOOD = "violet-anchor-drizzle"


def test_a_hash_is_argon2id_with_at_least_19_mib_two_passes_one_lane() -> None:
    stored = hash_password(GOOD)
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert GOOD not in stored


def test_two_hashes_of_one_password_differ_by_their_salt() -> None:
    assert hash_password(GOOD) != hash_password(GOOD)


def test_the_right_password_verifies_and_a_wrong_one_does_not() -> None:
    stored = hash_password(GOOD)
    assert verify_password(stored, GOOD) == (True, None)
    assert verify_password(stored, GOOD + "x") == (False, None)
    assert verify_password(stored, GOOD.upper()) == (False, None)


def test_a_hash_made_with_older_parameters_is_upgraded_on_a_successful_login() -> None:
    stronger = HashParams(time_cost=3)
    stored = hash_password(GOOD)
    ok, new_hash = verify_password(stored, GOOD, params=stronger)
    assert ok
    assert new_hash is not None
    assert new_hash.startswith("$argon2id$v=19$m=19456,t=3,p=1$")
    assert verify_password(new_hash, GOOD, params=stronger) == (True, None)


def test_a_failed_login_never_returns_an_upgraded_hash() -> None:
    stored = hash_password(GOOD)
    assert verify_password(stored, "not-it-at-all", params=HashParams(time_cost=3)) == (False, None)


def test_an_argon2i_hash_is_upgraded_to_argon2id() -> None:
    legacy = argon2.PasswordHasher(type=argon2.Type.I).hash(GOOD)
    ok, new_hash = verify_password(legacy, GOOD)
    assert ok
    assert new_hash is not None
    assert new_hash.startswith("$argon2id$")


def test_a_stored_value_that_is_not_an_argon2_hash_never_matches() -> None:
    assert verify_password("!disabled", GOOD) == (False, None)
    assert verify_password("", "") == (False, None)


def test_a_password_typed_with_decomposed_accents_matches_its_composed_form() -> None:
    stored = hash_password("caf\u00e9-terrace-nine")
    assert verify_password(stored, "cafe\u0301-terrace-nine") == (True, None)


def test_a_password_far_longer_than_the_policy_allows_is_refused_without_error() -> None:
    stored = hash_password(GOOD)
    assert verify_password(stored, "a" * 100_000) == (False, None)


def test_parameters_below_the_floor_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="memory_cost_kib"):
        HashParams(memory_cost_kib=4096)
    with pytest.raises(ConfigError, match="time_cost"):
        HashParams(time_cost=1)
    with pytest.raises(ConfigError, match="parallelism"):
        HashParams(parallelism=0)


def test_burning_time_for_a_missing_user_does_a_real_argon2_verification(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    original = argon2.PasswordHasher.verify

    def spy(self: argon2.PasswordHasher, hash: str | bytes, password: str | bytes) -> Any:
        calls.append(str(hash))
        return original(self, hash, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", spy)
    burn_equivalent_time("whatever-they-typed")
    assert len(calls) == 1
    assert calls[0].startswith("$argon2id$v=19$m=19456,t=2,p=1$")


def test_a_password_of_eight_characters_is_accepted_and_of_seven_refused() -> None:
    check_password_policy("zq8#vLm2")
    with pytest.raises(ValidationError, match="at least 8") as info:
        check_password_policy("zq8#vLm")
    assert info.value.details["reason"] == "too_short"


def test_a_password_of_1024_characters_is_accepted_and_of_1025_refused() -> None:
    check_password_policy("zq8#vLm2" * 128)
    with pytest.raises(ValidationError, match="at most 1,024") as info:
        check_password_policy("zq8#vLm2" * 128 + "x")
    assert info.value.details["reason"] == "too_long"


def test_length_counts_code_points_after_nfkc_normalisation() -> None:
    # Four decomposed "é" are eight code points typed but four characters after NFKC.
    with pytest.raises(ValidationError, match="too short"):
        check_password_policy("e\u0301" * 4 + "xyz")
    # Four "ﬁ" ligatures are four code points typed but eight characters after NFKC.
    check_password_policy("\ufb01" * 4)
    check_password_policy("\U0001f511" * 8)


def test_there_are_no_composition_rules() -> None:
    check_password_policy("correct horse battery staple")
    check_password_policy("lowercaseonlybutlong")
    check_password_policy("9274018364")


@pytest.mark.parametrize("common", ["password", "PaSsWoRd", "password1", "Qwertyuiop", "12345678"])
def test_a_common_password_is_refused_whatever_its_case(common: str) -> None:
    with pytest.raises(ValidationError, match="commonly used") as info:
        check_password_policy(common)
    assert info.value.details["reason"] == "too_common"


def test_the_username_itself_is_refused_as_password() -> None:
    with pytest.raises(ValidationError, match="username") as info:
        check_password_policy("Margarethe-1970", username="margarethe-1970")
    assert info.value.details["reason"] == "is_username"
    check_password_policy("Margarethe-1970", username="someone-else")


@pytest.mark.parametrize(
    ("password", "username"),
    [
        ("Secr3t!", None),
        ("s3cr3t-" * 200, None),
        ("sunshine1", None),
        ("Bob-the-admin", "bob-the-admin"),
    ],
)
def test_a_refusal_never_contains_the_password(password: str, username: str | None) -> None:
    with pytest.raises(ValidationError) as info:
        check_password_policy(password, username=username)
    wire = repr(info.value.to_wire())
    assert password not in wire
    assert password.lower() not in wire.lower()
    assert info.value.details["field"] == "password"


def test_the_common_list_ships_at_least_ten_thousand_lower_case_entries_read_once() -> None:
    words = common_passwords()
    assert len(words) >= 10_000
    assert "123456" in words
    assert all(w == w.casefold() and not w.startswith("#") for w in words)
    assert common_passwords() is words
    assert is_common_password("IloveYou")
    assert not is_common_password(GOOD)
