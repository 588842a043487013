"""The ops-keeper end to end: policy decisions, approvals, freezes, signed tokens on JetStream.

Real things only: a nats-server (the platform's embedded one) on a free port, the store on
SQLite and PostgreSQL, the control center for logins and Cedar, the keeper's app through
httpx's ASGI transport. What reaches ``ops.pending.>`` is read with the ops-controller's durable
consumer and its token verified against the keeper's ``/.well-known/jwks.json``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import update

from provisioning.control_center.api import ForwardedEvent
from provisioning.control_center.app import ControlCenterService
from provisioning.core.auth import Guard
from provisioning.core.bus import Consumer, Delivery, Published
from provisioning.core.bus.nats import NatsBus
from provisioning.core.errors import Unreachable
from provisioning.core.rbac import Authorizer
from provisioning.core.settings import Settings, load_settings
from provisioning.core.signing import HttpJwks, TokenVerifier
from provisioning.ops_keeper.api import (
    DecisionOut,
    FreezeOut,
    OpOut,
    OpsClaims,
    PendingMessage,
    canonical_params,
)
from provisioning.ops_keeper.app import OpsKeeperService
from provisioning.ops_keeper.client import OpsKeeperClient
from provisioning.ops_keeper.tables import ops
from provisioning.platform.nats_server import EmbeddedNats
from tests.conftest import free_port

ADMIN_PASSWORD = "admin passphrase for the keeper"
PASSWORD = "a user passphrase 1"
AUDIENCE, ISSUER = "prvng-ops", "prvng-ops-keeper"

POLICY = """\
{
  policies = [
    { name = "reads", op_types = ["*.get", "*.list"], decision = "approve", token_ttl_s = 60 },
    {
      name = "dev-create",
      op_types = ["server.create"],
      targets = ["dev/*"],
      decision = "approve",
      token_ttl_s = 120,
      reason = "dev is disposable",
    },
    {
      name = "prod-delete",
      op_types = ["server.delete"],
      targets = ["prod/*"],
      decision = "require_approval",
      approver_role = "operator",
    },
    {
      name = "prod-drop-admin-only",
      op_types = ["db.drop"],
      targets = ["prod/*"],
      decision = "require_approval",
      approver_role = "admin",
    },
    {
      name = "no-prod-create",
      op_types = ["server.create"],
      targets = ["prod/*"],
      decision = "reject",
      reason = "use the change process",
    },
  ],
}
"""


class FlakyBus:
    """The real bus, made to fail the next ``fail_next`` publishes (or all, with ``down``), or
    to store the next ``lose_acks`` publishes and fail all the same (the answer was lost)."""

    def __init__(self, bus: NatsBus) -> None:
        self.bus = bus
        self.fail_next = 0
        self.lose_acks = 0
        self.down = False
        self.published: list[tuple[str, str | None]] = []

    async def ensure(self) -> None:
        await self.bus.ensure()

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Published:
        if self.down or self.fail_next > 0:
            self.fail_next = max(0, self.fail_next - 1)
            raise Unreachable("NATS did not confirm (simulated)")
        self.published.append((subject, msg_id))
        ack = await self.bus.publish(subject, payload, msg_id=msg_id, headers=headers)
        if self.lose_acks > 0:
            self.lose_acks -= 1
            raise Unreachable("stored, but the answer was lost (simulated crash)")
        return ack

    async def consumer(self, stream: str, durable: str) -> Consumer:
        return await self.bus.consumer(stream, durable)

    async def close(self) -> None:
        return None


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Keeper:
    settings: Settings
    cc: ControlCenterService
    keeper: OpsKeeperService
    bus: FlakyBus
    consumer: Consumer
    http: httpx.AsyncClient  # the keeper
    cc_http: httpx.AsyncClient
    admin: dict[str, str]
    users: dict[str, dict[str, str]] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    audit: Consumer | None = None  # ops.audit.>, as the audit-mirror reads it

    async def user(self, name: str, role: str) -> dict[str, str]:
        resp = await self.cc_http.post(
            "/users",
            headers=self.admin,
            json={"username": name, "password": PASSWORD, "roles": [role]},
        )
        assert resp.status_code == 201, resp.text
        login = await self.cc_http.post(
            "/auth/login", json={"username": name, "password": PASSWORD}
        )
        headers = bearer(login.json()["data"]["access_token"])
        who = await self.cc_http.get("/auth/whoami", headers=headers)
        self.users[name], self.ids[name] = headers, who.json()["data"]["id"]
        return headers

    async def request(self, who: str, op_type: str, target: str, **body: Any) -> dict[str, Any]:
        resp = await self.http.post(
            "/ops", headers=self.users[who], json={"op_type": op_type, "target": target, **body}
        )
        assert resp.status_code == 201, resp.text
        return dict(OpOut.model_validate(resp.json()["data"]).model_dump(mode="json"))

    async def act(self, who: str, op_id: str, verb: str, reason: str = "ok") -> httpx.Response:
        return await self.http.post(
            f"/ops/{op_id}/{verb}", headers=self.users[who], json={"reason": reason}
        )

    async def op(self, op_id: str) -> dict[str, Any]:
        resp = await self.http.get(f"/ops/{op_id}", headers=self.admin)
        assert resp.status_code == 200, resp.text
        return dict(resp.json()["data"])

    async def messages(self, wait_s: float = 0.3) -> list[Delivery]:
        """Everything on ops.pending.> now (acked, so each is seen once)."""
        got: list[Delivery] = []
        while True:
            try:
                batch = await self.consumer.fetch(batch=50, timeout_s=wait_s)
            except TimeoutError:  # nats-py may raise the builtin one; the bus maps only its own
                batch = []
            if not batch:
                return got
            for d in batch:
                await d.ack()
            got.extend(batch)

    def verifier(self) -> TokenVerifier:
        jwks = HttpJwks(
            "http://keeper/.well-known/jwks.json",
            transport=httpx.ASGITransport(app=self.keeper.app),
            cache_ttl_s=0,
        )
        return TokenVerifier(
            jwks,
            audience=AUDIENCE,
            issuer=ISSUER,
            leeway_s=0,
            required=("exp", "iat", "nbf", "aud", "sub", "jti"),
            min_refresh_interval_s=0,
        )


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.02)


@pytest.fixture
async def k(tmp_path: Path, state_url: str) -> AsyncIterator[Keeper]:
    home = tmp_path / "home"
    settings = load_settings(
        home=home,
        env={},
        overrides={
            "state": {"url": state_url, "sqlite_synchronous": "NORMAL"},
            "nats": {"port": free_port(), "duplicate_window_s": 120},
            "control_center": {"admin_password": ADMIN_PASSWORD, "port": free_port()},
            "ops_keeper": {"port": free_port(), "reload_interval_s": 0.05},
        },
    )
    (home / "config").mkdir(parents=True)
    (home / "config" / "keeper_policy.ncl").write_text(POLICY, encoding="utf-8")
    async with AsyncExitStack() as stack:
        nats = EmbeddedNats(settings)
        await nats.start()
        stack.push_async_callback(nats.stop)
        real_bus = await NatsBus([nats.url], duplicate_window_s=120).connect()
        stack.push_async_callback(real_bus.close)
        await real_bus.ensure()
        bus = FlakyBus(real_bus)
        cc = ControlCenterService(settings)
        await cc.start()
        stack.push_async_callback(cc.stop)
        guard = Guard(cc.authenticator, cc.authorizer, audit=cc.audit_hook("ops-keeper"))
        keeper = OpsKeeperService(settings, guard=guard, db=cc.db, bus=bus, retry_interval_s=0.05)
        await keeper.start()
        stack.push_async_callback(keeper.stop)
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=keeper.app), base_url="http://k")
        )
        cc_http = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=cc.app), base_url="http://cc")
        )
        login = await cc_http.post(
            "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        admin = bearer(login.json()["data"]["access_token"])
        consumer = await real_bus.consumer("OPS_PENDING", "ops-controller")
        kp = Keeper(settings, cc, keeper, bus, consumer, http, cc_http, admin)
        kp.audit = await real_bus.consumer("OPS_AUDIT", "audit-mirror")
        kp.users["admin"] = admin
        for name, role in (
            ("olga", "operator"),
            ("oscar", "operator"),
            ("dave", "developer"),
            ("dana", "developer"),
            ("vic", "viewer"),
        ):
            await kp.user(name, role)
        yield kp


# --- approve, reject, no policy ----------------------------------------------------------


async def test_an_approved_operation_is_published_with_a_token_that_verifies(k: Keeper) -> None:
    params = {"size": "small", "tags": ["a", "é"], "count": 2, "nested": {"z": 1, "a": None}}

    op = await k.request("dave", "server.create", "dev/box-1", params=params, reason="testing")

    assert op["state"] == "published"
    assert (op["decision"], op["policy"]) == ("approve", "dev-create")
    assert "dev is disposable" in op["decision_reason"]
    assert op["jti"] == op["id"] and op["requester"] == k.ids["dave"]
    assert op["stream_seq"] is not None and op["published_at"] is not None
    [msg] = await k.messages()
    assert msg.subject == "ops.pending.server.create"
    assert msg.headers["Nats-Msg-Id"] == op["id"]
    body = PendingMessage.from_bytes(msg.data)
    assert body.params == params

    header = jwt.get_unverified_header(body.token)
    jwks = (await k.http.get("/.well-known/jwks.json")).json()
    assert header["alg"] == "EdDSA"
    assert header["kid"] in [key["kid"] for key in jwks["keys"]]
    claims = OpsClaims.from_dict(await k.verifier().verify(body.token))
    assert claims.aud == AUDIENCE and claims.iss == ISSUER
    assert claims.sub == k.ids["dave"] and claims.jti == op["id"]
    assert (claims.op_type, claims.target, claims.image) == ("server.create", "dev/box-1", None)
    assert (claims.policy, claims.approved_by) == ("dev-create", None)
    assert claims.exp - claims.iat == 120 and claims.nbf == claims.iat
    digest = hashlib.sha256(canonical_params(params)).hexdigest()
    assert claims.params_sha256 == digest == op["params_sha256"]
    assert claims.binds(body.params)
    assert not claims.binds({**params, "size": "huge"})
    # Canonical: sorted keys, no spaces, UTF-8.
    assert canonical_params(params).startswith(b'{"count":2,"nested":{"a":null,"z":1}')
    assert "é".encode() in canonical_params(params)
    # An expired or foreign-audience check fails: the claims are really checked.
    wrong = TokenVerifier(
        HttpJwks(
            "http://keeper/.well-known/jwks.json",
            transport=httpx.ASGITransport(app=k.keeper.app),
        ),
        audience="someone-else",
    )
    with pytest.raises(Exception, match="audience"):
        await wrong.verify(body.token)


async def test_a_rejecting_policy_rejects_and_publishes_nothing(k: Keeper) -> None:
    op = await k.request("olga", "server.create", "prod/web-01")

    assert op["state"] == "rejected"
    assert (op["decision"], op["policy"]) == ("reject", "no-prod-create")
    assert "use the change process" in op["decision_reason"]
    assert op["jti"] is None and op["token_expires_at"] is None
    assert await k.messages() == []


async def test_a_request_no_policy_matches_is_rejected_by_default(k: Keeper) -> None:
    op = await k.request("olga", "server.create", "staging/web-01")

    assert op["state"] == "rejected"
    assert op["policy"] is None
    assert op["decision_reason"] == "no policy matched: rejected by default"
    assert [t["policy"] for t in op["trace"]] == [
        "reads",
        "dev-create",
        "prod-delete",
        "prod-drop-admin-only",
        "no-prod-create",
    ]
    assert await k.messages() == []


# --- approvals ---------------------------------------------------------------------------


async def test_an_operation_needing_approval_waits_and_is_not_published(k: Keeper) -> None:
    op = await k.request("olga", "server.delete", "prod/web-01", reason="decommission")

    assert op["state"] == "pending_approval"
    assert (op["decision"], op["policy"], op["approver_role"]) == (
        "require_approval",
        "prod-delete",
        "operator",
    )
    assert op["approval_expires_at"] is not None
    assert op["jti"] is None
    assert await k.messages() == []
    pending = await k.http.get("/ops", params={"state": "pending_approval"}, headers=k.admin)
    assert [o["id"] for o in pending.json()["data"]] == [op["id"]]


async def test_the_requester_may_not_approve_their_own_operation(k: Keeper) -> None:
    op = await k.request("olga", "server.delete", "prod/web-01")

    resp = await k.act("olga", op["id"], "approve")

    assert resp.status_code == 403
    error = resp.json()["error"]
    assert error["code"] == "forbidden"
    assert "olga requested operation" in error["message"]
    assert "no self-approval" in error["message"]
    assert 'another user holding role "operator"' in error["message"]
    assert (await k.op(op["id"]))["state"] == "pending_approval"
    assert await k.messages() == []
    audit = await k.cc_http.get(
        "/audit",
        params={"action": "ops:approve", "result": "denied", "service": "ops-keeper"},
        headers=k.admin,
    )
    [event] = audit.json()["data"]
    assert event["object_id"] == op["id"] and event["actor"] == "olga"


async def test_approval_needs_the_approver_role_of_the_policy(k: Keeper) -> None:
    op = await k.request("olga", "db.drop", "prod/db-01")
    assert op["approver_role"] == "admin"

    by_operator = await k.act("oscar", op["id"], "approve")
    by_developer = await k.act("dave", op["id"], "approve")

    assert by_operator.status_code == 403
    assert 'oscar does not hold role "admin"' in by_operator.json()["error"]["message"]
    assert 'policy "prod-drop-admin-only"' in by_operator.json()["error"]["message"]
    assert by_developer.status_code == 403  # Cedar: developers hold no ops:approve
    assert "ops:approve" in by_developer.json()["error"]["message"]
    assert (await k.op(op["id"]))["state"] == "pending_approval"
    assert await k.messages() == []

    by_admin = await k.act("admin", op["id"], "approve", "checked the backup")
    assert by_admin.status_code == 200, by_admin.text
    assert by_admin.json()["data"]["state"] == "published"


async def test_another_operator_approves_and_it_is_published_exactly_once(k: Keeper) -> None:
    op = await k.request("olga", "server.delete", "prod/web-01", params={"force": True})

    resp = await k.act("oscar", op["id"], "approve", "change CH-42 reviewed")

    assert resp.status_code == 200, resp.text
    done = resp.json()["data"]
    assert done["state"] == "published"
    assert (done["approver"], done["approver_name"]) == (k.ids["oscar"], "oscar")
    assert done["approver_reason"] == "change CH-42 reviewed"
    [msg] = await k.messages()
    assert msg.subject == "ops.pending.server.delete"
    assert msg.headers["Nats-Msg-Id"] == op["id"]
    body = PendingMessage.from_bytes(msg.data)
    claims = OpsClaims.from_dict(await k.verifier().verify(body.token))
    assert (claims.sub, claims.approved_by) == (k.ids["olga"], k.ids["oscar"])
    assert (claims.policy, claims.jti) == ("prod-delete", op["id"])
    assert claims.exp - claims.iat == 300 and claims.binds({"force": True})

    again = await k.act("admin", op["id"], "approve")
    assert again.status_code == 409
    assert "is published" in again.json()["error"]["message"]
    # The same jti published again (a retry after a crash) is a JetStream duplicate.
    ack = await k.bus.bus.publish(msg.subject, msg.data, msg_id=op["id"])
    assert ack.duplicate is True
    assert await k.messages() == []


async def test_an_approver_rejects_with_a_reason(k: Keeper) -> None:
    op = await k.request("olga", "server.delete", "prod/web-01")

    no_reason = await k.http.post(f"/ops/{op['id']}/reject", headers=k.users["oscar"], json={})
    resp = await k.act("oscar", op["id"], "reject", "not during the sale")

    assert no_reason.status_code == 422
    assert no_reason.json()["error"]["details"]["fields"][0]["field"] == "reason"
    assert resp.status_code == 200, resp.text
    rejected = resp.json()["data"]
    assert rejected["state"] == "rejected"
    assert rejected["decision"] == "require_approval"
    assert (rejected["approver_name"], rejected["approver_reason"]) == (
        "oscar",
        "not during the sale",
    )
    assert (await k.act("admin", op["id"], "approve")).status_code == 409
    assert await k.messages() == []


async def test_the_requester_may_withdraw_a_pending_operation(k: Keeper) -> None:
    op = await k.request("olga", "server.delete", "prod/web-01")

    resp = await k.act("olga", op["id"], "reject", "wrong host")

    assert resp.status_code == 200, resp.text
    assert resp.json()["data"]["state"] == "rejected"


async def test_a_pending_operation_expires_after_the_approval_window(k: Keeper) -> None:
    op = await k.request("olga", "server.delete", "prod/web-01")
    past = datetime.now(UTC) - timedelta(seconds=1)
    await k.cc.db.run_write(
        lambda c: c.execute(
            update(ops).where(ops.c.id == op["id"]).values(approval_expires_at=past)
        )
    )

    resp = await k.act("oscar", op["id"], "approve")

    assert resp.status_code == 409
    assert "expired" in resp.json()["error"]["message"]
    expired = await k.op(op["id"])
    assert expired["state"] == "expired"
    assert "approval window" in expired["expired_reason"]
    assert await k.messages() == []


# --- freezes -----------------------------------------------------------------------------


async def test_a_freeze_rejects_matching_targets_until_it_is_lifted(k: Keeper) -> None:
    denied = await k.http.post(
        "/ops/freeze", headers=k.users["dave"], json={"reason": "x", "scope": "prod/*"}
    )
    assert denied.status_code == 403
    pending = await k.request("olga", "server.delete", "prod/web-02")
    resp = await k.http.post(
        "/ops/freeze",
        headers=k.users["olga"],
        json={"reason": "release week", "scope": "prod/*"},
    )
    assert resp.status_code == 201, resp.text
    freeze = FreezeOut.model_validate(resp.json()["data"])
    assert freeze.active and freeze.created_by_name == "olga"

    frozen = await k.request("olga", "server.list", "prod/web-01")
    outside = await k.request("dave", "server.create", "dev/box")
    explained = await k.http.post(
        "/ops/evaluate",
        headers=k.users["olga"],
        json={"op_type": "server.list", "target": "prod/web-01"},
    )
    blocked = await k.act("oscar", pending["id"], "approve")

    assert frozen["state"] == "rejected" and frozen["frozen_by"] == freeze.id
    assert "change freeze" in frozen["decision_reason"]
    assert "release week" in frozen["decision_reason"]
    assert outside["state"] == "published"
    decision = DecisionOut.model_validate(explained.json()["data"])
    assert (decision.decision, decision.frozen_by, decision.state) == (
        "reject",
        freeze.id,
        "rejected",
    )
    assert decision.trace[0].policy == "reads" and decision.trace[0].matched
    assert blocked.status_code == 409
    assert "change freeze" in blocked.json()["error"]["message"]
    listed = await k.http.get("/ops/freezes", headers=k.users["vic"])
    assert [f["id"] for f in listed.json()["data"]] == [freeze.id]

    lifted = await k.http.delete(f"/ops/freeze/{freeze.id}", headers=k.users["oscar"])
    assert lifted.status_code == 200, lifted.text
    assert lifted.json()["data"]["active"] is False
    assert lifted.json()["data"]["ended_by"] == k.ids["oscar"]
    assert (await k.request("olga", "server.list", "prod/web-01"))["state"] == "published"
    assert (await k.act("oscar", pending["id"], "approve")).status_code == 200
    ended = await k.http.get("/ops/freezes", params={"state": "ended"}, headers=k.admin)
    assert [f["id"] for f in ended.json()["data"]] == [freeze.id]
    assert (await k.http.get("/ops/freezes", headers=k.admin)).json()["data"] == []
    missing = await k.http.delete("/ops/freeze/nope", headers=k.admin)
    assert missing.status_code == 404


async def test_a_freeze_with_an_end_lapses_by_itself(k: Keeper) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=3)
    resp = await k.http.post(
        "/ops/freeze",
        headers=k.admin,
        json={"reason": "short", "until": soon.isoformat()},
    )
    assert resp.status_code == 201, resp.text
    assert (await k.request("dave", "server.create", "dev/a"))["state"] == "rejected"

    async def thawed() -> bool:
        resp = await k.http.post(
            "/ops/evaluate",
            headers=k.admin,
            json={"op_type": "server.create", "target": "dev/a"},
        )
        return bool(resp.json()["data"]["decision"] == "approve")

    await until(thawed)


# --- evaluate, policy file ---------------------------------------------------------------


async def test_evaluate_explains_and_records_nothing(k: Keeper) -> None:
    before = (await k.http.get("/ops", headers=k.admin)).json()["data"]

    resp = await k.http.post(
        "/ops/evaluate",
        headers=k.users["dave"],
        json={"op_type": "server.delete", "target": "prod/web-01", "params": {"a": 1}},
    )

    assert resp.status_code == 200, resp.text
    decision = DecisionOut.model_validate(resp.json()["data"])
    assert (decision.decision, decision.policy, decision.state) == (
        "require_approval",
        "prod-delete",
        "pending_approval",
    )
    assert [(t.policy, t.matched, t.field) for t in decision.trace] == [
        ("reads", False, "op_types"),
        ("dev-create", False, "op_types"),
        ("prod-delete", True, None),
    ]
    assert 'needs approval by role "operator"' in decision.reason
    assert (await k.http.get("/ops", headers=k.admin)).json()["data"] == before == []
    assert await k.messages() == []
    viewer = await k.http.post(
        "/ops/evaluate", headers=k.users["vic"], json={"op_type": "a.get", "target": "x"}
    )
    assert viewer.status_code == 403


async def test_a_broken_policy_file_keeps_the_last_good_policy(k: Keeper) -> None:
    path = k.keeper.policy_path
    path.write_text('{\n  policies = [\n    { name = "x", decision = "maybe" },\n  ],\n}\n')

    async def reported() -> bool:
        status = (await k.http.get("/ops/policy", headers=k.users["vic"])).json()["data"]
        return status["last_error"] is not None

    await until(reported)
    status = (await k.http.get("/ops/policy", headers=k.users["vic"])).json()["data"]
    assert f"{path.resolve()}:3:" in status["last_error"]
    assert '"approve", "reject", "require_approval"' in status["last_error"]
    assert "\x1b[" not in status["last_error"]
    assert status["names"][0] == "reads" and status["policies"] == 5
    assert (await k.request("dave", "server.create", "dev/a"))["policy"] == "dev-create"
    health = (await k.http.get("/health")).json()["data"]
    assert health["policy"]["file_broken"] is True
    metrics = (await k.http.get("/metrics")).text
    assert "prvng_keeper_policy_file_broken 1.0" in metrics

    path.write_text(
        '{ policies = [ { name = "all-dev", targets = ["dev/*"], decision = "reject" } ] }'
    )

    async def reloaded() -> bool:
        status = (await k.http.get("/ops/policy", headers=k.admin)).json()["data"]
        return bool(status["names"] == ["all-dev"])

    await until(reloaded)
    assert (await k.request("dave", "server.create", "dev/a"))["state"] == "rejected"


async def test_the_default_policy_is_written_when_there_is_none(tmp_path: Path) -> None:
    settings = load_settings(
        home=tmp_path / "home",
        env={},
        overrides={"state": {"url": f"sqlite:///{tmp_path / 's.db'}"}, "nats": {"port": 1}},
    )
    ring_dir = settings.home / "keys" / "ops-keeper"
    keeper = OpsKeeperService(settings, guard=Guard(None, Authorizer()), bus=None)
    await keeper.start()  # NATS is not there: the keeper starts all the same
    try:
        assert keeper.policy_path.read_text(encoding="utf-8").startswith("# Policy of the ops")
        keys = list(ring_dir.glob("key-*.pem"))
        assert len(keys) == 1 and keys[0].stat().st_mode & 0o777 == 0o600
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=keeper.app), base_url="http://k"
        ) as http:
            health = (await http.get("/health")).json()["data"]
            assert health["nats"] == "not connected"
            resp = await http.post("/ops", json={"op_type": "server.delete", "target": "dev/a"})
            op = resp.json()["data"]
            assert op["state"] == "approved"  # signed, waiting for NATS
            assert "Unreachable" in (op["last_publish_error"] or "")
    finally:
        await keeper.stop()


# --- keys --------------------------------------------------------------------------------


async def test_key_rotation_keeps_the_old_key_in_the_jwks(k: Keeper) -> None:
    first = await k.request("dave", "server.create", "dev/a")
    [old_msg] = await k.messages()
    old_token = PendingMessage.from_bytes(old_msg.data).token
    old_kid = jwt.get_unverified_header(old_token)["kid"]

    refused = await k.http.post("/keys/rotate", headers=k.users["olga"])
    resp = await k.http.post("/keys/rotate", headers=k.admin)

    assert refused.status_code == 403
    assert resp.status_code == 200, resp.text
    new_kid = resp.json()["data"]["kid"]
    assert new_kid != old_kid
    async with OpsKeeperClient("http://k", transport=httpx.ASGITransport(app=k.keeper.app)) as c:
        jwks = await c.jwks()
    assert [key["kid"] for key in jwks["keys"]] == [new_kid, old_kid]
    verifier = k.verifier()
    assert (await verifier.verify(old_token))["jti"] == first["id"]
    await k.request("dave", "server.create", "dev/b")
    [new_msg] = await k.messages()
    new_token = PendingMessage.from_bytes(new_msg.data).token
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    await verifier.verify(new_token)


# --- visibility --------------------------------------------------------------------------


async def test_developers_see_only_their_own_operations(k: Keeper) -> None:
    mine = await k.request("dave", "server.create", "dev/a")
    theirs = await k.request("dana", "server.create", "dev/b")

    listed = await k.http.get("/ops", headers=k.users["dave"])
    other = await k.http.get(f"/ops/{theirs['id']}", headers=k.users["dave"])
    own = await k.http.get(f"/ops/{mine['id']}", headers=k.users["dave"])
    by_viewer = await k.http.get("/ops", headers=k.users["vic"])
    by_operator = await k.http.get(f"/ops/{theirs['id']}", headers=k.users["olga"])

    assert [o["id"] for o in listed.json()["data"]] == [mine["id"]]
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "not_found"
    assert own.status_code == 200
    assert {o["id"] for o in by_viewer.json()["data"]} == {mine["id"], theirs["id"]}
    assert by_operator.status_code == 200
    assert "token" not in own.json()["data"]
    anonymous = await k.http.get("/ops")
    assert anonymous.status_code == 401
    assert (await k.http.get("/health")).status_code == 200
    assert (await k.http.get("/.well-known/jwks.json")).status_code == 200


async def test_the_client_speaks_the_api(k: Keeper) -> None:
    async def token(who: str) -> str:
        return k.users[who]["Authorization"].removeprefix("Bearer ")

    transport = httpx.ASGITransport(app=k.keeper.app)
    async with (
        OpsKeeperClient("http://k", transport=transport, token=lambda: token("olga")) as olga,
        OpsKeeperClient("http://k", transport=transport, token=lambda: token("oscar")) as oscar,
    ):
        evaluated = await olga.evaluate("server.delete", "prod/a")
        assert evaluated["decision"] == "require_approval"
        op = await olga.request_op("server.delete", "prod/a", params={"x": 1}, reason="why")
        assert op["state"] == "pending_approval"
        assert [o["id"] for o in await oscar.list_ops(state="pending_approval")] == [op["id"]]
        assert (await oscar.approve(op["id"], "fine"))["state"] == "published"
        assert (await olga.get_op(op["id"]))["approver_name"] == "oscar"
        freeze = await olga.freeze("quiet", scope="prod/*")
        assert [f["id"] for f in await olga.list_freezes()] == [freeze["id"]]
        assert (await olga.unfreeze(freeze["id"]))["active"] is False
        pending = await olga.request_op("server.delete", "prod/b")
        assert (await oscar.reject(pending["id"], "no"))["state"] == "rejected"
        assert (await olga.policy())["policies"] == 5
        with pytest.raises(Exception, match="no self-approval") as info:
            await olga.approve((await olga.request_op("server.delete", "prod/c"))["id"], "me")
        assert type(info.value).__name__ == "Forbidden"


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"op_type": "Server Create", "target": "dev/a"}, "op_type"),
        ({"op_type": "server", "target": "dev/a"}, "op_type"),
        ({"op_type": "server.*", "target": "dev/a"}, "op_type"),
        ({"op_type": "server.create", "target": "dev a"}, "target"),
        ({"op_type": "server.create"}, "target"),
        ({"op_type": "server.create", "target": "dev/a", "params": {"x": "y" * 70000}}, "params"),
        ({"op_type": "server.create", "target": "dev/a", "params": [1]}, "params"),
        ({"op_type": "server.create", "target": "dev/a", "bogus": 1}, "bogus"),
    ],
    ids=["spaces", "one-word", "wildcard", "bad-target", "no-target", "oversize", "list", "extra"],
)
async def test_bad_requests_are_refused_naming_the_field(
    k: Keeper, body: dict[str, Any], field: str
) -> None:
    for path in ("/ops", "/ops/evaluate"):
        resp = await k.http.post(path, headers=k.users["dave"], json=body)

        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["code"] == "validation_error"
        assert field in [f["field"] for f in error["details"]["fields"]]
        assert field in error["message"]
    assert (await k.http.get("/ops", headers=k.admin)).json()["data"] == []


async def test_more_bad_input_is_refused_naming_the_field(k: Keeper) -> None:
    nan = await k.http.post(
        "/ops",
        headers={**k.users["dave"], "Content-Type": "application/json"},
        content=b'{"op_type": "server.create", "target": "dev/a", "params": {"x": NaN}}',
    )
    past = await k.http.post(
        "/ops/freeze",
        headers=k.admin,
        json={"reason": "r", "until": "2001-01-01T00:00:00Z"},
    )
    blank = await k.http.post(
        "/ops/freeze", headers=k.admin, json={"reason": "", "scope": "prod/*"}
    )
    op = await k.request("olga", "server.delete", "prod/web-01")
    blank_reason = await k.act("oscar", op["id"], "approve", "   ")
    too_long = await k.act("oscar", op["id"], "approve", "x" * 501)
    nul = await k.http.post(
        "/ops",
        headers=k.users["dave"],
        json={"op_type": "server.create", "target": "dev/a", "params": {"k": "a\x00b"}},
    )

    for resp, name in (
        (nan, "params"),
        (past, "until"),
        (blank, "reason"),
        (blank_reason, "reason"),
        (too_long, "reason"),
    ):
        assert resp.status_code == 422, resp.text
        assert name in [f["field"] for f in resp.json()["error"]["details"]["fields"]]
    assert "must be in the future" in past.json()["error"]["message"]
    assert nul.status_code == 422 and "NUL" in nul.json()["error"]["message"]
    assert (await k.op(op["id"]))["state"] == "pending_approval"
    unknown = await k.act("oscar", "no-such-op", "approve")
    assert unknown.status_code == 404


# --- publishing survives failures --------------------------------------------------------


async def test_a_failed_publish_leaves_the_op_approved_and_it_is_published_later(
    k: Keeper,
) -> None:
    k.bus.fail_next = 1

    op = await k.request("dave", "server.create", "dev/a", params={"n": 1})

    assert op["state"] == "approved"
    assert "simulated" in (op["last_publish_error"] or "")

    async def published() -> bool:
        return bool((await k.op(op["id"]))["state"] == "published")

    await until(published)
    done = await k.op(op["id"])
    assert done["publish_attempts"] == 2 and done["last_publish_error"] is None
    [msg] = await k.messages()
    assert msg.headers["Nats-Msg-Id"] == op["id"]
    claims = OpsClaims.from_dict(
        await k.verifier().verify(PendingMessage.from_bytes(msg.data).token)
    )
    assert claims.jti == op["id"] and claims.binds({"n": 1})
    assert [m for s, m in k.bus.published if s.startswith("ops.pending.")] == [op["id"]]


async def test_an_op_approved_before_a_crash_is_published_after_the_restart(k: Keeper) -> None:
    k.bus.down = True
    op = await k.request("dave", "server.create", "dev/a")
    assert op["state"] == "approved"
    await k.keeper.stop()  # the "crash": NATS never saw the message
    jti = op["jti"]

    k.bus.down = False
    guard = Guard(k.cc.authenticator, k.cc.authorizer)
    again = OpsKeeperService(k.settings, guard=guard, db=k.cc.db, bus=k.bus, retry_interval_s=0.05)
    await again.start()
    try:

        async def published() -> bool:
            return bool((await again.store.get_op(op["id"]))["state"] == "published")

        await until(published)
    finally:
        await again.stop()
    [msg] = await k.messages()
    assert msg.headers["Nats-Msg-Id"] == jti == op["id"]
    token = PendingMessage.from_bytes(msg.data).token
    assert (await k.verifier().verify(token))["jti"] == jti


async def test_a_token_that_expires_unpublished_ends_the_operation(k: Keeper) -> None:
    k.bus.down = True
    op = await k.request("dave", "server.create", "dev/a")
    past = datetime.now(UTC) - timedelta(seconds=1)
    await k.cc.db.run_write(
        lambda c: c.execute(update(ops).where(ops.c.id == op["id"]).values(token_expires_at=past))
    )

    async def expired() -> bool:
        return bool((await k.op(op["id"]))["state"] == "expired")

    await until(expired)
    k.bus.down = False
    ended = await k.op(op["id"])
    assert "before it could be published" in ended["expired_reason"]
    assert "simulated" in ended["expired_reason"]
    assert await k.messages() == []


async def test_metrics_count_operations_by_state(k: Keeper) -> None:
    await k.request("dave", "server.create", "dev/a")
    await k.request("olga", "server.delete", "prod/a")

    text = (await k.http.get("/metrics")).text

    assert 'prvng_keeper_ops{state="published"} 1.0' in text
    assert 'prvng_keeper_ops{state="pending_approval"} 1.0' in text
    assert 'prvng_keeper_decisions{decision="approve"} 1.0' in text
    assert "prvng_keeper_published 1.0" in text
    health = (await k.http.get("/health")).json()["data"]
    assert health["service"] == "ops-keeper" and health["nats"] == "connected"
    assert json.loads((await k.http.get("/.well-known/jwks.json")).text)["keys"]


# --- audit events on ops.audit.> ---------------------------------------------------------

SECRET = "s3cret-param-value"


async def audit_events(k: Keeper, *, relayed: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """``(subject, event)`` of everything on ``ops.audit.>`` (acked, so each is seen once),
    each checked as the control center and the audit-mirror read it. ``relayed``: first wait
    until the keeper's audit outbox is empty."""

    async def outbox_empty() -> bool:
        return await k.keeper.store.audit_backlog() == 0

    if relayed:
        await until(outbox_empty)
    assert k.audit is not None
    got: list[tuple[str, dict[str, Any]]] = []
    while True:
        try:
            batch = await k.audit.fetch(batch=50, timeout_s=0.3)
        except TimeoutError:
            batch = []
        if not batch:
            return got
        for d in batch:
            await d.ack()
            event = json.loads(d.data)
            canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            assert d.data == canonical.encode()
            assert d.headers["Nats-Msg-Id"] == event["id"]
            assert SECRET not in d.data.decode() and "eyJ" not in d.data.decode()  # no token
            ForwardedEvent.model_validate(event)  # extra fields are refused there
            assert event["service"] == "ops-keeper"
            assert datetime.fromisoformat(event["ts"]).utcoffset() == timedelta(0)
            got.append((d.subject, event))


