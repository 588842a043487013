"""Benchmark: the audit mirror's signed commits per second by batch size, and the time
``prvng audit verify`` takes on the repository made.

``GitMirror.mirror`` is handed the same N audit events (the ops-controller's event shape, one
UTC day, as the stream delivers them) one per call — the baseline — then in batches of 10 and
100, each into a fresh repository and state dir in the same run (rounds interleaved, median).
Every call is durable on return (pack, ref, index, checkpoint fsynced), so batches share that
fixed cost. Then ``verify_repo`` (what ``prvng audit verify --repo`` runs: ``git`` and
``ssh-keygen`` check every commit's signature, the history, the event files and the
checkpoint) checks each repository of the last round.

    .venv/bin/python bench/audit_mirror.py [--events 1000] [--batches 1,10,100] [--rounds 3]
        [--tmpdir DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from provisioning.audit_mirror import GitMirror, verify_repo

DAY = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


def make_events(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        jti = str(uuid.uuid4())
        out.append(
            {
                "id": str(uuid.uuid4()),
                "ts": (DAY + timedelta(seconds=i)).isoformat().replace("+00:00", "Z"),
                "action": "ops:dispatch",
                "result": "success",
                "actor": "ops-controller",
                "actor_type": "system",
                "object_type": "Operation",
                "object_id": jti,
                "service": "ops-controller",
                "details": {
                    "op_type": "workflow.submit",
                    "target": f"dev/web-{i % 50:02d}",
                    "requester": "5f0c7a8e-2d1b-4b51-9d0e-6c1b2f3a4d5e",
                    "outcome": {"workflow_id": str(uuid.uuid4()), "created": True},
                    "reason": None,
                },
            }
        )
    return out


def mirror_rate(repo: Path, state: Path, events: list[dict[str, Any]], batch: int) -> float:
    """Mirror ``events`` into a new repository in calls of ``batch``; answer commits/s."""
    with GitMirror(repo, state) as mirror:
        t0 = time.perf_counter()
        for i in range(0, len(events), batch):
            mirror.mirror(events[i : i + batch])
        elapsed = time.perf_counter() - t0
        if mirror.count != len(events):
            raise SystemExit(f"{repo}: {mirror.count} events mirrored, not {len(events)}")
    return len(events) / elapsed


def verify_time(repo: Path, state: Path, n: int) -> float:
    """Seconds ``verify_repo`` (``prvng audit verify --repo``) takes; it must find all good."""
    t0 = time.perf_counter()
    report = verify_repo(repo, state / "allowed_signers", state / "checkpoint.json")
    elapsed = time.perf_counter() - t0
    if not report.ok or report.checked != n:
        raise SystemExit(f"verify failed on {repo}: {report.to_dict()}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=1000, help="events mirrored per batch size")
    ap.add_argument("--batches", default="1,10,100", help="batch sizes; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=3, help="median of; verify runs on the last")
    ap.add_argument("--tmpdir", default=None, help="where the temporary repositories go")
    args = ap.parse_args()
    sizes = [int(s) for s in args.batches.split(",")]
    events = make_events(args.events)
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    verify: dict[int, float] = {}
    packs: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="prvng-bench-mirror-", dir=args.tmpdir) as tmp:
        for r in range(args.rounds):
            for size in sizes:  # interleaved, so drift hits every batch size alike
                repo, state = Path(tmp) / f"repo-{r}-{size}.git", Path(tmp) / f"state-{r}-{size}"
                rates[size].append(mirror_rate(repo, state, events, size))
                if r == args.rounds - 1:
                    packs[size] = len(list((repo / "objects" / "pack").glob("*.pack")))
                    verify[size] = verify_time(repo, state, len(events))
    print(
        f"audit mirror: {args.events} events per batch size, one UTC day, median of "
        f"{args.rounds} rounds, temp dir under {args.tmpdir or tempfile.gettempdir()}, "
        f"{os.cpu_count()} cores"
    )
    base = statistics.median(rates[sizes[0]])
    for size in sizes:
        rate = statistics.median(rates[size])
        print(
            f"batch {size:>4}: {rate:8.1f} commits/s  ratio {rate / base:6.2f}  "
            f"(range {min(rates[size]):.0f}-{max(rates[size]):.0f}, {packs[size]} packs after) | "
            f"verify {verify[size]:6.2f} s = {args.events / verify[size]:6.1f} commits/s"
        )


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # temp dir removed as on Ctrl-C
    main()
