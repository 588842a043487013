"""``kill -9`` of a standalone ops-controller at random moments while 200 ops flow: every op
becomes exactly one workflow, every workflow completes, every idempotency record ends
``completed``.

A real platform (`prvng platform start`, ``ops_controller.embedded = false``, an approve-all
policy for ``workflow.submit``) runs the control center, the orchestrator, the ops-keeper and
NATS; the controller is its own process (`prvng serve ops-controller`, same data dir: same
store, the keeper's key ring) dispatching to the platform's orchestrator over HTTP. A logged-in
user requests the ops through the keeper's HTTP API while the test kills the controller (during
start-up and while it works) and starts it again. NATS redelivers what was not acked (a short
``nats.ack_wait_s``); the controller's ``jti`` record and the orchestrator's idempotency key
``op:<jti>`` must turn every redelivery into no second workflow. One case per idempotency
store: the platform's SQLite and embedded SurrealDB (one controller process per file).
Set ``PRVNG_E2E_SEED`` to replay a failing seed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.core.settings import load_settings
from provisioning.platform.pidfile import PidFile
from tests.e2e.platform_proc import REPO, Platform, prvng, running_platform, show
from tests.e2e.procs import ServiceProc, WorkerPool

OPS = 200
KILLS = 10
ACK_WAIT_S = 4
USER, PASSWORD = "opsbot", "a long enough crash-test passphrase"
POLICY = """{
  policies = [
    { name = "crash-test", op_types = ["workflow.submit"], targets = ["crash/*"],
      decision = "approve", token_ttl_s = 1800 },
  ],
}
"""
# Reads the controller's idempotency store (a process of its own: the SurrealDB store is
# locked by whoever has it open, and SURREAL_SYNC_DATA is process-wide).
DUMP_RECORDS = """
import asyncio, json, sys
from provisioning.core.settings import load_settings
from provisioning.ops_controller.app import idempotency_store

async def main():
    store = idempotency_store(load_settings(home=sys.argv[1], env={}), None)
    await store.open()
    try:
        out = {}
        for state in ("received", "dispatched", "completed", "failed"):
            for r in await store.in_state(state, limit=100000):
                out[r.jti] = {"state": r.state.value, "attempts": r.attempts,
                              "outcome": r.outcome, "reason": r.reason}
        print(json.dumps({"records": out, "outbox": len(await store.outbox_pending(100000))}))
    finally:
        await store.close()

asyncio.run(main())
"""


def _seed() -> int:
    return int(os.environ.get("PRVNG_E2E_SEED") or random.SystemRandom().randrange(2**32))


@dataclass
class ControllerProc(ServiceProc):
    """``prvng serve ops-controller`` on the platform's data dir, dispatching over HTTP."""

    orchestrator_url: str = ""

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "provisioning.cli.main", "serve", "ops-controller"]
        argv += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        return [*argv, "--orchestrator-url", self.orchestrator_url]

    def is_me(self, health: dict[str, Any]) -> bool:
        return health.get("service") == "ops-controller"


class Requester(threading.Thread):
    """Requests the ops one by one through the keeper, at a random pace; records their ids."""

    def __init__(self, keeper_url: str, token: str, seed: int, deadline: float) -> None:
        super().__init__(name="ops-requester", daemon=True)
        self.keeper_url, self.token = keeper_url, token
        self.rng = random.Random(seed)
        self.deadline = deadline
        self.ids: list[str] = []
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            with httpx.Client(base_url=self.keeper_url, headers=headers, timeout=30) as http:
                for i in range(OPS):
                    if self.stop.is_set() or time.monotonic() > self.deadline:
                        self.error = f"stopped after {i} ops (deadline or stop)"
                        return
                    spec = {"name": f"crash-{i:03d}", "tasks": [{"name": "a", "action": "noop"}]}
                    resp = http.post(
                        "/ops",
                        json={"op_type": "workflow.submit", "target": f"crash/{i}", "params": spec},
                    )
                    if resp.status_code != 201:
                        self.error = f"op {i}: HTTP {resp.status_code}: {resp.text[:500]}"
                        return
                    op = resp.json()["data"]
                    if op["state"] not in ("approved", "published"):
                        self.error = f"op {i} was not approved: {op}"
                        return
                    self.ids.append(str(op["id"]))
                    # Bursts and pauses, so that ops arrive while the controller is down too.
                    if self.rng.random() < 0.3:
                        time.sleep(self.rng.uniform(0.0, 0.25))
        except Exception as exc:  # reported by the test
            self.error = f"{type(exc).__name__}: {exc}"


def _consumer_backlog(nats_url: str) -> tuple[int, int]:
    """``(num_pending, num_ack_pending)`` of the durable ``ops-controller`` on OPS_PENDING."""
    import nats

    async def go() -> tuple[int, int]:
        nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            info = await nc.jetstream().consumer_info("OPS_PENDING", "ops-controller")
            return int(info.num_pending or 0), int(info.num_ack_pending or 0)
        finally:
            await nc.close()

    return asyncio.run(go())