def outline(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, ...]]:
    return [(s, e["action"], e["result"], e["actor"], e["actor_type"]) for s, e in events]


async def test_an_approved_request_is_audited_as_approved_then_published(k: Keeper) -> None:
    op = await k.request(
        "dave", "server.create", "dev/box-1", params={"password": SECRET}, reason="try it"
    )

    events = await audit_events(k)

    assert outline(events) == [
        ("ops.audit.approved", "ops:request", "success", "dave", "user"),
        ("ops.audit.published", "ops:publish", "success", "ops-keeper", "system"),
    ]
    (_, request), (_, published) = events
    assert {(e["object_type"], e["object_id"]) for _, e in events} == {("Operation", op["id"])}
    assert request["details"] == {
        "op_type": "server.create",
        "target": "dev/box-1",
        "image": None,
        "state": "approved",
        "decision": "approve",
        "policy": "dev-create",
        "params_sha256": op["params_sha256"],
        "requester": k.ids["dave"],
        "requester_name": "dave",
        "approved_by": None,
        "frozen_by": None,
        "reason": op["decision_reason"],
        "request_reason": "try it",
        "approver_role": None,
        "approval_expires_at": None,
    }
    assert published["details"]["state"] == "published"
    assert published["details"]["stream_seq"] == op["stream_seq"]
    assert published["details"]["subject"] == "ops.pending.server.create"
    assert published["details"]["duplicate"] is False
    assert request["id"] != published["id"]
    assert "prvng_keeper_audit_outbox 0.0" in (await k.http.get("/metrics")).text


