"""Login throttling and non-enumeration, through `POST /auth/login` of a real control center.

The control center runs in-process on SQLite and on PostgreSQL; each HTTP client has its own
client address (``ASGITransport(client=...)``, which is what the service reads as
``request.client.host``). Throttle time is a fake clock swapped into the identity service, so
waiting out a `Retry-After` costs nothing. The default rules apply: an account may fail 5 times
and an address 20 times before any delay, then the delay doubles from 1 s up to 15 minutes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.control_center.app import ControlCenterService
from provisioning.control_center.throttle import Rule, Throttle
from provisioning.core.settings import load_settings
from tests.conftest import free_port

ADMIN_PASSWORD = "admin passphrase for throttling"
DEV_PASSWORD = "developer passphrase 1"
WRONG = "not the password at all"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ControlCenter:
    def __init__(self, svc: ControlCenterService, stack: AsyncExitStack) -> None:
        self.svc = svc
        self.stack = stack
        self.clock = FakeClock()
        svc.identity.throttle = Throttle(clock=self.clock)

    async def client(self, address: str) -> httpx.AsyncClient:
        """An HTTP client whose requests come from ``address``."""
        transport = httpx.ASGITransport(app=self.svc.app, client=(address, 40000))
        return await self.stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://cc")
        )

    async def add_user(self, username: str, *, disabled: bool = False) -> None:
        admin = await self.client("192.0.2.250")
        login = await admin.post(
            "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        headers = {"Authorization": f"Bearer {login.json()['data']['access_token']}"}
        resp = await admin.post(
            "/users",
            headers=headers,
            json={"username": username, "password": DEV_PASSWORD, "roles": ["developer"]},
        )
        assert resp.status_code == 201, resp.text
        if disabled:
            resp = await admin.patch(f"/users/{username}", headers=headers, json={"disabled": True})
            assert resp.status_code == 200, resp.text


@pytest.fixture
async def control_center(tmp_path: Path, state_url: str) -> AsyncIterator[ControlCenter]:
    settings = load_settings(
        home=tmp_path / "home",
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
            "control_center": {"admin_password": ADMIN_PASSWORD, "port": free_port()},
        },
    )
    svc = ControlCenterService(settings)
    await svc.start()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(svc.stop)
        yield ControlCenter(svc, stack)


async def attempt(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await client.post("/auth/login", json={"username": username, "password": password})


def answer(resp: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    """Everything a caller sees of a response."""
    return resp.status_code, resp.json(), dict(resp.headers)


async def test_repeated_failures_for_an_account_slow_down_then_answer_429_with_retry_after(
    control_center: ControlCenter,
) -> None:
    cc = control_center
    client = await cc.client("198.51.100.7")
    for _ in range(5):
        assert (await attempt(client, "admin", WRONG)).status_code == 401

    waits = []
    for _ in range(3):
        throttled = await attempt(client, "admin", ADMIN_PASSWORD)  # not even checked
        assert throttled.status_code == 429
        assert throttled.json()["error"]["code"] == "rate_limited"
        waits.append(int(throttled.headers["Retry-After"]))
        cc.clock.advance(waits[-1] - 0.01)
        assert (await attempt(client, "admin", WRONG)).status_code == 429  # not quite yet
        cc.clock.advance(0.01)
        assert (await attempt(client, "admin", WRONG)).status_code == 401

    assert waits == [1, 2, 4]
    denied = await cc.svc.identity.audit_query(action="auth:login", result="denied")
    assert len(denied) == 6
    assert {(r["actor"], r["source"], r["details"]["reason"]) for r in denied} == {
        ("admin", "198.51.100.7", "throttled")
    }


async def test_the_account_throttle_applies_from_every_address_and_spelling(
    control_center: ControlCenter,
) -> None:
    cc = control_center
    await cc.add_user("dev")
    first = await cc.client("198.51.100.7")
    second = await cc.client("203.0.113.9")
    for _ in range(5):
        assert (await attempt(first, "dev", WRONG)).status_code == 401

    assert (await attempt(second, "dev", DEV_PASSWORD)).status_code == 429
    assert (await attempt(second, "DEV", DEV_PASSWORD)).status_code == 429
    assert (await attempt(second, "admin", ADMIN_PASSWORD)).status_code == 200


async def test_failures_from_one_address_throttle_every_account_tried_from_it(
    control_center: ControlCenter,
) -> None:
    cc = control_center
    sprayer = await cc.client("198.51.100.66")
    other = await cc.client("203.0.113.9")
    for i in range(20):  # one failure per name: no account reaches its limit
        assert (await attempt(sprayer, f"guess{i}", WRONG)).status_code == 401

    throttled = await attempt(sprayer, "admin", ADMIN_PASSWORD)

    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "1"
    assert (await attempt(other, "admin", ADMIN_PASSWORD)).status_code == 200


async def test_a_successful_login_clears_the_accounts_failures(
    control_center: ControlCenter,
) -> None:
    cc = control_center
    client = await cc.client("198.51.100.7")
    for _ in range(4):
        assert (await attempt(client, "admin", WRONG)).status_code == 401
    assert (await attempt(client, "admin", ADMIN_PASSWORD)).status_code == 200

    # Four more: without the reset the fifth and later failures would be throttled.
    statuses = [(await attempt(client, "admin", WRONG)).status_code for _ in range(5)]

    assert statuses == [401] * 5
    assert (await attempt(client, "admin", WRONG)).status_code == 429


async def test_no_amount_of_failures_locks_an_account_for_good(
    control_center: ControlCenter,
) -> None:
    cc = control_center
    client = await cc.client("198.51.100.7")
    waits: list[int] = []
    while not waits or waits[-1] < 900:
        assert len(waits) < 40, f"the delay never reached its cap: {waits}"
        resp = await attempt(client, "admin", WRONG)
        if resp.status_code == 429:
            waits.append(int(resp.headers["Retry-After"]))
            cc.clock.advance(waits[-1])
        else:
            assert resp.status_code == 401

    assert waits == sorted(waits)
    assert max(waits) == 900  # 15 minutes at most, however many failures
    assert (await attempt(client, "admin", ADMIN_PASSWORD)).status_code == 200
    # And the account is forgotten after an hour without failures.
    for _ in range(5):
        assert (await attempt(client, "admin", WRONG)).status_code == 401
    assert (await attempt(client, "admin", WRONG)).status_code == 429
    cc.clock.advance(3600)
    assert (await attempt(client, "admin", WRONG)).status_code == 401


async def test_an_unknown_user_gets_the_same_answers_as_an_existing_one(
    control_center: ControlCenter,
) -> None:
    cc = control_center
    await cc.add_user("dev")
    await cc.add_user("gone", disabled=True)
    existing = await cc.client("198.51.100.1")
    unknown = await cc.client("198.51.100.2")
    disabled = await cc.client("198.51.100.3")

    bad = [
        await attempt(existing, "dev", WRONG),
        await attempt(unknown, "nobody-here", WRONG),
        await attempt(disabled, "gone", DEV_PASSWORD),  # the right password of a disabled user
    ]
    assert bad[0].status_code == 401
    assert bad[0].json()["error"] == {
        "code": "unauthorized",
        "message": "invalid username or password",
        "details": {},
    }
    assert answer(bad[1]) == answer(bad[0])
    assert answer(bad[2]) == answer(bad[0])

    for _ in range(4):
        await attempt(existing, "dev", WRONG)
        await attempt(unknown, "nobody-here", WRONG)
        await attempt(disabled, "gone", DEV_PASSWORD)
    throttled = [
        await attempt(existing, "dev", DEV_PASSWORD),
        await attempt(unknown, "nobody-here", DEV_PASSWORD),
        await attempt(disabled, "gone", DEV_PASSWORD),
    ]
    assert throttled[0].status_code == 429
    assert answer(throttled[1]) == answer(throttled[0])
    assert answer(throttled[2]) == answer(throttled[0])


async def test_a_failed_login_takes_as_long_for_an_unknown_user_as_for_an_existing_one(
    control_center: ControlCenter,
) -> None:
    cc = control_center
    unlimited = Rule(free_failures=10**9)
    cc.svc.identity.throttle = Throttle(account=unlimited, address=unlimited)
    client = await cc.client("198.51.100.7")
    timings: dict[str, list[float]] = {"admin": [], "nobody-here": []}

    async def timed(username: str) -> float:
        start = time.perf_counter()
        resp = await attempt(client, username, WRONG)
        elapsed = time.perf_counter() - start
        assert resp.status_code == 401
        return elapsed

    for username in timings:  # warm up both paths
        await timed(username)
    for _ in range(25):  # interleaved, so load on the machine hits both alike
        for username, samples in timings.items():
            samples.append(await timed(username))

    existing = statistics.median(timings["admin"])
    unknown = statistics.median(timings["nobody-here"])
    assert 1 / 3 < existing / unknown < 3, (existing, unknown)