def _workflows(orch: httpx.Client) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        resp = orch.get("/workflows", params={"limit": 1000, "offset": len(out)})
        assert resp.status_code == 200, resp.text
        page = resp.json()["data"]
        out += page
        if len(page) < 1000:
            return out


def _dump_records(data_dir: Path) -> dict[str, Any]:
    """``{"records": {jti: record}, "outbox": audit events not yet relayed}``."""
    done = subprocess.run(
        [sys.executable, "-c", DUMP_RECORDS, str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("PRVNG_")},
    )
    assert done.returncode == 0, f"reading the idempotency store failed:\n{show(done)}"
    dump: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return dump


def _dispatch_events(data_dir: Path) -> Counter[str]:
    """How many ``ops:dispatch`` audit events of each op the platform's audit-mirror committed
    (its commit subjects read ``audit <event id> <action> <object type> <object id>``)."""
    repo = data_dir / "audit-mirror" / "repo.git"
    if not (repo / "refs" / "heads" / "main").exists():
        return Counter()
    log = subprocess.run(
        ["git", f"--git-dir={repo}", "log", "--format=%s", "main"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert log.returncode == 0, log.stderr
    return Counter(
        words[4]
        for words in map(str.split, log.stdout.splitlines())
        if len(words) == 5 and words[2] == "ops:dispatch"
    )


def _login(plat: Platform) -> tuple[str, str]:
    """Create ``opsbot`` (admin: it may request ops and read every workflow) with the stored
    admin login, log it in over HTTP; answer its access token and an API key with
    ``workflow:read`` for the controller's reconciliation at start."""
    made = prvng(
        "user", "create", USER, "--role", "admin", "--password-stdin",
        data_dir=plat.data_dir, stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert made.returncode == 0, show(made)
    cc_url = PidFile(plat.data_dir / "run").url(1)
    assert cc_url, "the platform recorded no control center URL"
    with httpx.Client(base_url=cc_url, timeout=30) as cc:
        resp = cc.post("/auth/login", json={"username": USER, "password": PASSWORD})
        assert resp.status_code == 200, resp.text
        token = str(resp.json()["data"]["access_token"])
        key = cc.post(
            "/apikeys",
            headers={"Authorization": f"Bearer {token}"},
            json={"name": "ops-controller reconcile", "scopes": ["workflow:read"]},
        )
        assert key.status_code == 201, key.text
    return token, str(key.json()["data"]["key"])


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("idempotency", ["state", "surrealdb"])
def test_kill_9_of_the_ops_controller_loses_and_duplicates_no_op(
    tmp_path: Path, idempotency: str
) -> None:
    seed = _seed()
    rng = random.Random(seed)
    ctx = f"seed={seed} (replay with PRVNG_E2E_SEED={seed}), idempotency={idempotency}"
    print(ctx)
    t0 = time.monotonic()
    policy = tmp_path / "keeper_policy.ncl"
    policy.write_text(POLICY, encoding="utf-8")
    extra = (
        f"{{ nats = {{ ack_wait_s = {ACK_WAIT_S} }}, "
        f"ops_keeper = {{ policy_file = {json.dumps(str(policy))} }}, "
        f"ops_controller = {{ embedded = false, idempotency = {json.dumps(idempotency)}, "
        "heartbeat_s = 1 } }"
    )
    home = tmp_path / "home"
    with running_platform(home, extra_config=extra) as plat:
        keeper_url = PidFile(home / "run").url(2)
        assert keeper_url, "the platform recorded no ops-keeper URL"
        nats_url = load_settings(home=home, env={}).nats_servers[0]
        token, api_key = _login(plat)
        pool = WorkerPool(tmp_path)
        ctl = ControllerProc(
            "ops-controller",
            home,
            pool.marker,
            env={"PRVNG_OPS_CONTROLLER__API_KEY": api_key},
            orchestrator_url=plat.url,
        )
        pool.workers.append(ctl)
        requester = Requester(keeper_url, token, rng.randrange(2**32), time.monotonic() + 150)
        kills = kills_in_flight = 0
        try:
            ctl.start()
            ctl.wait_healthy()
            t_flow = time.monotonic()
            t_setup = t_flow - t0
            requester.start()
            # A restart costs a Python start-up (seconds on a loaded 2-core machine).
            deadline = time.monotonic() + 150
            while kills < KILLS:
                assert time.monotonic() < deadline, f"{ctx}: only {kills} kills in time"
                if rng.random() < 0.25:
                    # Somewhere in start-up: imports, store open (migrations), NATS, reconcile.
                    time.sleep(rng.uniform(0.0, 1.5))
                else:
                    ctl.wait_healthy()
                    time.sleep(rng.uniform(0.0, 1.2))  # a random moment of its work
                ctl.kill9()
                kills += 1
                # Ops in NATS not yet acked (unacked ones the killed process held among them).
                kills_in_flight += sum(_consumer_backlog(nats_url)) > 0
                ctl.start()
            t_kills = time.monotonic() - t_flow
            ctl.wait_healthy()
            requester.join(timeout=max(1.0, requester.deadline - time.monotonic()))
            assert not requester.is_alive(), f"{ctx}: requesting the ops did not end"
            assert requester.error is None, f"{ctx}: {requester.error}"
            ids = requester.ids

            # Drained: every op has its workflow, all ended, and NATS holds nothing unacked.
            drain_deadline = time.monotonic() + 60
            with httpx.Client(
                base_url=plat.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
            ) as orch:
                while True:
                    workflows = _workflows(orch)
                    done = [w for w in workflows if w["status"] in ("Completed", "Failed")]
                    backlog = _consumer_backlog(nats_url)
                    if len(done) >= len(ids) and backlog == (0, 0):
                        break
                    if time.monotonic() > drain_deadline:
                        break  # the assertions below say what is missing
                    assert ctl.proc is not None and ctl.proc.poll() is None, (
                        f"{ctx}: the controller died:\n{ctl.log_tail()}"
                    )
                    time.sleep(0.5)
            t_drain = time.monotonic() - t_flow - t_kills
            ctl.terminate()
            dump = _dump_records(home)
            records: dict[str, dict[str, Any]] = dump["records"]
            # Each terminal outcome's audit event (the controller's outbox, relayed to
            # ops.audit.>) reaches the platform's audit-mirror once.
            audit_deadline = time.monotonic() + 20
            audited = _dispatch_events(home)
            while not set(ids) <= set(audited) and time.monotonic() < audit_deadline:
                time.sleep(0.5)
                audited = _dispatch_events(home)
        finally:
            requester.stop.set()
            if requester.is_alive():
                requester.join(timeout=30)
            pool.close()
    elapsed = time.monotonic() - t0

    per_op = Counter(str(w["labels"].get("op_jti")) for w in workflows)
    missing = sorted(set(ids) - set(per_op))
    duplicated = {jti: n for jti, n in per_op.items() if n > 1}
    strays = sorted(set(per_op) - set(ids))
    not_completed = {
        w["labels"].get("op_jti"): (w["status"], w["error"])
        for w in workflows
        if w["status"] != "Completed"
    }
    bad_records = {
        jti: records.get(jti, {"state": "no record"})
        for jti in ids
        if records.get(jti, {}).get("state") != "completed"
    }
    wrong_wf = {
        w["labels"]["op_jti"]: (w["id"], (records.get(w["labels"]["op_jti"]) or {}).get("outcome"))
        for w in workflows
        if w["labels"].get("op_jti") in records
        and (records[w["labels"]["op_jti"]].get("outcome") or {}).get("workflow_id") != w["id"]
    }
    unaudited = sorted(set(ids) - set(audited))
    audited_twice = {jti: n for jti, n in audited.items() if n > 1}
    report = (
        f"{ctx}: {len(ids)} ops, {len(workflows)} workflows, {kills} kills "
        f"({kills_in_flight} with ops in flight), backlog {backlog}\n"
        f"missing ({len(missing)}): {missing}\nduplicated ({len(duplicated)}): {duplicated}\n"
        f"workflows of no requested op: {strays}\nnot Completed ({len(not_completed)}): "
        f"{dict(list(not_completed.items())[:20])}\nrecords not completed ({len(bad_records)}): "
        f"{dict(list(bad_records.items())[:20])}\nrecords naming another workflow: "
        f"{dict(list(wrong_wf.items())[:20])}\naudit events not relayed: {dump['outbox']}; "
        f"ops without their ops:dispatch audit event ({len(unaudited)}): {unaudited[:20]}; "
        f"audited twice: {audited_twice}\n--- controller log (tail)\n{ctl.log_tail(60)}"
    )
    assert len(ids) == OPS, report
    assert kills >= 10, report
    assert kills_in_flight >= 5, report  # the kills did land while ops were flowing
    assert not missing, report
    assert not duplicated, report
    assert not strays, report
    assert len(workflows) == OPS, report
    assert not not_completed, report
    assert not bad_records, report
    assert len(records) == OPS, report
    assert not wrong_wf, report
    assert backlog == (0, 0), report
    assert dump["outbox"] == 0, report
    assert not unaudited, report
    assert not audited_twice, report
    attempts = Counter(r["attempts"] for r in records.values())
    reconciled = sum(
        json.loads(line).get("count", 0)
        for line in ctl.log_tail(100000).splitlines()
        if "settled ops left dispatched" in line and line.startswith("{")
    )
    print(
        f"{ctx}: {OPS} ops, {kills} kills in {t_kills:.1f}s "
        f"({kills_in_flight} with ops in flight), "
        f"dispatch attempts per op {dict(sorted(attempts.items()))}, {reconciled} settled by "
        f"the reconciliation at start, {ctl.lives} lives; "
        f"set-up {t_setup:.1f}s, drained {t_drain:.1f}s after the last kill, {elapsed:.1f}s in all"
    )