async def test_a_request_refused_by_policy_is_audited_as_denied(k: Keeper) -> None:
    by_policy = await k.request("olga", "server.create", "prod/web-01", params={"p": SECRET})
    by_default = await k.request("olga", "server.create", "staging/web-01")

    events = await audit_events(k)

    assert outline(events) == [
        ("ops.audit.rejected", "ops:request", "denied", "olga", "user"),
        ("ops.audit.rejected", "ops:request", "denied", "olga", "user"),
    ]
    (_, first), (_, second) = events
    assert first["object_id"] == by_policy["id"] and second["object_id"] == by_default["id"]
    assert (first["details"]["decision"], first["details"]["policy"]) == (
        "reject",
        "no-prod-create",
    )
    assert "use the change process" in first["details"]["reason"]
    assert second["details"]["policy"] is None
    assert second["details"]["reason"] == "no policy matched: rejected by default"


async def test_an_approval_by_another_user_is_audited_once_then_the_publication(
    k: Keeper,
) -> None:
    op = await k.request("olga", "server.delete", "prod/web-01", params={"force": SECRET})
    assert (await k.act("olga", op["id"], "approve")).status_code == 403  # self-approval

    racing = await asyncio.gather(
        k.act("oscar", op["id"], "approve", "change CH-42 reviewed"),
        k.act("admin", op["id"], "approve", "change CH-42 reviewed"),
    )

    assert sorted(r.status_code for r in racing) == [200, 409]
    winner = racing[0] if racing[0].status_code == 200 else racing[1]
    approver, approver_id = (
        winner.json()["data"]["approver_name"],
        winner.json()["data"]["approver"],
    )
    events = await audit_events(k)
    assert outline(events) == [
        ("ops.audit.pending_approval", "ops:request", "success", "olga", "user"),
        ("ops.audit.approved", "ops:approve", "success", approver, "user"),
        ("ops.audit.published", "ops:publish", "success", "ops-keeper", "system"),
    ]
    (_, pending), (_, approved), (_, published) = events
    assert pending["details"]["approver_role"] == "operator"
    assert pending["details"]["approval_expires_at"] is not None
    assert pending["details"]["decision"] == "require_approval"
    assert approved["details"]["approved_by"] == approver_id
    assert approved["details"]["reason"] == "change CH-42 reviewed"
    assert published["details"]["approved_by"] == approver_id
    assert {e["object_id"] for _, e in events} == {op["id"]}


