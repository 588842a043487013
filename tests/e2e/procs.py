"""Real orchestrator worker processes for end-to-end tests.

A :class:`Worker` is one ``prvng serve orchestrator`` process (a :class:`ControlCenterProc`
one ``prvng serve control-center``): started with argv (no wrapper
shell, so its pid is the orchestrator itself), its output appended to a log file, health polled
with a deadline, ``kill -9`` on demand. Every process a test starts, task processes included,
carries a marker in its environment, so :meth:`WorkerPool.close` finds and kills whatever is
left, however the test ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import TERMINAL, free_port

__all__ = [
    "ControlCenterProc",
    "ServiceProc",
    "Worker",
    "WorkerPool",
    "get_workflow",
    "pids_with_env",
    "submit",
    "wait_workflow",
]

MARKER_ENV = "PRVNG_E2E_MARKER"
# Fast leases and polling so crashes are noticed within the test's time budget.
FAST_ENV = {
    "PRVNG_ORCHESTRATOR__LEASE_S": "2",
    "PRVNG_ORCHESTRATOR__POLL_INTERVAL_S": "0.1",
    "PRVNG_ORCHESTRATOR__KILL_GRACE_S": "1",
    "PRVNG_STATE__SQLITE_SYNCHRONOUS": "NORMAL",
    "PRVNG_LOG__LEVEL": "info",
    # These tests are about crashes and leases, not access control (tests/e2e/test_auth*.py).
    "PRVNG_ORCHESTRATOR__AUTH": "disabled",
}


def pids_with_env(entry: str) -> list[int]:
    """Pids of live processes whose environment holds ``entry`` (``NAME=value``), this one
    excluded. Zombies have no environment left and are never listed."""
    want = entry.encode()
    me = os.getpid()
    found: list[int] = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            environ = (d / "environ").read_bytes()
        except OSError:
            continue
        if want in environ.split(b"\0"):
            found.append(int(d.name))
    return found


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class ServiceProc:
    """One ``prvng serve <service>`` process; restartable with the very same command."""

    name: str
    data_dir: Path
    marker: str
    env: dict[str, str] = field(default_factory=dict)  # on top of FAST_ENV
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    lives: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.out.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def is_me(self, health: dict[str, Any]) -> bool:
        """Whether a ``/health`` answer's data comes from this process."""
        return True

    def start(self) -> None:
        """Start the process (not waiting for it to be healthy)."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already running"
        self.lives += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRVNG_")}
        env.update(FAST_ENV)
        env.update(self.env)
        env[MARKER_ENV] = self.marker
        with self.log_path.open("ab") as out:
            out.write(f"===== life {self.lives}: {' '.join(self.argv())}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Poll ``GET /health`` until this process answers as itself.

        Raises:
            AssertionError: the process exited or did not answer within ``timeout``.
        """
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"{self.name} exited with {self.proc.returncode} before "
                        f"being healthy:\n{self.log_tail()}"
                    )
                try:
                    r = client.get(f"{self.url}/health")
                    if r.status_code == 200 and self.is_me(r.json()["data"]):
                        return
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.05)
        raise AssertionError(
            f"{self.name} not healthy after {timeout}s ({last}):\n{self.log_tail()}"
        )

    def kill9(self) -> None:
        """SIGKILL the service process itself and reap it."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} not running"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful stop) and wait; answer the exit code."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} not running"
        self.proc.terminate()
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Worker(ServiceProc):
    """One orchestrator worker process (``name`` is its worker id)."""

    state_url: str | None = None
    max_parallel: int = 8

    @property
    def worker_id(self) -> str:
        return self.name

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "provisioning.cli.main", "serve", "orchestrator"]
        argv += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        argv += ["--worker-id", self.worker_id, "--max-parallel", str(self.max_parallel)]
        if self.state_url:
            argv += ["--state-url", self.state_url]
        return argv

    def is_me(self, health: dict[str, Any]) -> bool:
        return bool(health.get("worker") == self.worker_id)


@dataclass
class ControlCenterProc(ServiceProc):
    """One control center process."""

    state_url: str | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "provisioning.cli.main", "serve", "control-center"]
        argv += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        if self.state_url:
            argv += ["--state-url", self.state_url]
        return argv


class WorkerPool:
    """The workers of one test; :meth:`close` kills them and every process they started."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.marker = uuid.uuid4().hex
        self.workers: list[ServiceProc] = []

    def add(self, worker_id: str, **kw: Any) -> Worker:
        w = Worker(worker_id, self.tmp_path / f"data-{worker_id}", self.marker, **kw)
        self.workers.append(w)
        return w

    def add_control_center(self, name: str = "control-center", **kw: Any) -> ControlCenterProc:
        cc = ControlCenterProc(name, self.tmp_path / f"data-{name}", self.marker, **kw)
        self.workers.append(cc)
        return cc

    def leftovers(self) -> list[int]:
        return pids_with_env(f"{MARKER_ENV}={self.marker}")

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        # Task process groups outlive a killed worker: hunt them down by the marker, bounded.
        deadline = time.monotonic() + 10
        for _ in range(100):
            pids = self.leftovers()
            if not pids or time.monotonic() > deadline:
                break
            _kill_pids(pids)
            time.sleep(0.05)
        # Shown by pytest only when the test failed.
        for w in self.workers:
            print(f"----- log of {w.name} ({w.lives} lives)\n{w.log_tail(200)}")


def get_workflow(url: str, wf_id: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/workflows/{wf_id}", timeout=10.0)
    r.raise_for_status()
    doc: dict[str, Any] = r.json()["data"]
    return doc


def submit(url: str, spec: dict[str, Any]) -> str:
    r = httpx.post(f"{url}/workflows", json=spec, timeout=30.0)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["success"] is True, body
    return str(body["data"]["id"])


def wait_workflow(worker: Worker, wf_id: str, timeout: float, note: str = "") -> dict[str, Any]:
    """Poll the workflow until it ends; fail with its state and the worker's log otherwise."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert worker.proc is not None and worker.proc.poll() is None, (
            f"worker {worker.worker_id} died {note}:\n{worker.log_tail()}"
        )
        try:
            doc = get_workflow(worker.url, wf_id)
        except httpx.HTTPError:
            doc = doc or {}
        else:
            if doc["status"] in TERMINAL:
                return doc
        time.sleep(0.2)
    raise AssertionError(
        f"workflow {wf_id} still {doc.get('status')} ({doc.get('task_counts')}) after "
        f"{timeout}s {note}:\n{worker.log_tail()}"
    )
