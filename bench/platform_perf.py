"""Benchmark: the platform-level targets of issue 7, in one run.

1. The 1,000-task layered DAG (``bench/orchestrator_dag.py``'s shape, tasks ``["true"]``
   subprocesses) through ONE and through TWO ``prvng serve orchestrator`` worker processes on
   the same fresh PostgreSQL database: tasks/s from the ``POST /workflows`` to Completed, and
   the ratio two / one (target >= 1.6). The baseline (one worker) runs in the same process,
   rounds interleaved.
2. ``prvng platform start --background`` in a fresh temp data dir (free ports in
   ``config/platform.ncl``) until every service's ``/health`` answers (and nats-server accepts
   a connection): cold (first start) and warm (second start on the same data dir). Target < 3 s.
3. Idle RSS of the embedded platform: the platform process plus its process tree (nats-server)
   after ~5 s idle, psutil. Target < 300 MB.

Figures under load understate: the load average (``os.getloadavg``) is printed with each.

    .venv/bin/python bench/platform_perf.py [--state-url postgresql://...] [--layers 10]
        [--width 100] [--parallel 16] [--rounds 3] [--poll-interval 0.1] [--idle 5]

Without ``--state-url`` a scratch database is created per DAG run on the PostgreSQL at
``127.0.0.1:5432`` (user postgres; ``--pg-admin`` to change) and dropped afterwards. With it,
every run uses that database (not dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform as pyplatform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

TERMINAL = {"Completed", "Failed", "Cancelled", "RolledBack"}
CLI = [sys.executable, "-m", "provisioning.cli.main"]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRVNG_")}
    env.update(extra)
    return env


def layered_dag(layers: int, width: int) -> dict[str, Any]:
    tasks = []
    for layer in range(layers):
        for i in range(width):
            task: dict[str, Any] = {
                "name": f"t{layer}-{i}",
                "command": ["true"],
                "retry": {"max_attempts": 1},
            }
            if layer:
                task["depends_on"] = [f"t{layer - 1}-{i}", f"t{layer - 1}-{(i + 1) % width}"]
            tasks.append(task)
    return {"name": f"bench-{layers}x{width}", "tasks": tasks}


def stop_proc(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------- 1. DAG, one vs two workers


class PgScratch:
    """Scratch databases on a PostgreSQL server, all dropped by :meth:`drop_all`."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.made: list[str] = []

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create(self) -> str:
        name = f"prvng_bench_{uuid.uuid4().hex[:12]}"
        self.made.append(name)
        await self._admin(f'CREATE DATABASE "{name}"')
        return f"{self.admin_dsn.rsplit('/', 1)[0]}/{name}"

    async def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        with contextlib.suppress(ValueError):
            self.made.remove(name)

    async def drop_all(self) -> None:
        for name in list(self.made):
            with contextlib.suppress(Exception):
                await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self.made.remove(name)


@contextlib.contextmanager
def workers(
    n: int, state_url: str, root: Path, parallel: int, poll: float
) -> Iterator[list[tuple[str, str, subprocess.Popen[bytes]]]]:
    """``n`` orchestrator worker processes on ``state_url``, healthy; (id, url, proc)."""
    started: list[tuple[str, str, subprocess.Popen[bytes]]] = []
    env = clean_env(
        PRVNG_ORCHESTRATOR__AUTH="disabled",
        PRVNG_ORCHESTRATOR__POLL_INTERVAL_S=str(poll),
        PRVNG_ORCHESTRATOR__MAX_TASKS="100000",
        PRVNG_LOG__LEVEL="warning",
    )
    try:
        for i in range(1, n + 1):
            wid, port = f"w{i}", free_port()
            data = root / f"data-{wid}"
            data.mkdir(parents=True)
            argv = [*CLI, "serve", "orchestrator", "--state-url", state_url]
            argv += ["--worker-id", wid, "--port", str(port), "--data-dir", str(data)]
            argv += ["--max-parallel", str(parallel)]
            with (root / f"{wid}.log").open("ab") as out:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
                )
            started.append((wid, f"http://127.0.0.1:{port}", proc))
        for wid, url, proc in started:
            wait_http(f"{url}/health", proc, root / f"{wid}.log", 60)
        yield started
    finally:
        for _, _, proc in started:
            stop_proc(proc)


def wait_http(url: str, proc: subprocess.Popen[bytes] | None, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.02)
    raise RuntimeError(f"{url} not healthy within {timeout}s")


def _cpu(proc: psutil.Process, children: bool) -> float:
    """CPU seconds of the process (``children``: of its reaped children instead)."""
    with contextlib.suppress(psutil.Error):
        t = proc.cpu_times()
        return t.children_user + t.children_system if children else t.user + t.system
    return 0.0