async def test_a_rejection_by_an_approver_or_the_requester_is_audited(k: Keeper) -> None:
    first = await k.request("olga", "server.delete", "prod/web-01")
    assert (await k.act("oscar", first["id"], "reject", "not during the sale")).status_code == 200
    second = await k.request("olga", "server.delete", "prod/web-02")
    assert (await k.act("olga", second["id"], "reject", "wrong host")).status_code == 200
    assert (await k.act("oscar", second["id"], "reject", "again")).status_code == 409

    events = await audit_events(k)

    assert outline(events) == [
        ("ops.audit.pending_approval", "ops:request", "success", "olga", "user"),
        ("ops.audit.rejected", "ops:reject", "success", "oscar", "user"),
        ("ops.audit.pending_approval", "ops:request", "success", "olga", "user"),
        ("ops.audit.rejected", "ops:reject", "success", "olga", "user"),
    ]
    by_oscar, withdrawn = events[1][1], events[3][1]
    assert by_oscar["object_id"] == first["id"] and withdrawn["object_id"] == second["id"]
    assert (by_oscar["details"]["reason"], by_oscar["details"]["withdrawn"]) == (
        "not during the sale",
        False,
    )
    assert by_oscar["details"]["rejected_by"] == k.ids["oscar"]
    assert by_oscar["details"]["approved_by"] is None
    assert withdrawn["details"]["withdrawn"] is True


