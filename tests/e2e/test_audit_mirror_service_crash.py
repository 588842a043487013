"""``kill -9`` of the audit-mirror *service* (`prvng serve audit-mirror`, its own process on a
real nats-server) at random moments while 500 audit events are published: exactly one signed
commit per event, nothing missing, ``git fsck --strict`` clean, the repository verifies.

Unlike ``test_audit_mirror_crash.py`` (the library under a stand-in consumer), this is the
service as deployed: the durable pull consumer ``audit-mirror`` on ``OPS_AUDIT``, acks after
the commit, redelivery by JetStream (a short ``nats.ack_wait_s``) of whatever a killed process
held. Each event is published on ``ops.audit.completed`` with ``Nats-Msg-Id`` = its id; a few
are published again later under another msg id (a re-publish after the duplicate window), so
the stream itself carries duplicates the mirror must skip. Each life of the mirror gets a
random ``audit_mirror.batch`` (1 … 100), so kills land in small and large commits. Kills land
during start-up (index reconciliation), just after a chunk of events arrived, and at random.
Set ``PRVNG_E2E_SEED`` to replay a failing seed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from provisioning.audit_mirror import verify_repo
from provisioning.core.bus.nats import NatsBus, bus_for
from provisioning.core.settings import load_settings
from provisioning.platform.nats_server import EmbeddedNats
from tests.conftest import free_port
from tests.e2e.procs import ServiceProc, WorkerPool

EVENTS = 500
REPUBLISHED = 20  # events published a second time under another Nats-Msg-Id
KILLS = 10
ACK_WAIT_S = 4


def _seed() -> int:
    return int(os.environ.get("PRVNG_E2E_SEED") or random.SystemRandom().randrange(2**32))


@dataclass
class MirrorProc(ServiceProc):
    """``prvng serve audit-mirror`` on a data dir, consuming the given NATS."""

    nats_url: str = ""

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "provisioning.cli.main", "serve", "audit-mirror"]
        argv += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        return [*argv, "--nats-url", self.nats_url]

    def is_me(self, health: dict[str, Any]) -> bool:
        return health.get("service") == "audit-mirror"


def _events(rng: random.Random) -> list[dict[str, Any]]:
    """500 events over three days (the shape of ``make_events`` in the integration tests)."""
    return [
        {
            "id": str(uuid.uuid4()),
            "ts": f"2025-06-{10 + i * 3 // EVENTS:02d}T{i % 24:02d}:{i % 60:02d}:00.123456Z",
            "action": rng.choice(["ops:dispatch", "ops:approve", "ops:verify"]),
            "actor": rng.choice(["ops-controller", "ana", "système"]),
            "object_type": "Operation",
            "object_id": f"op-{i}",
            "result": "success",
            "service": "ops-controller",
            "details": {"n": i, "note": "größe ✓", "nested": {"b": 1, "a": [1, 2]}},
        }
        for i in range(EVENTS)
    ]


class Publisher:
    """Publishes the feed in chunks of random size at a random pace."""

    def __init__(self, bus: NatsBus, feed: list[tuple[str, dict[str, Any]]], seed: int) -> None:
        self.bus, self.feed = bus, feed
        self.rng = random.Random(seed)
        self.sent = 0
        self.chunk_started = asyncio.Event()

    async def run(self) -> None:
        while self.sent < len(self.feed):
            size = self.rng.randint(1, 40)
            self.chunk_started.set()
            for msg_id, event in self.feed[self.sent : self.sent + size]:
                data = json.dumps(event, ensure_ascii=False).encode()
                await self.bus.publish("ops.audit.completed", data, msg_id=msg_id)
                self.sent += 1
            self.chunk_started.clear()
            if self.sent < len(self.feed):
                await asyncio.sleep(self.rng.uniform(0.0, 1.6))


async def _backlog(bus: NatsBus) -> tuple[int, int]:
    """``(num_pending, num_ack_pending)`` of the durable ``audit-mirror``."""
    info = await bus.js.consumer_info("OPS_AUDIT", "audit-mirror")
    return int(info.num_pending or 0), int(info.num_ack_pending or 0)


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", f"--git-dir={repo}", *args], capture_output=True, text=True, timeout=120
    )


def _blobs(repo: Path, revs: list[str]) -> list[bytes]:
    """The contents of ``revs`` through one ``git cat-file --batch``."""
    out = subprocess.run(
        ["git", f"--git-dir={repo}", "cat-file", "--batch"],
        input="".join(f"{r}\n" for r in revs).encode(),
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout
    blobs, at = [], 0
    for rev in revs:
        end = out.index(b"\n", at)
        header = out[at:end].split()
        assert len(header) == 3 and header[1] == b"blob", (rev, header)
        size = int(header[2])
        blobs.append(out[end + 1 : end + 1 + size])
        at = end + 1 + size + 1
    return blobs


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_kill_9_of_the_audit_mirror_service_leaves_one_signed_commit_per_event(
    tmp_path: Path,
) -> None:
    seed = _seed()
    rng = random.Random(seed)
    ctx = f"seed={seed} (replay with PRVNG_E2E_SEED={seed})"
    print(ctx)
    t0 = time.monotonic()
    home = tmp_path / "home"
    (home / "config").mkdir(parents=True)
    # The mirror reads the same file: its consumer must keep the short ack wait (its `ensure`
    # at start re-applies the consumer's configuration).
    (home / "config" / "platform.ncl").write_text(
        f"{{ nats = {{ port = {free_port()}, ack_wait_s = {ACK_WAIT_S} }} }}\n", encoding="utf-8"
    )
    settings = load_settings(home=home, env={})
    events = _events(rng)
    feed = [(e["id"], e) for e in events]
    for e in rng.sample(events, REPUBLISHED):
        at = rng.randrange(feed.index((e["id"], e)) + 1, len(feed) + 1)
        feed.insert(at, (f"{e['id']}-again", e))

    nats = EmbeddedNats(settings)
    await nats.start()
    bus = bus_for(settings, name="audit-crash-test")
    pool = WorkerPool(tmp_path)
    mirror = MirrorProc("audit-mirror", home, pool.marker, nats_url=nats.url)
    pool.workers.append(mirror)
    publisher: asyncio.Task[None] | None = None
    kills = kills_mid_batch = 0
    batches: list[int] = []
    try:
        await bus.connect()
        await bus.ensure()

        def start() -> None:
            batches.append(rng.choice([1, 3, 10, 40, 100]))
            mirror.env["PRVNG_AUDIT_MIRROR__BATCH"] = str(batches[-1])
            mirror.start()

        start()
        await asyncio.to_thread(mirror.wait_healthy, 60)
        pub = Publisher(bus, feed, rng.randrange(2**32))
        publisher = asyncio.create_task(pub.run())
        t_flow = time.monotonic()
        deadline = t_flow + 150  # a restart is a Python start-up: seconds on a loaded machine
        while kills < KILLS:
            assert time.monotonic() < deadline, f"{ctx}: only {kills} kills in time"
            assert not publisher.done() or publisher.exception() is None, ctx
            mode = rng.random()
            if kills_mid_batch < 3 and kills >= KILLS - 3 and not publisher.done():
                # Behind on kills that took unacked events with them: kill the moment the
                # mirror holds some (a random pause after a chunk started can land after a
                # fast commit, and did), bounded in time.
                await asyncio.to_thread(mirror.wait_healthy, 60)
                aim_until = time.monotonic() + 20
                while (
                    (await _backlog(bus))[1] == 0
                    and not publisher.done()
                    and time.monotonic() < aim_until
                ):
                    await asyncio.sleep(0.005)
            elif mode < 0.25:
                # Somewhere in start-up: imports, key, repository open, index reconciliation.
                await asyncio.sleep(rng.uniform(0.0, 2.0))
            else:
                await asyncio.to_thread(mirror.wait_healthy, 60)
                if mode < 0.7 and not publisher.done():
                    # While it commits a chunk being published (if one still comes).
                    started = asyncio.ensure_future(pub.chunk_started.wait())
                    await asyncio.wait(
                        {started, publisher}, timeout=30, return_when=asyncio.FIRST_COMPLETED
                    )
                    started.cancel()
                    await asyncio.sleep(rng.uniform(0.0, 0.15))
                else:
                    await asyncio.sleep(rng.uniform(0.0, 1.0))
            mirror.kill9()
            kills += 1
            kills_mid_batch += (await _backlog(bus))[1] > 0  # it held unacked events
            start()
        t_kills = time.monotonic() - t_flow
        await asyncio.wait_for(publisher, timeout=max(1.0, deadline - time.monotonic()))
        await asyncio.to_thread(mirror.wait_healthy, 60)

        drain_deadline = time.monotonic() + 60
        backlog = await _backlog(bus)
        while backlog != (0, 0) and time.monotonic() < drain_deadline:
            assert mirror.proc is not None and mirror.proc.poll() is None, (
                f"{ctx}: the mirror died:\n{mirror.log_tail()}"
            )
            await asyncio.sleep(0.3)
            backlog = await _backlog(bus)
        t_drain = time.monotonic() - t_flow - t_kills
        # A graceful stop: the state dir's lock is released and nothing is left running.
        assert mirror.terminate() == 0, f"{ctx}:\n{mirror.log_tail()}"
    finally:
        if publisher is not None and not publisher.done():
            publisher.cancel()
        pool.close()
        await bus.close()
        await nats.stop()

    repo = home / "audit-mirror" / "repo.git"
    state = home / "audit-mirror" / "state"
    ids = {e["id"] for e in events}
    trailers = _git(
        repo, "log", "--format=%(trailers:key=Audit-Event-Id,valueonly,separator=)", "main"
    ).stdout.split()
    counts = Counter(trailers)
    missing = sorted(ids - set(counts))
    twice = {i: n for i, n in counts.items() if n > 1}
    strays = sorted(set(counts) - ids)
    total = _git(repo, "rev-list", "--count", "main").stdout.strip()
    fsck = _git(repo, "fsck", "--full", "--strict", "--no-dangling")
    report = verify_repo(repo, state / "allowed_signers", state / "checkpoint.json")
    log = mirror.log_tail(100000)
    lock_recoveries = log.count("main.lock left by")
    summary = (
        f"{ctx}: {len(feed)} published ({REPUBLISHED} again under another msg id), "
        f"{kills} kills ({kills_mid_batch} holding unacked events, {lock_recoveries} "
        f"leaving the ref lock behind), batch sizes per life "
        f"{batches}, backlog at the end {backlog}, {len(trailers)} commits on main ({total})\n"
        f"missing ({len(missing)}): {missing[:30]}\ncommitted more than once ({len(twice)}): "
        f"{dict(list(twice.items())[:30])}\nnot published: {strays[:30]}\n"
        f"fsck (exit {fsck.returncode}): {(fsck.stdout + fsck.stderr)[-2000:]}\n"
        f"verify: {report}\n--- mirror log (tail)\n{mirror.log_tail(60)}"
    )
    assert kills >= 10, summary
    assert backlog == (0, 0), summary
    assert not missing, summary
    assert not twice, summary
    assert not strays, summary
    assert len(trailers) == EVENTS and total == str(EVENTS), summary
    assert fsck.returncode == 0 and not (fsck.stdout + fsck.stderr).strip(), summary
    assert report.ok, summary
    assert report.checked == EVENTS, summary
    # Every committed file is the event's canonical JSON (what anyone can re-hash).
    by_id = {e["id"]: e for e in events}
    paths = _git(repo, "ls-tree", "-r", "--name-only", "main").stdout.split()
    assert len(paths) == EVENTS, summary
    for path, blob in zip(paths, _blobs(repo, [f"main:{p}" for p in paths]), strict=True):
        event_id = path.rsplit("/", 1)[-1].removesuffix(".json")
        assert json.loads(blob) == by_id[event_id], f"{ctx}: {path}"
    assert kills_mid_batch >= 1, summary  # at least one kill took unacked events with it
    print(
        f"{ctx}: {EVENTS} events, {kills} kills in {t_kills:.1f}s ({kills_mid_batch} holding "
        f"unacked events, {lock_recoveries} leaving the ref lock behind), batches {batches}; "
        f"drained {t_drain:.1f}s after the last kill, "
        f"{time.monotonic() - t0:.1f}s in all"
    )
