"""A stand-in for the audit-mirror's NATS consumer, for the ``kill -9`` test.

It reads events (JSON lines) from ``--feed`` as they are appended, skips those whose id is in
``--acks``, mirrors the rest in batches of random size and appends their ids to ``--acks`` only
after :meth:`GitMirror.mirror` returned: an ack after the commit, as the consumer acks NATS.
Killed at any moment and started again, it redelivers everything not acked (at-least-once).
It writes its pid to ``--ready`` once the mirror is open and exits 0 when ``--done`` exists and
every fed event is acked.

Run: ``python tests/e2e/audit_mirror_driver.py --repo R --state S --feed F --acks A --ready Y
--done D [--seed N] [--max-batch N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from provisioning.audit_mirror import GitMirror


def complete_lines(path: Path) -> list[str]:
    """The lines of ``path`` that end in a newline (a line being appended is not there yet)."""
    try:
        return path.read_text(encoding="utf-8").split("\n")[:-1]
    except FileNotFoundError:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("repo", "state", "feed", "acks", "ready", "done"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rng = random.Random(args.seed)
    acked = set(complete_lines(args.acks))
    with GitMirror(args.repo, args.state) as mirror:
        args.ready.write_text(str(os.getpid()), encoding="utf-8")
        fed = 0
        pending: list[dict[str, Any]] = []
        while True:
            lines = complete_lines(args.feed)
            pending += [e for e in map(json.loads, lines[fed:]) if e["id"] not in acked]
            fed = len(lines)
            if not pending:
                if args.done.exists() and len(complete_lines(args.feed)) == fed:
                    return 0
                time.sleep(0.005)  # poll the feed, as a consumer polls its stream
                continue
            size = rng.randint(1, args.max_batch)
            batch, pending = pending[:size], pending[size:]
            mirror.mirror(batch)
            with args.acks.open("a", encoding="utf-8") as acks:
                acks.write("".join(event["id"] + "\n" for event in batch))
            acked.update(event["id"] for event in batch)


if __name__ == "__main__":
    sys.exit(main())