async def test_expiries_are_audited_by_the_keeper_itself(k: Keeper) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    pending = await k.request("olga", "server.delete", "prod/web-01")
    await k.cc.db.run_write(
        lambda c: c.execute(
            update(ops).where(ops.c.id == pending["id"]).values(approval_expires_at=past)
        )
    )

    async def expired(op_id: str) -> bool:
        return bool((await k.op(op_id))["state"] == "expired")

    await until(lambda: expired(pending["id"]))
    k.bus.down = True
    unpublished = await k.request("dave", "server.create", "dev/a")
    await k.cc.db.run_write(
        lambda c: c.execute(
            update(ops).where(ops.c.id == unpublished["id"]).values(token_expires_at=past)
        )
    )
    await until(lambda: expired(unpublished["id"]))
    k.bus.down = False

    events = await audit_events(k)

    assert outline(events) == [
        ("ops.audit.pending_approval", "ops:request", "success", "olga", "user"),
        ("ops.audit.expired", "ops:expire", "success", "ops-keeper", "system"),
        ("ops.audit.approved", "ops:request", "success", "dave", "user"),
        ("ops.audit.expired", "ops:expire", "success", "ops-keeper", "system"),
    ]
    window, token = events[1][1], events[3][1]
    assert window["object_id"] == pending["id"] and token["object_id"] == unpublished["id"]
    assert window["details"]["former_state"] == "pending_approval"
    assert "approval window" in window["details"]["reason"]
    assert token["details"]["former_state"] == "approved"
    assert "before it could be published" in token["details"]["reason"]
    assert token["details"]["state"] == "expired"


