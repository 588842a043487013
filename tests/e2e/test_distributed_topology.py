"""The distributed topology on this machine, each part its own process, survives ``kill -9`` of
one NATS node, one orchestrator worker and one ops-controller while 300 ops flow: every op
becomes exactly one Completed workflow and every ops audit event is committed once by the
audit-mirror.

Parts: one fresh PostgreSQL database (shared by the control center, both orchestrator workers,
the keeper and both controllers); a three-node NATS JetStream cluster with the platform's
streams replicated on all three (``nats.replicas = 3``); ``prvng serve`` control-center,
two orchestrators (``orch-a``, ``orch-b``), ops-keeper, two ops-controllers (``ctl-1`` dispatches to
``orch-a``, ``ctl-2`` to ``orch-b``) and audit-mirror — each with its own data dir, as on its own
host, reaching the others by URL (docs/deploy.md). The admin makes the service API key
(``audit:write``, for the keeper's and the orchestrators' audit relay) and the controllers' key
(``workflow:read``) through the control center's API, then requests the ops through the
keeper's ``POST /ops`` (an approve-all policy for ``workflow.submit``, one ``noop`` task each).

While they flow the test kills, each with SIGKILL:

1. the NATS node leading ``OPS_PENDING`` (not restarted: two of three keep the quorum);
2. ``orch-a``, restarted at once with the same worker id, as its unit would be
   (``Restart=on-failure``): ``ctl-1`` dispatches only to it, so without a restart its share
   could never be dispatched; meanwhile ``ctl-1`` Naks and ``orch-b`` takes ``orch-a``'s
   tasks over once their leases end (or ``orch-a`` takes them back at start);
3. ``ctl-2`` (not restarted): ``ctl-1`` gets what ``ctl-2`` held once ``nats.ack_wait_s``
   passes; the ``jti`` record and the idempotency key ``op:<jti>`` turn a redelivery into no
   second workflow.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.audit_mirror import verify_repo
from tests.e2e.procs import ControlCenterProc, WorkerPool
from tests.e2e.topology import (
    NatsCluster,
    ServeProc,
    consumer_backlog,
    mirror_commits,
    stream_event_ids,
    with_js,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(240)]

OPS = 300
REQUESTERS = 3  # threads posting ops to the keeper at once
ACK_WAIT_S = 4
ADMIN_PASSWORD = "distributed topology admin passphrase"
POLICY = """{
  policies = [
    { name = "topology-test", op_types = ["workflow.submit"], targets = ["topo/*"],
      decision = "approve", token_ttl_s = 1800 },
  ],
}
"""
# Per op, the ops audit events the mirror must hold once each: the keeper's decision and
# publication, the controller's terminal outcome.
OP_ACTIONS = ("ops:request", "ops:publish", "ops:dispatch")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Requester:
    """``REQUESTERS`` threads requesting ops ``0 … OPS-1`` through the keeper."""

    def __init__(self, keeper_url: str, token: str, deadline: float) -> None:
        self.keeper_url, self.token, self.deadline = keeper_url, token, deadline
        self.ids: dict[int, str] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.next = 0
        self.threads = [
            threading.Thread(target=self._run, name=f"requester-{i}", daemon=True)
            for i in range(REQUESTERS)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    @property
    def done(self) -> int:
        return len(self.ids)

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(timeout=max(0.1, end - time.monotonic()))

    def _take(self) -> int | None:
        with self.lock:
            if self.next >= OPS or self.errors:
                return None
            self.next += 1
            return self.next - 1

    def _run(self) -> None:
        try:
            with httpx.Client(
                base_url=self.keeper_url, headers=_bearer(self.token), timeout=30
            ) as http:
                while (i := self._take()) is not None:
                    if time.monotonic() > self.deadline:
                        raise AssertionError(f"deadline passed at op {i}")
                    spec = {"name": f"topo-{i:03d}", "tasks": [{"name": "a", "action": "noop"}]}
                    resp = http.post(
                        "/ops",
                        json={"op_type": "workflow.submit", "target": f"topo/{i}", "params": spec},
                    )
                    if resp.status_code != 201:
                        raise AssertionError(f"op {i}: HTTP {resp.status_code}: {resp.text[:300]}")
                    op = resp.json()["data"]
                    if op["state"] not in ("approved", "published"):
                        raise AssertionError(f"op {i} not approved: {op}")
                    with self.lock:
                        self.ids[i] = str(op["id"])
        except Exception as exc:  # reported by the test
            with self.lock:
                self.errors.append(f"{threading.current_thread().name}: {exc!r}")


def _paged(http: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        resp = http.get(path, params={**params, "limit": 1000, "offset": len(out)})
        assert resp.status_code == 200, resp.text
        page = resp.json()["data"]
        out += page
        if len(page) < 1000:
            return out


def _stream_leader(urls: list[str], stream: str) -> str:
    async def go(js: Any) -> str:
        info = await js.stream_info(stream)
        assert info.config.num_replicas == 3, f"{stream} is R{info.config.num_replicas}"
        assert info.cluster and len(info.cluster.replicas or []) == 2, info.cluster
        return str(info.cluster.leader)

    return with_js(urls, go)


def _wait_for(what: str, check: Any, timeout: float, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(interval)


def test_300_ops_survive_kill_9_of_a_nats_node_a_worker_and_a_controller(
    tmp_path: Path, pg_url: str
) -> None:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    policy = tmp_path / "keeper_policy.ncl"
    policy.write_text(POLICY, encoding="utf-8")
    pool = WorkerPool(tmp_path)
    nats = NatsCluster(pool)
    requester: Requester | None = None
    kills: dict[str, str] = {}
    try:
        nats.start()
        timings["nats"] = time.monotonic() - t0

        cc = pool.add_control_center(
            state_url=pg_url, env={"PRVNG_CONTROL_CENTER__ADMIN_PASSWORD": ADMIN_PASSWORD}
        )
        assert isinstance(cc, ControlCenterProc)
        cc.start()
        cc.wait_healthy(60)
        with httpx.Client(base_url=cc.url, timeout=30) as http:
            resp = http.post("/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
            assert resp.status_code == 200, resp.text
            token = str(resp.json()["data"]["access_token"])
            keys = {}
            for name, scope in (("services-audit", "audit:write"), ("ops-ctl", "workflow:read")):
                made = http.post(
                    "/apikeys", headers=_bearer(token), json={"name": name, "scopes": [scope]}
                )
                assert made.status_code == 201, made.text
                keys[scope] = str(made.json()["data"]["key"])

        def serve(name: str, service: str, env: dict[str, str], *args: str, **kw: Any) -> Any:
            common = {
                "PRVNG_ORCHESTRATOR__AUTH": "required",
                "PRVNG_NATS__URL": nats.url,
                "PRVNG_NATS__REPLICAS": "3",
                "PRVNG_NATS__ACK_WAIT_S": str(ACK_WAIT_S),
                "PRVNG_CONTROL_CENTER__URL": cc.url,
                "PRVNG_OPS_CONTROLLER__EMBEDDED": "false",
                "PRVNG_AUDIT_MIRROR__EMBEDDED": "false",
            }
            proc = ServeProc(
                name,
                tmp_path / f"data-{name}",
                pool.marker,
                env={**common, **env},
                service=service,
                args=list(args),
                **kw,
            )
            pool.workers.append(proc)
            return proc

        keeper = serve(
            "keeper",
            "ops-keeper",
            {
                "PRVNG_OPS_KEEPER__POLICY_FILE": str(policy),
                "PRVNG_CONTROL_CENTER__SERVICE_API_KEY": keys["audit:write"],
            },
            "--state-url",
            pg_url,
        )
        orch_env = {
            "PRVNG_OPS_KEEPER__URL": keeper.url,
            "PRVNG_CONTROL_CENTER__SERVICE_API_KEY": keys["audit:write"],
        }
        orch_a = serve(
            "orch-a", "orchestrator", orch_env, "--state-url", pg_url, worker_id="orch-a"
        )
        orch_b = serve(
            "orch-b", "orchestrator", orch_env, "--state-url", pg_url, worker_id="orch-b"
        )
        ctl_env = {
            "PRVNG_OPS_KEEPER__URL": keeper.url,
            "PRVNG_OPS_CONTROLLER__API_KEY": keys["workflow:read"],
            "PRVNG_OPS_CONTROLLER__HEARTBEAT_S": "1",
        }
        ctl_1 = serve("ctl-1", "ops-controller", ctl_env, "--state-url", pg_url,
                      "--orchestrator-url", orch_a.url)  # fmt: skip
        ctl_2 = serve("ctl-2", "ops-controller", ctl_env, "--state-url", pg_url,
                      "--orchestrator-url", orch_b.url)  # fmt: skip
        mirror = serve("mirror", "audit-mirror", {})
        services = [keeper, orch_a, orch_b, ctl_1, ctl_2, mirror]
        # The keeper first: the orchestrators and controllers read its JWKS.
        keeper.start()
        for s in services[1:]:
            s.start()
        for s in services:
            s.wait_healthy(60)
        leader = _stream_leader(nats.urls, "OPS_PENDING")
        _stream_leader(nats.urls, "OPS_AUDIT")
        timings["setup"] = time.monotonic() - t0

        # ---- the flow, and the kills during it
        t_flow = time.monotonic()
        requester = Requester(keeper.url, token, deadline=t_flow + 90)
        requester.start()
        plan = [
            (OPS // 4, "nats"),
            (OPS // 2, "orchestrator"),
            (3 * OPS // 4, "controller"),
        ]
        for at, what in plan:
            _wait_for(f"{at} ops requested", lambda at=at: requester.done >= at or requester.errors,
                      timeout=60, interval=0.02)  # fmt: skip
            assert not requester.errors, requester.errors
            requested = requester.done
            if what == "nats":
                nats.node(leader).kill9()
                kills[what] = f"{leader} (OPS_PENDING leader)"
            elif what == "orchestrator":
                orch_a.kill9()
                orch_a.start()  # same worker id: it takes its tasks back at once
                kills[what] = "orch-a (restarted)"
            else:
                ctl_2.kill9()
                kills[what] = "ctl-2"
            # Measured after the kill (asking may wait out a leader election).
            backlog = consumer_backlog(nats.urls, "OPS_PENDING", "ops-controller")
            kills[what] += f" at {requested} ops, OPS_PENDING backlog just after {backlog}"
            print(f"kill -9 {kills[what]} at +{time.monotonic() - t_flow:.1f}s")
        requester.join(timeout=max(1.0, requester.deadline - time.monotonic()))
        assert not requester.alive(), "requesting the ops did not end"
        assert not requester.errors, requester.errors
        assert len(requester.ids) == OPS
        timings["requested"] = time.monotonic() - t_flow
        orch_a.wait_healthy(60)

        # ---- drained: workflows ended, both consumers caught up, mirror has every event
        live = [n.client_url for n in nats.nodes if n.proc and n.proc.poll() is None]
        state: dict[str, Any] = {}
        with httpx.Client(base_url=orch_b.url, headers=_bearer(token), timeout=30) as orch:

            def drained() -> bool:
                for s in (orch_b, ctl_1, keeper, mirror):
                    assert s.proc is not None and s.proc.poll() is None, (
                        f"{s.name} died:\n{s.log_tail()}"
                    )
                wfs = _paged(orch, "/workflows")
                state["workflows"] = wfs
                state["ended"] = sum(w["status"] in ("Completed", "Failed") for w in wfs)
                state["pending"] = consumer_backlog(live, "OPS_PENDING", "ops-controller")
                state["audit"] = consumer_backlog(live, "OPS_AUDIT", "audit-mirror")
                state["commits"] = len(mirror_commits(mirror_repo))
                return bool(
                    state["ended"] >= OPS
                    and state["pending"] == (0, 0)
                    and state["audit"] == (0, 0)
                    and state["commits"] >= len(OP_ACTIONS) * OPS
                )

            mirror_repo = mirror.data_dir / "audit-mirror" / "repo.git"
            deadline = time.monotonic() + 60
            while not drained() and time.monotonic() < deadline:
                time.sleep(0.5)
            timings["drained"] = time.monotonic() - t_flow
            workflows: list[dict[str, Any]] = state["workflows"]
        with httpx.Client(base_url=keeper.url, headers=_bearer(token), timeout=30) as k:
            ops = _paged(k, "/ops")
        # What the surviving controller answered (Naks while orch-a was down, acks of
        # duplicates), and what it settled by reconciliation.
        ctl_health = httpx.get(f"{ctl_1.url}/health", timeout=10).json()["data"]
        mirror.terminate()
        commits = mirror_commits(mirror_repo)
        in_stream = stream_event_ids(live)
        mirror_state = mirror.data_dir / "audit-mirror" / "state"
        verified = verify_repo(
            mirror_repo, mirror_state / "allowed_signers", mirror_state / "checkpoint.json"
        )
    finally:
        if requester is not None and requester.alive():
            requester.errors.append("stopped by the test's end")
            requester.join(timeout=30)
        pool.close()
    elapsed = time.monotonic() - t0

    ids = set(requester.ids.values())
    per_op = Counter(str(w["labels"].get("op_jti")) for w in workflows)
    missing = sorted(ids - set(per_op))
    duplicated = {jti: n for jti, n in per_op.items() if n > 1}
    strays = sorted(set(per_op) - ids)
    not_completed = {
        w["labels"].get("op_jti"): (w["status"], w["error"])
        for w in workflows
        if w["status"] != "Completed"
    }
    not_published = {o["id"]: o["state"] for o in ops if o["state"] != "published"}
    by_event = Counter(event_id for event_id, _, _ in commits)
    committed_twice = {e: n for e, n in by_event.items() if n > 1}
    no_trailer = by_event.get("", 0)
    per_op_actions: dict[str, Counter[str]] = {}
    for _, action, object_id in commits:
        per_op_actions.setdefault(object_id, Counter())[action] += 1
    wrong_events = {
        jti: dict(per_op_actions.get(jti, {}))
        for jti in ids
        if any(per_op_actions.get(jti, Counter())[a] != 1 for a in OP_ACTIONS)
    }
    not_mirrored = sorted(set(in_stream) - set(by_event))
    not_in_stream = sorted(set(by_event) - set(in_stream))
    report = (
        f"{len(ids)} ops, {len(workflows)} workflows, kills {json.dumps(kills)}\n"
        f"last drain state: ended {state.get('ended')}, OPS_PENDING {state.get('pending')}, "
        f"OPS_AUDIT {state.get('audit')}, commits {state.get('commits')}\n"
        f"missing ({len(missing)}): {missing[:20]}\nduplicated ({len(duplicated)}): "
        f"{duplicated}\nworkflows of no requested op: {strays[:20]}\n"
        f"not Completed ({len(not_completed)}): {dict(list(not_completed.items())[:20])}\n"
        f"keeper ops not published ({len(not_published)}): "
        f"{dict(list(not_published.items())[:20])}\n"
        f"audit: {len(commits)} commits, {len(by_event)} event ids, {len(in_stream)} in "
        f"OPS_AUDIT; committed twice {committed_twice}; commits without trailer {no_trailer}; "
        f"in the stream but not mirrored ({len(not_mirrored)}) {not_mirrored[:20]}; "
        f"mirrored but not in the stream {not_in_stream[:20]}; ops without exactly one of "
        f"{OP_ACTIONS} ({len(wrong_events)}): {dict(list(wrong_events.items())[:10])}\n"
        f"verify: {verified}\nctl-1 outcomes {ctl_health.get('outcomes')}, last error "
        f"{ctl_health.get('last_error')}"
    )
    print(report)
    assert len(ids) == OPS, report
    assert not missing, report
    assert not duplicated, report
    assert not strays, report
    assert len(workflows) == OPS, report
    assert not not_completed, report
    assert len(ops) == OPS and not not_published, report
    assert not committed_twice and not no_trailer, report
    assert not not_mirrored and not not_in_stream, report
    assert max(in_stream.values()) == 1, report  # JetStream de-duplicated the re-publishes
    assert not wrong_events, report
    assert verified.ok, report
    assert verified.total == len(commits), report
    print(
        "timings: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
        + f", {elapsed:.1f}s in all"
    )
