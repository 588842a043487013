"""Property-based fuzzing of the control center: no request generated from its OpenAPI gets a 5xx.

A real platform process (`prvng platform start` in the foreground: control center and
orchestrator, SQLite in a temp data dir, free 127.0.0.1 ports, the first admin's password from
`PRVNG_ADMIN_PASSWORD`) serves the whole module. Schemathesis sends at least 100 generated
requests per operation with an admin's credentials, so they reach validation and the handlers
rather than stopping at 401, and checks only `not_a_server_error`.

Credentials: an admin access token, except for `POST /auth/logout`, which gets an admin API key —
a logout with the token would end its login (and with it the token) for every later request.
Nothing else generated can end the admin's session: user ids in paths are random strings, so
`PATCH /users/{user_id}` cannot disable or re-password the admin, and `POST /keys/rotate` keeps
the previous key for `key_overlap_s` (30 minutes), longer than this module runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from provisioning.control_center.app import ControlCenterService
from tests.conftest import free_port, make_settings

pytestmark = pytest.mark.slow

ADMIN_PASSWORD = "schemathesis admin passphrase"


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"platform exited {proc.returncode}:\n{log.read_text('utf-8')}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"control center not healthy within 60 s:\n{log.read_text('utf-8')}")


@pytest.fixture(scope="module")
def control_center_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real platform process for the whole module; stopped (SIGTERM, then SIGKILL)."""
    root = tmp_path_factory.mktemp("cc-schemathesis")
    cc_port = free_port()
    log = root / "platform.log"
    env = {
        **os.environ,
        "PRVNG_LOG__LEVEL": "error",
        "PRVNG_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "PRVNG_CONTROL_CENTER__PORT": str(cc_port),
        "PRVNG_NATS__PORT": str(free_port()),
        "PRVNG_OPS_KEEPER__PORT": str(free_port()),
    }
    argv = [sys.executable, "-m", "provisioning.cli.main", "--data-dir", str(root / "home")]
    argv += ["platform", "start", "--host", "127.0.0.1", "--port", str(free_port())]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{cc_port}"
    try:
        _wait_healthy(proc, url, log)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def admin_credentials(control_center_url: str) -> dict[str, dict[str, str]]:
    """Headers of an admin: ``token`` (a login's access token) and ``key`` (an API key)."""
    login = httpx.post(
        f"{control_center_url}/auth/login",
        json={"username": "admin", "password": ADMIN_PASSWORD},
        timeout=10,
    )
    assert login.status_code == 200, login.text
    token = {"Authorization": f"Bearer {login.json()['data']['access_token']}"}
    created = httpx.post(
        f"{control_center_url}/apikeys", headers=token, json={"name": "fuzz"}, timeout=10
    )
    assert created.status_code == 201, created.text
    return {"token": token, "key": {"X-API-Key": created.json()["data"]["key"]}}


def _openapi() -> dict[str, Any]:
    """The control center's OpenAPI document, built without starting anything.

    Parametrising needs it at collection time, before the server fixture runs; a test checks
    that the server serves this same document.
    """
    home = Path(tempfile.gettempdir()) / "prvng-cc-openapi-unused"
    svc = ControlCenterService(make_settings(home, f"sqlite:///{home / 'unused.db'}"))
    return svc.app.openapi()


OPENAPI = _openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


def test_the_server_serves_the_schema_that_is_fuzzed(control_center_url: str) -> None:
    served = httpx.get(f"{control_center_url}/openapi.json", timeout=10).json()
    assert served == json.loads(json.dumps(OPENAPI))


@schema.parametrize()
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_generated_request_gets_a_server_error(
    case: schemathesis.Case,
    control_center_url: str,
    admin_credentials: dict[str, dict[str, str]],
) -> None:
    which = "key" if case.path == "/auth/logout" else "token"
    case.call_and_validate(
        base_url=control_center_url,
        headers=admin_credentials[which],
        checks=[not_a_server_error],
        timeout=30,
    )


def test_the_admin_was_still_logged_in_after_the_fuzzing(
    control_center_url: str, admin_credentials: dict[str, dict[str, str]]
) -> None:
    # Runs last in this module: the credentials were good for every generated request.
    for headers in admin_credentials.values():
        who = httpx.get(f"{control_center_url}/auth/whoami", headers=headers, timeout=10)
        assert who.status_code == 200, who.text