async def test_a_freeze_and_its_lifting_are_audited_once(k: Keeper) -> None:
    resp = await k.http.post(
        "/ops/freeze", headers=k.users["olga"], json={"reason": "release week", "scope": "prod/*"}
    )
    freeze = resp.json()["data"]
    frozen = await k.request("olga", "server.list", "prod/web-01")
    assert (await k.http.delete(f"/ops/freeze/{freeze['id']}", headers=k.users["oscar"])).is_success
    assert (await k.http.delete(f"/ops/freeze/{freeze['id']}", headers=k.admin)).is_success

    events = await audit_events(k)

    assert outline(events) == [
        ("ops.audit.frozen", "ops:freeze", "success", "olga", "user"),
        ("ops.audit.rejected", "ops:request", "denied", "olga", "user"),
        ("ops.audit.unfrozen", "ops:unfreeze", "success", "oscar", "user"),
    ]
    (_, started), (_, refused), (_, lifted) = events
    assert (started["object_type"], started["object_id"]) == ("Freeze", freeze["id"])
    assert (lifted["object_type"], lifted["object_id"]) == ("Freeze", freeze["id"])
    assert started["details"] == {
        "scope": "prod/*",
        "reason": "release week",
        "until": None,
        "created_by": k.ids["olga"],
        "ended_by": None,
    }
    assert lifted["details"]["ended_by"] == k.ids["oscar"]
    assert refused["object_id"] == frozen["id"]
    assert refused["details"]["frozen_by"] == freeze["id"]


