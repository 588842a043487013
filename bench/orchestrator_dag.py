"""Benchmark: a 1,000-task layered DAG through the real engine and SQLite store, against a
minimal baseline run in the same process.

The DAG has 10 layers of 100 tasks; every task after the first layer depends on 2 tasks of the
previous layer. Tasks run ``/bin/true``. The baseline is the least a durable DAG runner must do:
an asyncio topological executor that spawns the same processes with the same parallelism and
commits one SQLite row per state change (WAL, same ``synchronous``).

Prints tasks/s of both and the ratio, submission-to-first-process latency, the same DAG with
the builtin in-process ``noop`` action, and the idle RSS of an orchestrator process.

    .venv/bin/python bench/orchestrator_dag.py [--layers 10] [--width 100] [--parallel 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from provisioning.core.settings import load_settings
from provisioning.core.store import open_database
from provisioning.orchestrator.api import WorkflowSpec
from provisioning.orchestrator.engine import Engine
from provisioning.orchestrator.store import WorkflowStore

TRUE = "/bin/true"


def layered_dag(layers: int, width: int, *, noop: bool = False) -> dict[str, Any]:
    tasks = []
    for layer in range(layers):
        for i in range(width):
            task: dict[str, Any] = {"name": f"t{layer}-{i}", "retry": {"max_attempts": 1}}
            if noop:
                task["action"] = "noop"
            else:
                task["command"] = [TRUE]
            if layer:
                task["depends_on"] = [f"t{layer - 1}-{i}", f"t{layer - 1}-{(i + 1) % width}"]
            tasks.append(task)
    return {"name": f"bench-{layers}x{width}", "tasks": tasks}


async def run_engine(spec_doc: dict[str, Any], parallel: int, home: Path, sync: str) -> float:
    settings = load_settings(
        home=home,
        env={},
        overrides={
            "state": {"sqlite_synchronous": sync},
            "orchestrator": {"max_parallel": parallel, "max_tasks": 100000},
        },
    )
    db = open_database(settings.state_url, sqlite_synchronous=sync)
    store = WorkflowStore(db)
    await store.migrate()
    engine = Engine(store, settings.orchestrator, settings.logs_dir, worker_id="bench")
    await engine.start()
    spec = WorkflowSpec.model_validate(spec_doc)
    t0 = time.perf_counter()
    wf_id, _ = await engine.submit(spec)
    while True:  # a cheap poll, so the measuring does not slow what it measures
        status = await store.workflow_status(wf_id)
        if status in ("Completed", "Failed", "RolledBack", "Cancelled"):
            break
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - t0
    assert status == "Completed", status
    await engine.stop()
    await db.close()
    return elapsed


async def run_baseline(
    spec_doc: dict[str, Any], parallel: int, db_path: Path, sync: str, *, spawn: bool
) -> float:
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute("CREATE TABLE state (task TEXT, status TEXT, at REAL)")
    tasks = spec_doc["tasks"]
    deps = {t["name"]: list(t.get("depends_on", [])) for t in tasks}
    dependants: dict[str, list[str]] = {t["name"]: [] for t in tasks}
    for name, ds in deps.items():
        for d in ds:
            dependants[d].append(name)
    remaining = {n: len(ds) for n, ds in deps.items()}
    sem = asyncio.Semaphore(parallel)
    done = asyncio.Event()
    left = len(tasks)
    running: set[asyncio.Task[None]] = set()

    def commit(name: str, status: str) -> None:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO state VALUES (?, ?, ?)", (name, status, time.time()))
        conn.execute("COMMIT")

    async def run(name: str) -> None:
        nonlocal left
        async with sem:
            commit(name, "Running")
            if spawn:
                proc = await asyncio.create_subprocess_exec(TRUE)
                await proc.wait()
            commit(name, "Completed")
        left -= 1
        for d in dependants[name]:
            remaining[d] -= 1
            if remaining[d] == 0:
                start(d)
        if left == 0:
            done.set()

    def start(name: str) -> None:
        commit(name, "Ready")
        t = asyncio.create_task(run(name))
        running.add(t)
        t.add_done_callback(running.discard)

    t0 = time.perf_counter()
    for n, r in remaining.items():
        if r == 0:
            start(n)
    await done.wait()
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


async def first_start_latency(home: Path, sync: str, samples: int) -> list[float]:
    settings = load_settings(home=home, env={}, overrides={"state": {"sqlite_synchronous": sync}})
    db = open_database(settings.state_url, sqlite_synchronous=sync)
    store = WorkflowStore(db)
    await store.migrate()
    engine = Engine(store, settings.orchestrator, settings.logs_dir, worker_id="bench-latency")
    await engine.start()
    out = []
    for i in range(samples):
        marker = home / f"marker-{i}"
        spec = WorkflowSpec.model_validate(
            {
                "name": "latency",
                "tasks": [{"name": "touch", "command": ["/usr/bin/touch", str(marker)]}],
            }
        )
        await asyncio.sleep(0.05)  # let the scheduler go idle, as a real first submission finds it
        t0 = time.time_ns()
        await engine.submit(spec)
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.0005)
        out.append((marker.stat().st_mtime_ns - t0) / 1e6)
    await engine.stop()
    await db.close()
    return out


def idle_rss(home: Path) -> float:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "provisioning.cli.main",
            "serve",
            "orchestrator",
            "--port",
            str(port),
            "--data-dir",
            str(home),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        time.sleep(2)
        return float(psutil.Process(proc.pid).memory_info().rss) / 2**20
    finally:
        proc.terminate()
        proc.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--sync", choices=["NORMAL", "FULL"], default="FULL")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n = args.layers * args.width
    spec = layered_dag(args.layers, args.width)
    noop = layered_dag(args.layers, args.width, noop=True)
    eng, base, eng_noop, base_noop = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for r in range(args.rounds):
            base.append(
                await run_baseline(
                    spec, args.parallel, root / f"base-{r}.db", args.sync, spawn=True
                )
            )
            eng.append(await run_engine(spec, args.parallel, root / f"eng-{r}", args.sync))
            base_noop.append(
                await run_baseline(
                    noop, args.parallel, root / f"bnoop-{r}.db", args.sync, spawn=False
                )
            )
            eng_noop.append(await run_engine(noop, args.parallel, root / f"enoop-{r}", args.sync))
        lat = await first_start_latency(root / "latency", args.sync, 20)
        rss = idle_rss(root / "rss")
    b, e = n / statistics.median(base), n / statistics.median(eng)
    bn, en = n / statistics.median(base_noop), n / statistics.median(eng_noop)
    print(
        f"DAG: {args.layers} layers x {args.width} tasks = {n} tasks, parallel {args.parallel}, "
        f"synchronous={args.sync}, median of {args.rounds} rounds, {os.cpu_count()} cores"
    )
    print(f"/bin/true tasks  baseline    {b:8.1f} tasks/s")
    print(f"/bin/true tasks  orchestrator {e:8.1f} tasks/s   ratio {e / b:.2f}  (aim >= 0.70)")
    print(f"noop tasks       baseline    {bn:8.1f} tasks/s")
    print(f"noop tasks       orchestrator {en:8.1f} tasks/s   ratio {en / bn:.2f}")
    print(
        f"submission -> first task process: median {statistics.median(lat):.1f} ms, "
        f"max {max(lat):.1f} ms over {len(lat)} (aim < 20 ms)"
    )
    print(f"idle RSS of `prvng serve orchestrator`: {rss:.1f} MiB (aim < 120 MiB)")


if __name__ == "__main__":
    asyncio.run(main())
