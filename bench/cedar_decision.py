"""Benchmark: one Cedar decision with the default policy set, against a naive baseline run in the
same process.

``Authorizer.decide`` keeps the policy set and the schema parsed; per decision it builds and
parses only the request's few entities (user, object, environment). The baseline is what a
straightforward use of cedarpy does: ``cedarpy.is_authorized`` with the policy text, the schema
text and the entity list, all parsed again on every call (a third row parses only the policy
text per call, to show what parsing the policies alone costs). Both answer the same mix of requests
(every default role, every action, own / other's object, an MFA environment, a scoped key) and
must agree on every answer.

Prints p50/p99 of both, the ratio, and the per-object cost of ``decide_many`` (filtering a
listing of 100 objects).

    .venv/bin/python bench/cedar_decision.py [--n 20000] [--baseline-n 20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Callable

import cedarpy

from provisioning.core.rbac import (
    ACTIONS,
    DEFAULT_POLICY_FILE,
    ROLES,
    SCHEMA_FILE,
    Authorizer,
    Environment,
    Principal,
    Resource,
)

Case = tuple[Principal, str, Resource]


def _cases(count: int) -> list[Case]:
    rng = random.Random(7)
    envs = [Environment("dev"), Environment("prod", production=True, requires_mfa=True)]
    types = ["Workflow", "Task", "Operation", "Server", "Platform"]
    out = []
    for i in range(count):
        role = rng.choice(sorted(ROLES))
        scopes = frozenset({"workflow:read", "task:read"}) if i % 10 == 0 else None
        who = Principal(f"u{i % 50}", frozenset({role}), mfa=i % 3 == 0, scopes=scopes)
        owner = who.user_id if rng.random() < 0.5 else "someone-else"
        resource = Resource(
            rng.choice(types), f"obj-{i}", owner=owner, environment=rng.choice(envs)
        )
        out.append((who, rng.choice(sorted(ACTIONS)), resource))
    return out


def _naive_request(case: Case) -> tuple[dict[str, object], list[dict[str, object]]]:
    """The same request as ``decide`` sends, written out the plain way."""
    who, action, r = case
    assert r.environment is not None
    entities: list[dict[str, object]] = [
        {
            "uid": {"type": "User", "id": who.user_id},
            "attrs": {"disabled": who.disabled},
            "parents": [{"type": "Role", "id": role} for role in who.roles],
        },
        {
            "uid": {"type": "Environment", "id": r.environment.id},
            "attrs": {
                "production": r.environment.production,
                "requires_mfa": r.environment.requires_mfa,
                "requires_approval": r.environment.requires_approval,
            },
            "parents": [],
        },
        {
            "uid": {"type": r.type, "id": r.id},
            "attrs": {
                "owner": {"__entity": {"type": "User", "id": r.owner}},
                "environment": {"__entity": {"type": "Environment", "id": r.environment.id}},
            },
            "parents": [],
        },
    ]
    scopes = sorted(who.scopes or ())
    request: dict[str, object] = {
        "principal": f'User::"{who.user_id}"',
        "action": f'Action::"{action}"',
        "resource": f'{r.type}::"{r.id}"',
        "context": {
            "mfa": who.mfa,
            "approved": False,
            "scoped": who.scopes is not None,
            "scopes": [{"__entity": {"type": "Action", "id": s}} for s in scopes],
        },
    }
    return request, entities


def _measure(fn: Callable[[int], bool], n: int) -> tuple[list[float], list[bool]]:
    for i in range(min(500, n)):  # warm up
        fn(i)
    gc.collect()
    times, answers = [], []
    for i in range(n):
        start = time.perf_counter()
        answers.append(fn(i))
        times.append(time.perf_counter() - start)
    return times, answers


def _pct(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="decisions measured")
    parser.add_argument("--baseline-n", type=int, default=20_000, help="baseline calls")
    args = parser.parse_args()

    authz = Authorizer([])
    cases = _cases(max(args.n, args.baseline_n))
    policy_text = DEFAULT_POLICY_FILE.read_text(encoding="utf-8")
    schema_text = SCHEMA_FILE.read_text(encoding="utf-8")
    naive = [_naive_request(c) for c in cases[: args.baseline_n]]

    def fast(i: int) -> bool:
        return authz.decide(*cases[i]).allowed

    def slow(i: int) -> bool:
        request, entities = naive[i]
        return cedarpy.is_authorized(request, policy_text, entities, schema_text).allowed

    schema = cedarpy.Schema.from_str(schema_text)

    def text_only(i: int) -> bool:  # the policy text parsed per call, the schema once
        request, entities = naive[i]
        return cedarpy.is_authorized(request, policy_text, entities, schema).allowed

    fast_t, fast_a = _measure(fast, args.n)
    slow_t, slow_a = _measure(slow, args.baseline_n)
    text_t, _ = _measure(text_only, args.baseline_n // 4)
    common = min(args.n, args.baseline_n)
    mismatches = sum(a != b for a, b in zip(fast_a[:common], slow_a[:common], strict=True))

    listing = [Resource("Workflow", f"w{i}", owner=f"u{i % 3}") for i in range(100)]
    dev = Principal("u1", frozenset({"developer"}))
    batch_t, _ = _measure(lambda _: bool(authz.decide_many(dev, "workflow:read", listing)), 300)

    print(f"policies: {len(authz.policies)} (default set); allowed {sum(fast_a)}/{args.n}")
    print(
        f"decide             n={args.n:>6}  p50 {_pct(fast_t, 0.5):8.1f} µs  "
        f"p99 {_pct(fast_t, 0.99):8.1f} µs  mean {statistics.fmean(fast_t) * 1e6:8.1f} µs"
    )
    print(
        f"naive is_authorized n={args.baseline_n:>6}  p50 {_pct(slow_t, 0.5):8.1f} µs  "
        f"p99 {_pct(slow_t, 0.99):8.1f} µs  mean {statistics.fmean(slow_t) * 1e6:8.1f} µs"
    )
    print(
        f"policy text only   n={args.baseline_n // 4:>6}  p50 {_pct(text_t, 0.5):8.1f} µs  "
        f"p99 {_pct(text_t, 0.99):8.1f} µs  (schema pre-parsed: the cost of parsing policies)"
    )
    print(
        f"naive / decide: p50 x{_pct(slow_t, 0.5) / _pct(fast_t, 0.5):.1f}, "
        f"p99 x{_pct(slow_t, 0.99) / _pct(fast_t, 0.99):.1f}; answers differ: {mismatches}"
    )
    print(
        f"decide_many (100 objects): p50 {_pct(batch_t, 0.5) / 100:.1f} µs per object, "
        f"p99 {_pct(batch_t, 0.99):.0f} µs per call"
    )
    print(
        json.dumps(
            {
                "decide_p50_us": round(_pct(fast_t, 0.5), 1),
                "decide_p99_us": round(_pct(fast_t, 0.99), 1),
                "naive_p50_us": round(_pct(slow_t, 0.5), 1),
                "naive_p99_us": round(_pct(slow_t, 0.99), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
