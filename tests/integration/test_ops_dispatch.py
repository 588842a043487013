"""`POST /ops/dispatch` on the orchestrator (SQLite and PostgreSQL): a signed operation from the
ops-keeper's key ring becomes a workflow whose idempotency key is the op's jti; the same op again
answers the same workflow; a forged, expired or edited op is refused with 401 and makes nothing."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning.core.ops_token import OPS_AUDIENCE, OPS_ISSUER, canonical_params
from provisioning.core.signing import KeyRing
from provisioning.orchestrator.app import OrchestratorService
from tests.conftest import wait_workflow
from tests.fake_workspace import make_fake_workspace

SPEC = {"name": "via-ops", "tasks": [{"name": "a", "action": "noop"}]}


def op(ring: KeyRing, op_type: str, params: dict[str, Any], **claims: Any) -> tuple[str, bytes]:
    jti = claims.pop("jti", str(uuid.uuid4()))
    body = {
        "sub": "u-alice",
        "jti": jti,
        "op_type": op_type,
        "target": "demo",
        "params_sha256": hashlib.sha256(canonical_params(params)).hexdigest(),
        **claims,
    }
    token = ring.sign(body, audience=OPS_AUDIENCE, ttl_s=300, issuer=OPS_ISSUER)
    return jti, json.dumps({"token": token, "params": params}).encode()


@pytest.fixture
async def orch(make_service: Any) -> OrchestratorService:
    svc: OrchestratorService = await make_service()
    KeyRing(svc.settings.home / "keys" / "ops-keeper").load_or_create()
    return svc


async def post(svc: OrchestratorService, data: bytes) -> httpx.Response:
    transport = httpx.ASGITransport(app=svc.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://o") as c:
        return await c.post(
            "/ops/dispatch", content=data, headers={"content-type": "application/json"}
        )


async def test_a_signed_op_becomes_one_workflow_whatever_the_retries(
    orch: OrchestratorService,
) -> None:
    ring = KeyRing(orch.settings.home / "keys" / "ops-keeper")
    jti, data = op(ring, "workflow.submit", SPEC)

    first = await post(orch, data)
    again = await post(orch, data)

    assert (first.status_code, again.status_code) == (201, 200), first.text
    wf = first.json()["data"]
    assert again.json()["data"]["id"] == wf["id"]
    assert wf["owner"] == "u-alice"
    assert wf["labels"]["op_jti"] == jti
    done = await wait_workflow(orch, wf["id"])
    assert done["status"] == "Completed"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=orch.app), base_url="http://o"
    ) as c:
        found = (await c.get("/workflows", params={"idempotency_key": f"op:{jti}"})).json()["data"]
        none = (await c.get("/workflows", params={"idempotency_key": "op:nope"})).json()["data"]
    assert [w["id"] for w in found] == [wf["id"]] and none == []


async def test_a_domain_op_compiles_the_workspace_request(
    orch: OrchestratorService, tmp_path: Path
) -> None:
    ws = make_fake_workspace(tmp_path / "ws")
    ring = KeyRing(orch.settings.home / "keys" / "ops-keeper")
    _jti, data = op(
        ring,
        "server.create",
        {"workspace": str(ws), "infra": "prod", "servers": ["a1"]},
        target="prod/a1",
    )
    resp = await post(orch, data)
    assert resp.status_code == 201, resp.text
    assert resp.json()["data"]["kind"] == "servers.create"


@pytest.mark.parametrize(
    ("op_type", "extra", "target", "problem"),
    [
        # Signed for dev, params aim at prod: the keeper decided on the target, so no.
        ("server.delete", {"servers": ["a1"]}, "dev/a1", "not the one its params name"),
        ("server.delete", {"servers": ["a1", "a2"]}, "prod/a1", "'prod/@all'"),
        (
            "taskserv.create",
            {"taskserv": "base", "operation": "remove"},
            "prod/@all/base",
            "use taskserv.remove",
        ),
        (
            "taskserv.remove",
            {"taskserv": "base", "operation": "install"},
            "prod/@all/base",
            "does not match op_type",
        ),
    ],
)
async def test_a_domain_op_whose_params_say_something_else_is_refused(
    orch: OrchestratorService,
    tmp_path: Path,
    op_type: str,
    extra: dict[str, Any],
    target: str,
    problem: str,
) -> None:
    ws = make_fake_workspace(tmp_path / "ws")
    ring = KeyRing(orch.settings.home / "keys" / "ops-keeper")
    params = {"workspace": str(ws), "infra": "prod", **extra}
    _jti, data = op(ring, op_type, params, target=target)
    resp = await post(orch, data)
    assert resp.status_code == 422, resp.text
    assert problem in resp.json()["error"]["message"]
    assert await orch.store.list_workflows(limit=10) == []


@pytest.mark.parametrize(
    "case",
    ["forged", "edited params", "unknown op type", "bad params", "garbage"],
)
async def test_a_bad_op_is_refused_and_makes_nothing(
    orch: OrchestratorService, tmp_path: Path, case: str
) -> None:
    ring = KeyRing(orch.settings.home / "keys" / "ops-keeper")
    if case == "forged":
        other = KeyRing(tmp_path / "other")
        other.load_or_create()
        _j, data = op(other, "workflow.submit", SPEC)
        want = 401
    elif case == "edited params":
        _j, signed = op(ring, "workflow.submit", SPEC)
        doc = json.loads(signed)
        doc["params"]["tasks"][0]["action"] = "fail"
        data, want = json.dumps(doc).encode(), 401
    elif case == "unknown op type":
        _j, data = op(ring, "rocket.launch", {})
        want = 422
    elif case == "bad params":
        _j, data = op(ring, "workflow.submit", {"name": "x", "tasks": []})
        want = 422
    else:
        data, want = b"{not json", 401
    resp = await post(orch, data)
    assert resp.status_code == want, resp.text
    assert await orch.store.list_workflows(limit=10) == []


async def test_the_controllers_dispatcher_tells_a_refusal_from_a_passing_failure(
    orch: OrchestratorService,
) -> None:
    from provisioning.core.ops_token import verify_op
    from provisioning.core.signing import StaticJwks, TokenVerifier
    from provisioning.ops_controller.controller import DispatchFailed
    from provisioning.ops_controller.dispatch import HttpDispatcher
    from tests.conftest import free_port

    ring = KeyRing(orch.settings.home / "keys" / "ops-keeper")
    verifier = TokenVerifier(StaticJwks(ring), audience=OPS_AUDIENCE, issuer=OPS_ISSUER)
    to_orch = HttpDispatcher("http://o", transport=httpx.ASGITransport(app=orch.app))
    try:
        _j, data = op(ring, "workflow.submit", SPEC)
        good = await verify_op(verifier, None, data)
        made = await to_orch.dispatch(good)
        assert made["created"] is True
        assert (await to_orch.dispatch(good))["workflow_id"] == made["workflow_id"]
        _j, data = op(ring, "rocket.launch", {})
        with pytest.raises(DispatchFailed) as refused:
            await to_orch.dispatch(await verify_op(verifier, None, data))
        assert refused.value.retry is False and "422" in str(refused.value)
    finally:
        await to_orch.close()
    closed = HttpDispatcher(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    try:
        with pytest.raises(DispatchFailed) as down:
            await closed.dispatch(good)
        assert down.value.retry is True
    finally:
        await closed.close()


async def test_taskserv_remove_is_an_op_type_of_its_own(
    orch: OrchestratorService, tmp_path: Path
) -> None:
    ws = make_fake_workspace(tmp_path / "ws")
    ring = KeyRing(orch.settings.home / "keys" / "ops-keeper")
    params = {"workspace": str(ws), "infra": "prod", "taskserv": "app", "servers": ["a1"]}
    _jti, data = op(ring, "taskserv.remove", params, target="prod/a1/app")
    resp = await post(orch, data)
    assert resp.status_code == 201, resp.text
    assert resp.json()["data"]["kind"] == "taskserv.remove"
