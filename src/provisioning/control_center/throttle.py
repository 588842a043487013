"""Login throttling per account and per client address: slower and slower, never locked out.

Each key (an account, a client address) counts its failed logins. The first ``free_failures``
cost nothing; after that each further attempt must wait ``base_delay_s * 2**(n - free)`` seconds
from the last failure (``n`` failures so far), capped at ``max_delay_s``. A key that has not
failed for ``window_s`` is forgotten, and a successful login clears its account's counter (not
its address's). There is no permanent lockout: the longest anyone waits is ``max_delay_s``.

How the login route uses it::

    wait = throttle.check(username, address)
    if wait is not None:
        answer 429 with Retry-After: retry_after(wait)   # the password is not even checked
    ok = verify the password (or burn_equivalent_time when the user does not exist)
    throttle.record_success(username) if ok else throttle.record_failure(username, address)

The account key is the *submitted* username, NFKC-normalised and lower-cased, whether or not the
user exists, so the throttle answers the same for existing and unknown names (no enumeration).

The state lives in memory and is **per control-center process**: several replicas each throttle
on their own, and a restart forgets every counter. Memory is bounded: entries idle for
``window_s`` are dropped, and past ``max_keys`` per kind the least recently failed key is
evicted (an attacker spraying that many distinct names is throttled by address meanwhile).
"""

from __future__ import annotations

import math
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Rule", "Throttle", "account_key", "retry_after"]

# Usernames longer than this share a key: they cannot be real, and keys stay small.
_MAX_KEY_CHARS = 256


@dataclass(frozen=True)
class Rule:
    """How one kind of key (account or address) slows down."""

    free_failures: int
    """Failures allowed before any delay."""
    base_delay_s: float = 1.0
    """Delay after the first failure past the free ones; doubles with each further failure."""
    max_delay_s: float = 900.0
    """Cap on the delay (15 minutes): no one waits longer than this."""
    window_s: float = 3600.0
    """A key with no failure for this long is forgotten."""

    def delay(self, failures: int) -> float:
        """Seconds to wait after the last failure when the key has ``failures`` failures."""
        if failures < self.free_failures:
            return 0.0
        exponent = min(failures - self.free_failures, 62)
        return float(min(self.max_delay_s, self.base_delay_s * 2**exponent))


@dataclass
class _Entry:
    failures: int
    last_failure: float


class _Counters:
    """Failures per key, least recently failed first, bounded in size."""

    def __init__(self, rule: Rule, max_keys: int) -> None:
        self.rule = rule
        self.max_keys = max_keys
        self.entries: OrderedDict[str, _Entry] = OrderedDict()

    def wait(self, key: str, now: float) -> float:
        entry = self.entries.get(key)
        if entry is None or now - entry.last_failure >= self.rule.window_s:
            return 0.0
        return max(0.0, entry.last_failure + self.rule.delay(entry.failures) - now)

    def fail(self, key: str, now: float) -> None:
        self._expire(now)
        entry = self.entries.pop(key, None)
        if entry is None or now - entry.last_failure >= self.rule.window_s:
            entry = _Entry(0, now)
        entry.failures += 1
        entry.last_failure = now
        self.entries[key] = entry
        while len(self.entries) > self.max_keys:
            self.entries.popitem(last=False)

    def clear(self, key: str) -> None:
        self.entries.pop(key, None)

    def _expire(self, now: float) -> None:
        # Oldest failures first, so stop at the first entry still inside the window.
        while self.entries:
            key, entry = next(iter(self.entries.items()))
            if now - entry.last_failure < self.rule.window_s:
                break
            del self.entries[key]


def account_key(username: str) -> str:
    """The throttle key for a submitted username: NFKC-normalised, lower-cased, bounded."""
    return unicodedata.normalize("NFKC", username[: _MAX_KEY_CHARS * 4]).lower()[:_MAX_KEY_CHARS]


def retry_after(wait_s: float) -> int:
    """The ``Retry-After`` header value (whole seconds, at least 1) for a wait."""
    return max(1, math.ceil(wait_s))


class Throttle:
    """Failed-login counters for accounts and client addresses (see the module docstring).

    ``clock`` returns seconds on a monotonic scale; tests pass a fake one. Safe to call from
    several threads.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        account: Rule | None = None,
        address: Rule | None = None,
        max_keys: int = 100_000,
    ) -> None:
        self._clock = clock
        # An address is shared by everyone behind one NAT, so it gets more free failures.
        self._accounts = _Counters(account or Rule(free_failures=5), max_keys)
        self._addresses = _Counters(address or Rule(free_failures=20), max_keys)
        self._lock = threading.Lock()

    def check(self, account: str, address: str) -> float | None:
        """Seconds the caller must wait before this attempt is allowed, or None when it is.

        ``account`` is the submitted username as typed (normalised here); ``address`` the
        client address. The longer of the two waits wins.
        """
        now = self._clock()
        with self._lock:
            wait = max(
                self._accounts.wait(account_key(account), now),
                self._addresses.wait(address, now),
            )
        return wait if wait > 0 else None

    def record_failure(self, account: str, address: str) -> None:
        """Count a failed login against the account and the address."""
        now = self._clock()
        with self._lock:
            self._accounts.fail(account_key(account), now)
            self._addresses.fail(address, now)

    def record_success(self, account: str) -> None:
        """A successful login clears the account's failures (its address keeps its own)."""
        with self._lock:
            self._accounts.clear(account_key(account))

    def tracked_keys(self) -> tuple[int, int]:
        """How many account and address keys are held (for metrics and tests)."""
        with self._lock:
            return len(self._accounts.entries), len(self._addresses.entries)