async def test_decisions_taken_while_nats_is_down_are_audited_once_it_is_back(k: Keeper) -> None:
    k.bus.down = True
    approved = await k.request("dave", "server.create", "dev/a", params={"p": SECRET})
    await k.request("olga", "server.create", "prod/web-01")
    pending = await k.request("olga", "server.delete", "prod/web-01")
    assert (await k.act("oscar", pending["id"], "approve")).status_code == 200
    resp = await k.http.post("/ops/freeze", headers=k.admin, json={"reason": "r", "scope": "qa/*"})
    assert resp.status_code == 201

    metrics = (await k.http.get("/metrics")).text
    assert "prvng_keeper_audit_outbox 5.0" in metrics
    assert await audit_events(k, relayed=False) == []
    k.bus.down = False

    async def published() -> bool:
        states = {(await k.op(o["id"]))["state"] for o in (approved, pending)}
        return states == {"published"}

    await until(published)
    events = await audit_events(k)

    assert [(s, e["action"]) for s, e in events] == [
        ("ops.audit.approved", "ops:request"),
        ("ops.audit.rejected", "ops:request"),
        ("ops.audit.pending_approval", "ops:request"),
        ("ops.audit.approved", "ops:approve"),
        ("ops.audit.frozen", "ops:freeze"),
        ("ops.audit.published", "ops:publish"),
        ("ops.audit.published", "ops:publish"),
    ]
    assert len({e["id"] for _, e in events}) == 7
    assert {e["object_id"] for s, e in events if s == "ops.audit.published"} == {
        approved["id"],
        pending["id"],
    }
    metrics = (await k.http.get("/metrics")).text
    assert "prvng_keeper_audit_outbox 0.0" in metrics
    assert "prvng_keeper_audit_published 7.0" in metrics