def cpu_snapshot(worker_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of the workers (their own, and their tasks' subprocesses once
    reaped), of PostgreSQL (every ``postgres`` process, plus what the postmaster reaped of its
    exited backends) and of the whole machine (busy and all)."""
    workers_own = sum(_cpu(psutil.Process(pid), False) for pid in worker_pids)
    tasks = sum(_cpu(psutil.Process(pid), True) for pid in worker_pids)
    pg = 0.0
    for p in psutil.process_iter(["name", "ppid"]):
        if p.info["name"] == "postgres":
            pg += _cpu(p, False)
            if p.info["ppid"] == 1 or (p.info["ppid"] and _name(p.info["ppid"]) != "postgres"):
                pg += _cpu(p, True)  # the postmaster: its exited backends
    total = psutil.cpu_times()
    busy = sum(total) - total.idle - getattr(total, "iowait", 0.0)
    return {"workers": workers_own, "tasks": tasks, "pg": pg, "busy": busy}


def _name(pid: int) -> str:
    try:
        return str(psutil.Process(pid).name())
    except psutil.Error:
        return ""


async def run_dag(
    n_workers: int, state_url: str, root: Path, spec: dict[str, Any], parallel: int, poll: float
) -> tuple[float, dict[str, int], dict[str, float]]:
    """Seconds from POST /workflows to Completed, attempts per worker, and CPU seconds spent
    meanwhile (``cpu_snapshot``'s keys)."""
    with workers(n_workers, state_url, root, parallel, poll) as ws:
        dsn = state_url.replace("postgresql+asyncpg://", "postgresql://")
        conn = await asyncpg.connect(dsn)
        pids = [proc.pid for _, _, proc in ws]
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                cpu0 = cpu_snapshot(pids)
                t0 = time.perf_counter()
                r = await http.post(f"{ws[0][1]}/workflows", json=spec)
                r.raise_for_status()
                wf_id = r.json()["data"]["id"]
                deadline = time.monotonic() + 600
                while True:  # a cheap poll on the database, not the 1,000-task API document
                    status = await conn.fetchval(
                        "SELECT status FROM orch_workflows WHERE id = $1", wf_id
                    )
                    if status in TERMINAL:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"workflow still {status} after 600 s")
                    await asyncio.sleep(0.02)
                elapsed = time.perf_counter() - t0
                cpu1 = cpu_snapshot(pids)
            if status != "Completed":
                raise RuntimeError(f"workflow ended {status}")
            rows = await conn.fetch(
                "SELECT a.worker, count(*) AS n FROM orch_attempts a "
                "JOIN orch_tasks t ON t.id = a.task_id WHERE t.workflow_id = $1 "
                "GROUP BY a.worker",
                wf_id,
            )
        finally:
            await conn.close()
    spent = {k: cpu1[k] - cpu0[k] for k in cpu0}
    return elapsed, {str(r["worker"]): int(r["n"]) for r in rows}, spent


async def bench_dag(args: argparse.Namespace, root: Path, pg: PgScratch) -> dict[str, Any]:
    spec = layered_dag(args.layers, args.width)
    n = args.layers * args.width
    times: dict[int, list[float]] = {1: [], 2: []}
    loads: list[str] = []
    split: dict[str, int] = {}
    cpus: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for r in range(args.rounds):
        for k in (1, 2) if r % 2 == 0 else (2, 1):  # alternate the order across rounds
            url = args.state_url or await pg.create()
            try:
                before = load()
                el, per, spent = await run_dag(
                    k, url, root / f"dag-{r}-{k}", spec, args.parallel, args.poll_interval
                )
            finally:
                if not args.state_url:
                    await pg.drop(url)
            times[k].append(el)
            loads.append(before)
            if k == 2:
                split = per
            cpus[k].append(spent)
            ms = {key: v * 1000 / n for key, v in spent.items()}
            print(
                f"  round {r + 1} {k} worker(s): {el:6.2f} s  {n / el:7.1f} tasks/s  {per}  "
                f"({before})\n      CPU per task: worker(s) {ms['workers']:.2f} ms, their "
                f"`true` subprocesses {ms['tasks']:.2f} ms, PostgreSQL {ms['pg']:.2f} ms; "
                f"machine busy {spent['busy'] / el:.2f} of {os.cpu_count()} cores",
                flush=True,
            )
    one = n / statistics.median(times[1])
    two = n / statistics.median(times[2])
    # The two runs of a round are adjacent in time, so their ratio sees about the same load.
    paired = [a / b for a, b in zip(times[1], times[2], strict=True)]
    return {
        "one": one,
        "two": two,
        "ratio": two / one,
        "paired": paired,
        "split": split,
        "loads": loads,
        "cpus": cpus,
    }


# ---------------------------------------------------------------- 2-3. platform start, RSS


def prvng(data: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = clean_env(XDG_CONFIG_HOME=str(data.parent / "config-home"))
    return subprocess.run(
        [*CLI, "--data-dir", str(data), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def platform_pid(data: Path) -> int | None:
    try:
        return int((data / "run" / "platform.pid").read_text("utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def service_urls(data: Path) -> dict[str, str]:
    lines = (data / "run" / "platform.pid").read_text("utf-8").splitlines()[1:]
    return {name: url.strip() for name, _, url in (ln.partition(" ") for ln in lines) if url}


def healthy(name: str, url: str) -> bool:
    if name == "nats":  # no HTTP monitor: it is up when it accepts a connection
        for server in url.split(","):
            host, _, port = server.replace("nats://", "").rpartition(":")
            try:
                with socket.create_connection((host, int(port)), timeout=1):
                    pass
            except OSError:
                return False
        return True
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_platform(data: Path, port: int) -> tuple[float, float, dict[str, float]]:
    """Seconds until `platform start --background` returned, until all services were healthy,
    and when (seconds from the start) each became healthy."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*CLI, "--data-dir", str(data), "platform", "start", "--background", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=clean_env(XDG_CONFIG_HOME=str(data.parent / "config-home")),
    )
    pending: dict[str, str] = {}
    seen: dict[str, float] = {}
    cli_done: float | None = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if cli_done is None and proc.poll() is not None:
            cli_done = time.perf_counter() - t0
            if proc.returncode != 0:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise RuntimeError(f"platform start failed:\n{out}")
        if not pending and platform_pid(data) is not None:
            with contextlib.suppress(OSError):
                pending = {k: v for k, v in service_urls(data).items() if k not in seen}
        for name, url in list(pending.items()):
            if healthy(name, url):
                seen[name] = time.perf_counter() - t0
                del pending[name]
        if seen and not pending and cli_done is not None:
            return cli_done, max(seen.values()), seen
        time.sleep(0.01)
    raise RuntimeError(f"platform not healthy within 90 s: still {sorted(pending)}")


def tree_rss(pid: int) -> tuple[float, list[tuple[str, int, float]]]:
    """Sum of RSS (MiB) of ``pid`` and its descendants, and each (name, pid, MiB)."""
    root = psutil.Process(pid)
    parts = []
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            name = p.name()
            if name.startswith("python"):
                name = "platform process (python)"
            parts.append((name, p.pid, p.memory_info().rss / 2**20))
    return sum(x[2] for x in parts), parts


def stop_platform(data: Path) -> None:
    pid = platform_pid(data)
    kids: list[psutil.Process] = []
    if pid is not None and psutil.pid_exists(pid):
        with contextlib.suppress(psutil.Error):
            kids = psutil.Process(pid).children(recursive=True)
    with contextlib.suppress(Exception):
        prvng(data, "platform", "stop", "--timeout", "20", timeout=60)
    for p in ([psutil.Process(pid)] if pid and psutil.pid_exists(pid) else []) + kids:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.send_signal(signal.SIGKILL)


def bench_platform(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cold: list[float] = []
    warm: list[float] = []
    cold_cli: list[float] = []
    warm_cli: list[float] = []
    rss: list[float] = []
    loads: list[str] = []
    last_parts: list[tuple[str, int, float]] = []
    last_seen: dict[str, float] = {}
    for r in range(args.rounds):
        data = root / f"plat-{r}" / "data"
        (data / "config").mkdir(parents=True)
        ports = {k: free_port() for k in ("cc", "nats", "keeper", "ctl", "mirror", "orch")}
        (data / "config" / "platform.ncl").write_text(
            f"{{ control_center = {{ port = {ports['cc']} }}, nats = {{ port = {ports['nats']} }}, "
            f"ops_keeper = {{ port = {ports['keeper']} }}, "
            f"ops_controller = {{ port = {ports['ctl']} }}, "
            f"audit_mirror = {{ port = {ports['mirror']} }} }}\n",
            encoding="utf-8",
        )
        try:
            before = load()
            cli, allh, _ = start_platform(data, ports["orch"])
            cold.append(allh)
            cold_cli.append(cli)
            stop_platform(data)
            before_w = load()
            cli, allh, last_seen = start_platform(data, ports["orch"])
            warm.append(allh)
            warm_cli.append(cli)
            time.sleep(args.idle)
            pid = platform_pid(data)
            assert pid is not None
            total, last_parts = tree_rss(pid)
            rss.append(total)
            after = load()
        finally:
            stop_platform(data)
        loads += [before, before_w, after]
        print(
            f"  round {r + 1}: cold {cold[-1]:.2f} s (CLI returned {cold_cli[-1]:.2f}) ({before}); "
            f"warm {warm[-1]:.2f} s (CLI {warm_cli[-1]:.2f}) ({before_w}); "
            f"idle RSS {total:.1f} MiB ({after})",
            flush=True,
        )
    return {
        "cold": statistics.median(cold),
        "warm": statistics.median(warm),
        "cold_cli": statistics.median(cold_cli),
        "warm_cli": statistics.median(warm_cli),
        "rss": statistics.median(rss),
        "parts": last_parts,
        "seen": last_seen,
        "loads": loads,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--state-url", default="", help="PostgreSQL URL; default: scratch databases")
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=16, help="max_parallel of each worker")
    ap.add_argument("--poll-interval", type=float, default=0.1, help="of each worker, seconds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds idle before the RSS")
    ap.add_argument("--skip-dag", action="store_true")
    ap.add_argument("--skip-platform", action="store_true")
    args = ap.parse_args()
    if not shutil.which("true"):
        sys.exit("`true` is not on PATH")
    n = args.layers * args.width
    print(
        f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"CPython {pyplatform.python_version()}, {load()} at start; "
        f"median of {args.rounds} rounds",
        flush=True,
    )
    pg = PgScratch(args.pg_admin)
    dag: dict[str, Any] | None = None
    plat: dict[str, Any] | None = None
    tmp = tempfile.mkdtemp(prefix="prvng-bench-platform-")
    try:
        root = Path(tmp)
        if not args.skip_dag:
            print(
                f"DAG: {args.layers} x {args.width} = {n} `true` tasks, max_parallel "
                f"{args.parallel} per worker, poll {args.poll_interval} s, PostgreSQL",
                flush=True,
            )
            dag = await bench_dag(args, root, pg)
        if not args.skip_platform:
            print("platform start --background, fresh data dir (cold) then again (warm)")
            plat = await asyncio.to_thread(bench_platform, args, root)
    finally:
        await pg.drop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    rows: list[tuple[str, str, str, bool]] = []
    if dag is not None:
        print(
            f"\nDAG, tasks/s submission -> Completed: one worker {dag['one']:.1f}, "
            f"two workers {dag['two']:.1f} (last split {dag['split']})"
        )
        print("  per-round ratios two / one: " + ", ".join(f"{x:.2f}" for x in dag["paired"]))
        print(f"  loads: {', '.join(dag['loads'])}")
        n = args.layers * args.width
        cores = os.cpu_count() or 1
        for k in (1, 2):
            busy = statistics.median(c["busy"] for c in dag["cpus"][k]) / n  # s per task
            own = statistics.median(c["workers"] for c in dag["cpus"][k]) / n
            print(
                f"  {k} worker(s): the machine spent {busy * 1000:.2f} ms of CPU per task "
                f"(the worker processes themselves {own * 1000:.2f} ms): at most "
                f"{cores / busy:.0f} tasks/s on {cores} cores if CPU is the limit"
            )
        rows.append(
            (
                "DAG two / one, ratio of medians",
                f"{dag['ratio']:.2f}x",
                ">= 1.6x",
                dag["ratio"] >= 1.6,
            )
        )
        mp = statistics.median(dag["paired"])
        rows.append(("DAG two / one, median round ratio", f"{mp:.2f}x", ">= 1.6x", mp >= 1.6))
    if plat is not None:
        print(
            f"\nplatform: CLI returned cold {plat['cold_cli']:.2f} s, warm {plat['warm_cli']:.2f} s"
        )
        print(
            "  healthy at (warm, last round): "
            + ", ".join(
                f"{k} {v:.2f}s" for k, v in sorted(plat["seen"].items(), key=lambda kv: kv[1])
            )
        )
        print(
            "  RSS by process (last round): "
            + ", ".join(f"{name} [{pid}] {mib:.1f} MiB" for name, pid, mib in plat["parts"])
        )
        print(f"  loads: {', '.join(plat['loads'])}")
        rows.append(
            ("start -> all healthy, cold", f"{plat['cold']:.2f} s", "< 3 s", plat["cold"] < 3)
        )
        rows.append(
            ("start -> all healthy, warm", f"{plat['warm']:.2f} s", "< 3 s", plat["warm"] < 3)
        )
        rows.append(
            (
                "idle RSS, platform + nats-server",
                f"{plat['rss']:.1f} MiB ({plat['rss'] * 2**20 / 1e6:.0f} MB)",
                "< 300 MB",
                plat["rss"] * 2**20 / 1e6 < 300,
            )
        )
    print(f"\n{'measure':<36} {'median':>20} {'target':>10}  result   ({load()} at end)")
    for name, value, target, ok in rows:
        print(f"{name:<36} {value:>20} {target:>10}  {'PASS' if ok else 'MISS'}")


if __name__ == "__main__":
    asyncio.run(main())
