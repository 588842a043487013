"""Property-based API fuzzing: no request generated from `/openapi.json` gets a 5xx.

Schemathesis loads the schema from a real `prvng serve orchestrator` process (SQLite in a temp
data dir, 127.0.0.1 on a free port) and sends at least 100 generated requests per operation,
checking only `not_a_server_error`. Valid generated workflows really run: the server gets an
empty `PATH`, so a generated command cannot start any program and its task simply fails.
Generated ids are unknown to the store, so `GET /tasks/{id}/logs?follow=1` answers 404 at once
instead of streaming.
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

from provisioning.orchestrator.app import OrchestratorService
from tests.conftest import free_port, make_settings

pytestmark = pytest.mark.slow


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text('utf-8')}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not healthy within 60 s:\n{log.read_text('utf-8')}")


@pytest.fixture(scope="module")
def orchestrator_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real orchestrator process for the whole module; stopped (SIGTERM, then SIGKILL)."""
    root = tmp_path_factory.mktemp("schemathesis")
    empty_path = root / "empty-path"
    empty_path.mkdir()
    port = free_port()
    log = root / "server.log"
    # Authentication off so generated requests reach validation and the engine; access control
    # has its own suites.
    env = {
        **os.environ,
        "PATH": str(empty_path),
        "PRVNG_LOG__LEVEL": "error",
        "PRVNG_ORCHESTRATOR__AUTH": "disabled",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "provisioning.cli.main",
                "serve",
                "orchestrator",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data-dir",
                str(root / "home"),
                "--worker-id",
                "schemathesis",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
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


def _openapi() -> dict[str, Any]:
    """The app's OpenAPI document, built without starting anything (no store is opened).

    Parametrising needs the schema at collection time, before the server fixture runs
    (schemathesis' lazy `from_fixture` loader does not work with this pytest); the test checks
    that the server serves this same document.
    """
    home = Path(tempfile.gettempdir()) / "prvng-openapi-unused"
    svc = OrchestratorService(make_settings(home, f"sqlite:///{home / 'unused.db'}"))
    return svc.app.openapi()


OPENAPI = _openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


def test_the_server_serves_the_schema_that_is_fuzzed(orchestrator_url: str) -> None:
    served = httpx.get(f"{orchestrator_url}/openapi.json", timeout=10).json()
    assert served == json.loads(json.dumps(OPENAPI))


@schema.parametrize()
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_generated_request_gets_a_server_error(
    case: schemathesis.Case, orchestrator_url: str
) -> None:
    case.call_and_validate(base_url=orchestrator_url, checks=[not_a_server_error], timeout=30)
