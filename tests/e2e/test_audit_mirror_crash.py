"""``kill -9`` of the audit-mirror at random moments while 500 events are fed: exactly one signed
commit per event, nothing missing, ``git fsck`` clean, the repository verifies.

The driver (``audit_mirror_driver.py``) acks an event only after ``mirror()`` returned and
redelivers whatever is not acked after each restart; the feed also carries redelivered
duplicates. Kills land during start-up (index reconciliation) and while batches are written.
Set ``PRVNG_E2E_SEED`` to replay a failing seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioning.audit_mirror import verify_repo
from tests.e2e.procs import pids_with_env

EVENTS = 500
KILLS = 14
DRIVER = Path(__file__).with_name("audit_mirror_driver.py")
MARKER_ENV = "PRVNG_E2E_MARKER"


def _seed() -> int:
    return int(os.environ.get("PRVNG_E2E_SEED") or random.SystemRandom().randrange(2**32))


class Driver:
    """The driver process, restartable with the same files; everything it spawned is tagged."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root, self.seed, self.rng = root, seed, random.Random(seed)
        self.feed, self.acks = root / "feed.jsonl", root / "acks.txt"
        self.ready, self.done = root / "ready", root / "done"
        self.log = root / "driver.log"
        self.marker = f"{MARKER_ENV}={uuid.uuid4().hex}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills_in_flight = 0  # kills that landed while fed events were not all acked yet

    def start(self) -> None:
        self.ready.unlink(missing_ok=True)
        argv = [sys.executable, str(DRIVER), "--seed", str(self.rng.randrange(2**32))]
        for name in ("repo", "state"):
            argv += [f"--{name}", str(self.root / name)]
        for name in ("feed", "acks", "ready", "done"):
            argv += [f"--{name}", str(getattr(self, name))]
        env = {**os.environ, MARKER_ENV: self.marker.split("=", 1)[1]}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1

    def wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"driver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready.exists() and self.ready.read_text() == str(self.proc.pid):
                return
            time.sleep(0.01)
        pytest.fail(f"driver not ready in time:\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        lines = self.feed.read_text().splitlines() if self.feed.exists() else []
        fed = {json.loads(line)["id"] for line in lines}
        acked = set(self.acks.read_text().split()) if self.acks.exists() else set()
        self.kills_in_flight += bool(fed - acked)

    def feed_lines(self, lines: list[str]) -> None:
        with self.feed.open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        # A `git repack` the driver started survives its parent's kill -9.
        for pid in pids_with_env(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Driver]:
    d = Driver(tmp_path, _seed())
    try:
        yield d
    finally:
        d.close()


def _events(rng: random.Random) -> tuple[list[dict[str, Any]], list[str]]:
    """500 events over three days, and the feed: every event plus 30 redeliveries."""
    events = [
        {
            "id": str(uuid.uuid4()),
            "ts": f"2025-06-{10 + i * 3 // EVENTS:02d}T{i % 24:02d}:00:00Z",
            "action": rng.choice(["ops:approve", "ops:reject", "auth:login"]),
            "actor": rng.choice(["ana", "bo", "système"]),
            "object_type": "operation",
            "object_id": f"op-{i}",
            "result": "success",
            "service": "ops-keeper",
            "details": {"i": i},
        }
        for i in range(EVENTS)
    ]
    feed = [json.dumps(e) for e in events]
    for _ in range(30):
        at = rng.randrange(1, len(feed))
        feed.insert(rng.randrange(at, len(feed) + 1), feed[rng.randrange(at)])
    return events, feed


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_9_at_random_moments_leaves_exactly_one_signed_commit_per_event(
    driver: Driver,
) -> None:
    rng = driver.rng
    ctx = f"PRVNG_E2E_SEED={driver.seed}"
    events, feed = _events(rng)
    cuts = sorted(rng.sample(range(1, len(feed)), 17))
    chunks = [feed[a:b] for a, b in zip([0, *cuts], [*cuts, len(feed)], strict=True)]
    deadline = time.monotonic() + 110
    kills = 0

    driver.start()
    for chunk in chunks:
        if kills < KILLS and rng.random() < 0.25:
            time.sleep(rng.uniform(0.0, 0.5))  # somewhere in start-up: import, open, reconcile
            driver.kill9()
            kills += 1
            driver.start()
        driver.wait_ready(deadline)
        driver.feed_lines(chunk)
        if kills < KILLS and rng.random() < 0.85:
            # A random moment while it works through the chunk (or just after).
            time.sleep(rng.uniform(0.0, 0.03) if rng.random() < 0.8 else rng.uniform(0.03, 0.3))
            driver.kill9()
            kills += 1
            driver.start()
    while kills < KILLS:
        driver.wait_ready(deadline)
        time.sleep(rng.uniform(0.0, 0.1))
        driver.kill9()
        kills += 1
        driver.start()
    driver.done.touch()
    assert driver.proc is not None
    try:
        rc = driver.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"driver did not finish ({ctx}):\n{driver.log_tail()}")
    assert rc == 0, f"{ctx}\n{driver.log_tail()}"
    assert kills >= 10
    assert driver.kills_in_flight >= 3, ctx  # the kills did land mid-work

    repo, state = driver.root / "repo", driver.root / "state"
    ids = {e["id"] for e in events}
    assert set(driver.acks.read_text(encoding="utf-8").split()) == ids, ctx
    git = ["git", f"--git-dir={repo}"]
    trailers = subprocess.run(
        [*git, "log", "--format=%(trailers:key=Audit-Event-Id,valueonly,separator=)", "main"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    counts = Counter(trailers)
    assert set(counts) == ids, ctx
    assert [i for i, n in counts.items() if n != 1] == [], ctx
    total = subprocess.run([*git, "rev-list", "--count", "main"], capture_output=True, text=True)
    assert int(total.stdout) == EVENTS, ctx
    fsck = subprocess.run([*git, "fsck", "--full", "--strict"], capture_output=True, text=True)
    assert fsck.returncode == 0, f"{ctx}\n{fsck.stdout}{fsck.stderr}"
    assert not [
        line
        for line in (fsck.stdout + fsck.stderr).splitlines()
        if not line.startswith("dangling ")
    ], f"{ctx}\n{fsck.stdout}{fsck.stderr}"

    report = verify_repo(repo, state / "allowed_signers", state / "checkpoint.json")
    assert report.ok, f"{ctx}: {report}"
    assert report.checked == EVENTS
