"""Benchmark: the ops pipeline end to end, in one process on real parts, against the same
workflows submitted straight to the orchestrator in the same run.

The parts are those of ``tests/integration/test_ops_pipeline.py`` (``build_services`` with a
bus): a real embedded nats-server (JetStream, ``sync_interval: always``), the control center
(which records ``ops.audit.>`` in its audit log), the ops-keeper's app (a policy that approves
``dev/*``), the ops-controller (``OpsControllerService``: ``SqlIdempotencyStore`` on the
platform's store, ``HttpDispatcher`` wired to the orchestrator's ASGI app — the bench starts
and stops it itself, wired as ``platform.embedded`` wires it), the audit-mirror committing
``ops.audit.>`` to git (``--no-audit-mirror`` leaves it out) and the orchestrator running the
workflows (one builtin ``noop`` task each). Every request carries the admin's bearer token.

Per round, with ``--ops`` N and ``--concurrency`` C client requests in flight:

* **direct** (the baseline): N ``POST /workflows`` on the orchestrator's app;
* **pipeline**: N ``POST /ops`` on the keeper's app → signed token on ``ops.pending.>`` →
  controller (verify, claim the jti, ``POST /ops/dispatch``, outbox, ack) → workflow;
* **one at a time** (``--one-by-one`` K, both roads): each request sent once the previous
  workflow completed, so the latencies are the pipeline's own, without queueing;
* **controller alone**: N tokens signed beforehand and already on the stream, the controller
  started on them: the time from its start (migration check, reconciliation, consumer bind:
  10-20 ms) until it has acked them all, once with the real dispatcher, once with a
  dispatcher that answers at once (the split between the controller's own cost and
  ``/ops/dispatch``).

``--split`` times each stage of the controller (and of ``/ops/dispatch``) over one more drain
of each kind; ``--profile`` runs one more pipeline phase under cProfile (event-loop thread).

Throughput is N / (first request → last workflow's ``finished_at``); latencies come from the
workflows' own ``created_at`` (dispatched: the workflow exists) and ``finished_at``
(Completed), against the wall-clock time each request was sent. Phases are separated by a
quiet point (every workflow finished, the audit consumers drained); every wait is bounded by
``--timeout``.

    .venv/bin/python bench/ops_pipeline.py [--ops 200] [--concurrency 8] [--rounds 3]
        [--one-by-one 40] [--state-url postgresql://user@host/empty_db] [--sync FULL]
        [--no-audit-mirror] [--split] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import signal
import socket
import statistics
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from provisioning.audit_mirror.app import AuditMirrorService
from provisioning.core.bus.nats import NatsBus, bus_for
from provisioning.core.ops_token import VerifiedOp
from provisioning.core.settings import Settings, load_settings
from provisioning.core.signing import KeyRing
from provisioning.core.store import Database
from provisioning.ops_controller.app import OpsControllerService
from provisioning.ops_controller.controller import OpsController
from provisioning.ops_controller.idempotency_sql import SqlIdempotencyStore
from provisioning.ops_keeper.api import PendingMessage, params_sha256, pending_subject
from provisioning.ops_keeper.app import OpsKeeperService
from provisioning.orchestrator.app import OrchestratorService
from provisioning.orchestrator.tables import workflows
from provisioning.platform.embedded import build_services
from provisioning.platform.nats_server import EmbeddedNats

ADMIN = "bench admin passphrase 1"
POLICY = """{
  policies = [
    { name = "dev", op_types = ["workflow.submit"], targets = ["dev/*"], decision = "approve" },
  ],
}
"""
SPEC: dict[str, Any] = {"name": "bench-op", "tasks": [{"name": "a", "action": "noop"}]}
END = ("Completed", "Failed", "Cancelled", "RolledBack")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BenchFailed(Exception):
    """The run went wrong (a refused request, a wait that timed out); the bench stops cleanly."""


@dataclass
class Phase:
    """One measured run of N ops."""

    rate: float  # ops/s, first request -> last workflow finished
    dispatched_ms: list[float] = field(default_factory=list)
    completed_ms: list[float] = field(default_factory=list)
    answer_ms: list[float] = field(default_factory=list)  # client-side request latency


@dataclass
class Rig:
    settings: Settings
    cc_db: Database
    orch: OrchestratorService
    keeper: OpsKeeperService
    bus: NatsBus
    ring: KeyRing
    orch_http: httpx.AsyncClient
    keeper_http: httpx.AsyncClient
    admin: dict[str, str]
    timeout_s: float
    consumers: tuple[str, ...]  # durables on OPS_AUDIT that must drain before a phase
    ctl: OpsControllerService | None = None

    async def start_controller(self, *, stub: bool = False) -> OpsController:
        """A fresh ops-controller, wired as ``platform.embedded`` wires it (the platform's store,
        ``HttpDispatcher`` on the orchestrator's ASGI app); ``stub``: a dispatcher that answers
        at once instead."""
        await self.stop_controller()
        orch = self.orch

        async def lookup(jti: str) -> dict[str, Any] | None:
            found = await orch.store.find_by_idempotency_key(f"op:{jti}")
            return {"id": found} if found else None

        self.ctl = OpsControllerService(
            self.settings,
            db=self.cc_db,
            bus=self.bus,
            transport=httpx.ASGITransport(app=orch.app),
            lookup=lookup,
        )
        assert isinstance(self.ctl.store, SqlIdempotencyStore)
        if stub:
            self.ctl.controller.dispatcher = InstantDispatcher()
        await self.ctl.start()
        return self.ctl.controller

    async def stop_controller(self) -> None:
        ctl, self.ctl = self.ctl, None
        if ctl is not None:
            await ctl.stop()

    async def until(self, what: str, check: Any, every_s: float = 0.05) -> Any:
        deadline = time.monotonic() + self.timeout_s
        while True:
            got = await check()
            if got:
                return got
            if time.monotonic() > deadline:
                raise BenchFailed(f"gave up after {self.timeout_s:g} s waiting for {what}")
            await asyncio.sleep(every_s)

    async def finished_since(self, since: datetime) -> int:
        q = (
            select(func.count())
            .select_from(workflows)
            .where(workflows.c.created_at >= since, workflows.c.status.in_(END))
        )
        return int(await self.orch.store.db.run_read(lambda c: c.execute(q).scalar_one()))

    async def workflows_since(self, since: datetime, n: int) -> list[dict[str, Any]]:
        return await self.orch.store.list_workflows(since=since, limit=n + 100)

    async def quiet(self) -> None:
        """Every workflow finished and the audit consumers (control center, mirror) drained."""

        async def idle() -> bool:
            running = await self.orch.store.db.run_read(
                lambda c: c.execute(
                    select(func.count())
                    .select_from(workflows)
                    .where(workflows.c.status.not_in(END))
                ).scalar_one()
            )
            if running:
                return False
            for durable in self.consumers:
                info = await self.bus.js.consumer_info("OPS_AUDIT", durable)
                if info.num_pending or info.num_ack_pending:
                    return False
            return True

        await self.until("the platform to go quiet", idle, every_s=0.1)


async def _fan_out(n: int, concurrency: int, one: Any) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def go(i: int) -> None:
        async with sem:
            await one(i)

    await asyncio.gather(*(go(i) for i in range(n)))


def _phase(
    sent: dict[str, float], docs: dict[str, dict[str, Any]], t0: float, ans: list[float]
) -> Phase:
    created = {k: docs[k]["created_at"].timestamp() for k in sent}
    finished = {k: docs[k]["finished_at"].timestamp() for k in sent}
    bad = [docs[k]["status"] for k in sent if docs[k]["status"] != "Completed"]
    if bad:
        raise BenchFailed(f"{len(bad)} workflows did not complete: {sorted(set(bad))}")
    return Phase(
        rate=len(sent) / (max(finished.values()) - t0),
        dispatched_ms=[(created[k] - sent[k]) * 1e3 for k in sent],
        completed_ms=[(finished[k] - sent[k]) * 1e3 for k in sent],
        answer_ms=ans,
    )


async def run_direct(rig: Rig, n: int, concurrency: int, *, one_by_one: bool = False) -> Phase:
    """``one_by_one``: each request sent once the previous workflow finished (concurrency 1)."""
    sent: dict[str, float] = {}
    ans: list[float] = []
    since = datetime.now(UTC)

    async def one(i: int) -> None:
        t = time.time()
        r = await rig.orch_http.post("/workflows", headers=rig.admin, json=SPEC)
        if r.status_code != 201:
            raise BenchFailed(f"POST /workflows answered {r.status_code}: {r.text[:300]}")
        ans.append((time.time() - t) * 1e3)
        sent[r.json()["data"]["id"]] = t
        if one_by_one:
            await rig.until("a direct workflow", lambda: _at_least(rig, since, i + 1), 0.005)

    t0 = time.time()
    await _fan_out(n, 1 if one_by_one else concurrency, one)
    await rig.until(f"{n} direct workflows", lambda: _at_least(rig, since, n))
    docs = {w["id"]: w for w in await rig.workflows_since(since, n)}
    return _phase(sent, docs, t0, ans)


async def _at_least(rig: Rig, since: datetime, n: int) -> bool:
    return await rig.finished_since(since) >= n


async def run_pipeline(rig: Rig, n: int, concurrency: int, *, one_by_one: bool = False) -> Phase:
    sent: dict[str, float] = {}
    ans: list[float] = []
    since = datetime.now(UTC)

    async def one(i: int) -> None:
        body = {"op_type": "workflow.submit", "target": f"dev/bench-{i}", "params": SPEC}
        t = time.time()
        r = await rig.keeper_http.post("/ops", headers=rig.admin, json=body)
        if r.status_code != 201 or r.json()["data"]["state"] != "published":
            raise BenchFailed(f"POST /ops answered {r.status_code}: {r.text[:300]}")
        ans.append((time.time() - t) * 1e3)
        sent[r.json()["data"]["id"]] = t
        if one_by_one:
            await rig.until("a pipeline workflow", lambda: _at_least(rig, since, i + 1), 0.005)

    t0 = time.time()
    await _fan_out(n, 1 if one_by_one else concurrency, one)
    await rig.until(f"{n} workflows through the pipeline", lambda: _at_least(rig, since, n))
    by_op = {w["labels"].get("op_jti"): w for w in await rig.workflows_since(since, n)}
    return _phase(sent, by_op, t0, ans)


class InstantDispatcher:
    """Answers at once, as if the orchestrator took no time (the split of the controller)."""

    async def dispatch(self, op: VerifiedOp) -> dict[str, Any]:
        return {"workflow_id": f"stub-{op.jti}", "created": True}


async def run_drain(rig: Rig, n: int, *, stub: bool) -> float:
    """N tokens signed and published with the controller stopped; then time it to ack them."""
    await rig.stop_controller()
    k = rig.settings.ops_keeper
    for _ in range(n):
        jti = str(uuid.uuid4())
        claims = {
            "sub": "bench",
            "jti": jti,
            "op_type": "workflow.submit",
            "target": "dev/bench-pre",
            "image": None,
            "params_sha256": params_sha256(SPEC),
            "policy": "dev",
            "approved_by": None,
        }
        token = rig.ring.sign(claims, audience=k.token_audience, ttl_s=600, issuer=k.issuer)
        data = PendingMessage(token, dict(SPEC)).to_bytes()
        await rig.bus.publish(pending_subject("workflow.submit"), data, msg_id=jti)
    t0 = time.perf_counter()
    ctl = await rig.start_controller(stub=stub)

    async def drained() -> bool:
        return ctl.counts.get("ack", 0) >= n

    await rig.until(f"the controller to ack {n} tokens", drained, every_s=0.002)
    elapsed = time.perf_counter() - t0
    if set(ctl.counts) != {"ack"}:
        raise BenchFailed(f"the controller did more than ack: {ctl.counts}")
    await rig.start_controller()  # the real one again, for the next phase
    return n / elapsed


async def build(stack: AsyncExitStack, home: Path, args: argparse.Namespace) -> Rig:
    state_url = args.state_url or f"sqlite:///{home / 'state.db'}"
    settings = load_settings(
        home=home,
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": args.sync},
            "nats": {"port": free_port()},
            "orchestrator": {"port": free_port()},
            "control_center": {"admin_password": ADMIN, "port": free_port()},
            "ops_keeper": {"port": free_port()},
            # The bench starts and stops its own controller (same wiring) between phases.
            "ops_controller": {"embedded": False, "port": free_port()},
            "audit_mirror": {"embedded": not args.no_audit_mirror, "port": free_port()},
        },
    )
    (home / "config").mkdir(parents=True)
    (home / "config" / "keeper_policy.ncl").write_text(POLICY)
    nats = EmbeddedNats(settings)
    stack.callback(_kill_leftover, nats)  # runs last: only if the stop below did not happen
    await nats.start()
    stack.push_async_callback(nats.stop)
    bus = await bus_for(settings, name="prvng-bench").connect()
    stack.push_async_callback(bus.close)
    await bus.ensure()
    cc, services = build_services(settings, bus=bus)
    orch = next(s for s in services if isinstance(s, OrchestratorService))
    keeper = next(s for s in services if isinstance(s, OpsKeeperService))
    if any(isinstance(s, OpsControllerService) for s in services):
        raise BenchFailed("build_services started its own ops-controller; the bench needs its own")
    for svc in services:
        await svc.start()
        if svc is orch:
            stack.push_async_callback(orch.stop, kill_running=True)
        else:
            stack.push_async_callback(svc.stop)

    def client(app: Any, base: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base)

    cc_http = await stack.enter_async_context(client(cc.app, "http://cc"))
    login = await cc_http.post("/auth/login", json={"username": "admin", "password": ADMIN})
    admin = {"Authorization": f"Bearer {login.json()['data']['access_token']}"}
    mirror = any(isinstance(s, AuditMirrorService) for s in services)
    rig = Rig(
        settings=settings,
        cc_db=cc.db,
        orch=orch,
        keeper=keeper,
        bus=bus,
        ring=KeyRing(home / "keys" / "ops-keeper"),
        orch_http=await stack.enter_async_context(client(orch.app, "http://o")),
        keeper_http=await stack.enter_async_context(client(keeper.app, "http://k")),
        admin=admin,
        timeout_s=args.timeout,
        consumers=("control-center", "audit-mirror") if mirror else ("control-center",),
    )
    stack.push_async_callback(rig.stop_controller)
    await rig.start_controller()
    return rig


def _kill_leftover(nats: EmbeddedNats) -> None:
    proc = nats.proc
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(5)


class Splits:
    """``--split``: wall time spent in each stage of the controller, per op (the stages run one
    after the other for one message, so they add up to the drain time)."""

    def __init__(self) -> None:
        import provisioning.ops_controller.controller as controller_mod
        import provisioning.orchestrator.ops_routes as routes_mod
        from provisioning.control_center.service import IdentityService
        from provisioning.ops_controller.dispatch import HttpDispatcher
        from provisioning.orchestrator.engine import Engine
        from provisioning.orchestrator.store import WorkflowStore

        self.targets: list[tuple[Any, str, str]] = [
            (controller_mod, "verify_op", "controller: verify the token (Ed25519)"),
            (SqlIdempotencyStore, "claim", "controller: claim the jti (write)"),
            (SqlIdempotencyStore, "mark_dispatched", "controller: mark dispatched (write)"),
            (HttpDispatcher, "dispatch", "POST /ops/dispatch, whole"),
            (routes_mod, "verify_op", "  orchestrator: verify the token again"),
            (Engine, "submit", "  orchestrator: engine.submit (write)"),
            (WorkflowStore, "get_workflow", "  orchestrator: read the workflow back"),
            (IdentityService, "audit", "  control center: mutation audit record (write)"),
            (SqlIdempotencyStore, "finish", "controller: finish + outbox row (write)"),
            (OpsController, "relay_outbox", "controller: relay outbox (JetStream + delete)"),
            (OpsController, "answer", "controller: ack"),
        ]
        self.spent: dict[str, float] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        for owner, name, label in self.targets:
            original = getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._timed(original, label))

    def _timed(self, fn: Any, label: str) -> Any:
        async def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*a, **k)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - t0

        return timed

    def remove(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def report(self, n: int, title: str) -> str:
        lines = [title]
        for _owner, _name, label in self.targets:
            if label in self.spent:
                lines.append(f"  {label:<50} {self.spent[label] * 1e3 / n:6.2f} ms/op")
        self.spent.clear()
        return "\n".join(lines)


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def latencies(phases: list[Phase]) -> str:
    ans = [x for ph in phases for x in ph.answer_ms]
    disp = [x for ph in phases for x in ph.dispatched_ms]
    done = [x for ph in phases for x in ph.completed_ms]
    return (
        f"answer p50 {pct(ans, 50):6.1f} ms | request->dispatched p50 {pct(disp, 50):7.1f} "
        f"p95 {pct(disp, 95):7.1f} ms | ->Completed p50 {pct(done, 50):7.1f} "
        f"p95 {pct(done, 95):7.1f} ms"
    )


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ops", type=int, default=200, help="ops (workflows) per phase")
    ap.add_argument("--concurrency", type=int, default=8, help="client requests in flight")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--one-by-one", type=int, default=40, help="ops per round sent one at a time (latency)"
    )
    ap.add_argument("--state-url", default="", help="postgresql://… (an empty database)")
    ap.add_argument("--sync", choices=["NORMAL", "FULL"], default="FULL")
    ap.add_argument("--timeout", type=float, default=120.0, help="bound of every wait, s")
    ap.add_argument("--no-audit-mirror", action="store_true", help="platform without it")
    ap.add_argument("--profile", action="store_true", help="cProfile one more pipeline run")
    ap.add_argument("--split", action="store_true", help="time the controller's stages")
    args = ap.parse_args()
    n, c = args.ops, args.concurrency
    res: dict[str, list[Phase]] = {"direct": [], "pipeline": [], "direct1": [], "pipeline1": []}
    drain: dict[str, list[float]] = {"real": [], "stub": []}
    with tempfile.TemporaryDirectory(prefix="prvng-bench-ops-") as tmp:
        async with AsyncExitStack() as stack:
            rig = await build(stack, Path(tmp) / "home", args)
            await run_direct(rig, 20, c)  # warm-up of both roads
            await run_pipeline(rig, 20, c)
            await rig.quiet()
            for _ in range(args.rounds):
                res["direct"].append(await run_direct(rig, n, c))
                await rig.quiet()
                res["pipeline"].append(await run_pipeline(rig, n, c))
                await rig.quiet()
                drain["real"].append(await run_drain(rig, n, stub=False))
                await rig.quiet()
                drain["stub"].append(await run_drain(rig, n, stub=True))
                await rig.quiet()
                if args.one_by_one:
                    k = args.one_by_one
                    res["direct1"].append(await run_direct(rig, k, 1, one_by_one=True))
                    await rig.quiet()
                    res["pipeline1"].append(await run_pipeline(rig, k, 1, one_by_one=True))
                    await rig.quiet()
            split_report = []
            if args.split:
                splits = Splits()
                splits.install()
                try:
                    for stub in (False, True):
                        rate = await run_drain(rig, n, stub=stub)
                        road = "dispatcher answering at once" if stub else "real dispatcher"
                        title = (
                            f"controller alone, {road}: {rate:.1f} ops/s = {1e3 / rate:.2f} ms/op"
                        )
                        split_report.append(splits.report(n, title))
                        await rig.quiet()
                finally:
                    splits.remove()
            profile = None
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                await run_pipeline(rig, n, c)
                await rig.quiet()
                profile.disable()
    pg = args.state_url.startswith("postgres")
    backend = "PostgreSQL" if pg else f"SQLite synchronous={args.sync}"
    print(
        f"ops pipeline: {n} ops x {args.rounds} rounds (median rate, pooled latencies), "
        f"{c} requests in flight, {backend}, audit-mirror "
        f"{'off' if args.no_audit_mirror else 'on'}, {os.cpu_count()} cores"
    )
    d = statistics.median(p.rate for p in res["direct"])
    p = statistics.median(p.rate for p in res["pipeline"])
    print(f"burst: {n} requests, {c} in flight")
    for name, key, rate in (("direct POST /workflows", "direct", d),
                            ("pipeline POST /ops", "pipeline", p)):  # fmt: skip
        print(f"  {name:<24} {rate:7.1f} ops/s  " + latencies(res[key]))
    print(f"  ratio pipeline/direct (ops/s to Completed): {p / d:.2f}")
    if args.one_by_one:
        print(f"one at a time: {args.one_by_one} requests a round, each once the last completed")
        for name, key in (("direct POST /workflows", "direct1"),
                          ("pipeline POST /ops", "pipeline1")):  # fmt: skip
            print(f"  {name:<24} {'':>13}  " + latencies(res[key]))
    dr, ds = statistics.median(drain["real"]), statistics.median(drain["stub"])
    print(f"controller alone: {n} tokens already on the stream")
    print(f"  real dispatcher (POST /ops/dispatch)    {dr:7.1f} ops/s drained (acked)")
    print(f"  dispatcher answering at once            {ds:7.1f} ops/s (the controller's own cost)")
    if split_report:
        print("\nwhere a controller's op goes (--split, one more drain each):")
        print("\n".join(split_report))
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        print("\nprofile of one more pipeline run (event-loop thread only), by tottime:")
        print(out.getvalue())


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up as on Ctrl-C
    try:
        asyncio.run(main())
    except BenchFailed as exc:
        raise SystemExit(f"ops_pipeline: {exc}") from None
    except KeyboardInterrupt:
        raise SystemExit("ops_pipeline: interrupted (cleaned up)") from None
