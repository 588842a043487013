"""Benchmark: what authentication and authorization cost the orchestrator per request.

`GET /tasks?limit=1` on the orchestrator of the embedded platform (control center beside it,
one SQLite store), served in-process through its ASGI app so only the application's work is
measured: with a bearer access token, with an API key (answers cached), and — the baseline,
in the same run — the same app with authentication disabled. Rounds alternate so drift hits
all three alike. Aim: the authenticated throughput at least 0.85 of the baseline.

    .venv/bin/python bench/auth_overhead.py [--requests 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from provisioning.core.auth import Guard
from provisioning.core.rbac import Authorizer
from provisioning.core.settings import load_settings
from provisioning.orchestrator.app import OrchestratorService
from provisioning.platform.embedded import build_services

PASSWORD = "bench-admin-password-1"


async def rate(client: httpx.AsyncClient, headers: dict[str, str], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        r = await client.get("/tasks", params={"limit": 1}, headers=headers)
        if r.status_code != 200:
            raise SystemExit(f"unexpected {r.status_code}: {r.text[:200]}")
    return n / (time.perf_counter() - t0)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            home=Path(tmp),
            env={},
            overrides={"control_center": {"admin_password": PASSWORD}},
        )
        cc, services = build_services(settings)
        for svc in services:
            await svc.start()
        orch = services[1]
        assert isinstance(orch, OrchestratorService)
        open_orch = OrchestratorService(settings, guard=Guard(None, Authorizer()), db=cc.db)
        t_cc = httpx.ASGITransport(app=cc.app)
        async with httpx.AsyncClient(transport=t_cc, base_url="http://cc") as c:
            login = (
                await c.post("/auth/login", json={"username": "admin", "password": PASSWORD})
            ).json()
            token = login["data"]["access_token"]
            bearer = {"Authorization": f"Bearer {token}"}
            key = (
                await c.post(
                    "/apikeys", json={"name": "bench", "scopes": ["task:read"]}, headers=bearer
                )
            ).json()["data"]["key"]
        authed = httpx.AsyncClient(transport=httpx.ASGITransport(app=orch.app), base_url="http://o")
        plain = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=open_orch.app), base_url="http://o"
        )
        results: dict[str, list[float]] = {"disabled": [], "token": [], "apikey": []}
        await rate(plain, {}, 200)  # warm-up
        await rate(authed, bearer, 200)
        for _ in range(args.rounds):
            results["disabled"].append(await rate(plain, {}, args.requests))
            results["token"].append(await rate(authed, bearer, args.requests))
            results["apikey"].append(await rate(authed, {"X-API-Key": key}, args.requests))
        await authed.aclose()
        await plain.aclose()
        for svc in reversed(services):
            await svc.stop()
    base = statistics.median(results["disabled"])
    print(
        f"GET /tasks?limit=1 in-process, {args.requests} requests x {args.rounds} rounds (median)"
    )
    print(f"auth disabled (baseline)  {base:8.1f} req/s")
    for name in ("token", "apikey"):
        r = statistics.median(results[name])
        print(
            f"{'bearer JWT' if name == 'token' else 'API key (cached)':<24}  "
            f"{r:8.1f} req/s   ratio {r / base:.2f}  (aim >= 0.85)"
        )


if __name__ == "__main__":
    asyncio.run(main())
