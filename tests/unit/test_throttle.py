"""Login throttling: growing delays per account and per address, no lockout, bounded memory."""

from __future__ import annotations

import pytest

from provisioning.control_center.throttle import Rule, Throttle, account_key, retry_after

FULL_WIDTH_ALICE = "\uff21\uff4c\uff49\uff43\uff45"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fail(throttle: Throttle, times: int, account: str = "alice", address: str = "10.0.0.1") -> None:
    for _ in range(times):
        throttle.record_failure(account, address)


def test_the_first_failures_cost_nothing_then_attempts_must_wait() -> None:
    clock = FakeClock()
    throttle = Throttle(clock)
    fail(throttle, 4)
    assert throttle.check("alice", "10.0.0.1") is None
    fail(throttle, 1)
    assert throttle.check("alice", "10.0.0.1") == pytest.approx(1.0)


def test_each_further_failure_doubles_the_wait() -> None:
    clock = FakeClock()
    throttle = Throttle(clock)
    fail(throttle, 5)
    waits = []
    for _ in range(5):
        wait = throttle.check("alice", "10.0.0.1")
        assert wait is not None
        waits.append(wait)
        clock.advance(wait)
        assert throttle.check("alice", "10.0.0.1") is None
        fail(throttle, 1)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_the_wait_counts_down_from_the_last_failure() -> None:
    clock = FakeClock()
    throttle = Throttle(clock)
    fail(throttle, 6)
    clock.advance(0.5)
    assert throttle.check("alice", "10.0.0.1") == pytest.approx(1.5)


def test_the_wait_is_capped_so_nobody_is_locked_out_for_good() -> None:
    clock = FakeClock()
    throttle = Throttle(clock)
    fail(throttle, 200)
    assert throttle.check("alice", "10.0.0.1") == pytest.approx(900.0)
    clock.advance(900.0)
    assert throttle.check("alice", "10.0.0.1") is None


def test_a_successful_login_clears_the_account_but_not_the_address() -> None:
    clock = FakeClock()
    throttle = Throttle(clock, address=Rule(free_failures=6))
    fail(throttle, 6)
    assert throttle.check("alice", "10.0.0.2") is not None
    throttle.record_success("alice")
    assert throttle.check("alice", "10.0.0.2") is None
    assert throttle.check("bob", "10.0.0.1") is not None


def test_the_account_key_is_the_submitted_name_whatever_its_case() -> None:
    clock = FakeClock()
    throttle = Throttle(clock)
    for i, name in enumerate(["Alice", "ALICE", "alice", "aLiCe", FULL_WIDTH_ALICE]):
        throttle.record_failure(name, f"10.0.1.{i}")
    assert account_key(FULL_WIDTH_ALICE) == "alice"
    assert throttle.check("alice", "10.9.9.9") == pytest.approx(1.0)
    throttle.record_success("ALICE")
    assert throttle.check("alice", "10.9.9.9") is None


def test_an_unknown_username_is_throttled_exactly_like_a_real_one() -> None:
    clock = FakeClock()
    throttle = Throttle(clock)
    for _ in range(8):
        throttle.record_failure("admin", "10.0.0.1")
        throttle.record_failure("no-such-user-4711", "10.0.0.2")
        assert throttle.check("admin", "10.0.0.3") == throttle.check(
            "no-such-user-4711", "10.0.0.3"
        )
        clock.advance(0.25)


def test_many_accounts_failing_from_one_address_slow_that_address_down() -> None:
    clock = FakeClock()
    throttle = Throttle(clock)
    for i in range(20):
        throttle.record_failure(f"user{i}", "203.0.113.7")
    assert throttle.check("a-fresh-name", "203.0.113.7") == pytest.approx(1.0)
    assert throttle.check("a-fresh-name", "203.0.113.8") is None


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = FakeClock()
    throttle = Throttle(clock, account=Rule(free_failures=5, window_s=600.0))
    fail(throttle, 4)
    clock.advance(600.0)
    fail(throttle, 4)
    assert throttle.check("alice", "10.0.0.1") is None
    fail(throttle, 1)
    assert throttle.check("alice", "10.0.0.1") == pytest.approx(1.0)


def test_idle_keys_are_evicted_and_the_total_is_capped() -> None:
    clock = FakeClock()
    throttle = Throttle(clock, max_keys=10)
    for i in range(50):
        throttle.record_failure(f"user{i}", f"10.0.2.{i}")
    assert throttle.tracked_keys() == (10, 10)
    clock.advance(3600.0)
    throttle.record_failure("late", "10.0.3.1")
    assert throttle.tracked_keys() == (1, 1)


def test_past_the_cap_the_least_recently_failing_key_is_evicted_first() -> None:
    clock = FakeClock()
    throttle = Throttle(clock, max_keys=3)
    fail(throttle, 6, account="target", address="10.0.0.1")
    for i in range(2):
        clock.advance(0.1)
        throttle.record_failure(f"noise{i}", "10.0.0.1")
    assert throttle.check("target", "10.0.0.9") is not None
    clock.advance(0.1)
    throttle.record_failure("noise2", "10.0.0.1")
    assert throttle.check("target", "10.0.0.9") is None


def test_a_huge_username_is_kept_as_a_bounded_key() -> None:
    assert len(account_key("x" * 1_000_000)) == 256


@pytest.mark.parametrize(("wait", "header"), [(0.01, 1), (1.0, 1), (2.5, 3), (900.0, 900)])
def test_retry_after_is_whole_seconds_rounded_up(wait: float, header: int) -> None:
    assert retry_after(wait) == header