async def test_an_event_published_but_not_deleted_before_a_crash_is_on_the_stream_once(
    k: Keeper,
) -> None:
    k.bus.lose_acks = 1  # NATS stores the event; the keeper dies before deleting its row

    op = await k.request("olga", "server.create", "prod/web-01")

    events = await audit_events(k)
    [(subject, event)] = events
    assert (subject, event["object_id"]) == ("ops.audit.rejected", op["id"])
    assert [m for s, m in k.bus.published if s.startswith("ops.audit.")] == [event["id"]] * 2
    assert k.keeper.service.stats.audit_failures >= 1
    # Published again by hand within the duplicate window: JetStream drops it too.
    ack = await k.bus.bus.publish(subject, json.dumps(event).encode(), msg_id=event["id"])
    assert ack.duplicate is True
    assert await audit_events(k) == []


async def test_a_workspace_request_must_name_the_target_its_params_name(k: Keeper) -> None:
    params = {"workspace": "/srv/ws", "infra": "prod", "servers": ["db-01"]}
    for path in ("/ops", "/ops/evaluate"):
        resp = await k.http.post(
            path,
            headers=k.users["dave"],
            json={"op_type": "server.delete", "target": "dev/db-01", "params": params},
        )
        assert resp.status_code == 422, resp.text
        assert "use 'prod/db-01'" in resp.json()["error"]["message"]
    assert (await k.http.get("/ops", headers=k.admin)).json()["data"] == []
