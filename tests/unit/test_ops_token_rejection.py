"""Hostile operation messages: each must be refused by ``core.ops_token.verify_op`` with
a reason (the controller then terminates it), and the genuine one accepted. Real Ed25519 keys in
a real key ring; the verifier is the one the controller uses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provisioning.core.ops_token import OpRejected, canonical_params, verify_op
from provisioning.core.signing import KeyRing, StaticJwks, TokenVerifier

AUD, ISS = "prvng-ops", "prvng-ops-keeper"
SUBJECT = "ops.pending.server.create"
PARAMS = {"workspace": "/srv/ws", "infra": "demo", "servers": ["web-01"]}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Forge:
    def __init__(self, tmp: Path) -> None:
        self.ring = KeyRing(tmp / "keys")
        self.key = self.ring.load_or_create()
        self.verifier = TokenVerifier(StaticJwks(self.ring), audience=AUD, issuer=ISS, leeway_s=5)
        self.other = Ed25519PrivateKey.generate()

    def claims(self, **kw: Any) -> dict[str, Any]:
        now = int(time.time())
        base = {
            "iss": ISS,
            "aud": AUD,
            "sub": "u-alice",
            "jti": "0f8e7d6c-5b4a-4938-8271-605f4e3d2c1b",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "op_type": "server.create",
            "target": "demo/web-01",
            "params_sha256": hashlib.sha256(canonical_params(PARAMS)).hexdigest(),
        }
        base.update(kw)
        return {k: v for k, v in base.items() if v is not _DROP}

    def sign(self, claims: dict[str, Any], *, key: Any = None, **header: Any) -> str:
        h = {"kid": self.key.kid, "typ": "JWT", **header}
        return jwt.encode(claims, key or self.key.private_key, algorithm="EdDSA", headers=h)

    def message(self, token: str, params: Any = None, **extra: Any) -> bytes:
        return json.dumps(
            {"token": token, "params": PARAMS if params is None else params, **extra}
        ).encode()


_DROP = object()
Case = Callable[[Forge], tuple[str, bytes]]


def raw_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature)]
    )


def hmac_with_public_key(f: Forge) -> tuple[str, bytes]:
    pub = f.key.private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": f.key.kid}).encode())
    body = b64(json.dumps(f.claims()).encode())
    sig = hmac.new(pub, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return SUBJECT, f.message(f"{head}.{body}.{b64(sig)}")


def tampered_payload(f: Forge) -> tuple[str, bytes]:
    head, _body, sig = f.sign(f.claims()).split(".")
    body = b64(json.dumps(f.claims(target="prod/db-01")).encode())
    return SUBJECT, f.message(f"{head}.{body}.{sig}")


def swapped_signature(f: Forge) -> tuple[str, bytes]:
    a = f.sign(f.claims()).split(".")
    b = f.sign(f.claims(jti="11111111-2222-3333-4444-555555555555")).split(".")
    return SUBJECT, f.message(f"{a[0]}.{a[1]}.{b[2]}")


CASES: dict[str, Case] = {
    "alg none": lambda f: (
        SUBJECT,
        f.message(raw_token({"alg": "none", "typ": "JWT", "kid": f.key.kid}, f.claims())),
    ),
    "alg None capitalised": lambda f: (
        SUBJECT,
        f.message(raw_token({"alg": "None", "kid": f.key.kid}, f.claims())),
    ),
    "alg missing": lambda f: (
        SUBJECT,
        f.message(raw_token({"kid": f.key.kid}, f.claims(), b"x" * 64)),
    ),
    "HMAC signed with the public key": hmac_with_public_key,
    "RS256 header": lambda f: (
        SUBJECT,
        f.message(raw_token({"alg": "RS256", "kid": f.key.kid}, f.claims(), b"x" * 256)),
    ),
    "unknown kid": lambda f: (SUBJECT, f.message(f.sign(f.claims(), kid="not-a-known-kid"))),
    "kid missing": lambda f: (
        SUBJECT,
        f.message(raw_token({"alg": "EdDSA"}, f.claims(), b"x" * 64)),
    ),
    "kid path injection": lambda f: (
        SUBJECT,
        f.message(f.sign(f.claims(), kid="../../etc/passwd")),
    ),
    "kid sql injection": lambda f: (SUBJECT, f.message(f.sign(f.claims(), kid="x' OR '1'='1"))),
    "signed by another key with our kid": lambda f: (
        SUBJECT,
        f.message(f.sign(f.claims(), key=f.other)),
    ),
    "jku header": lambda f: (
        SUBJECT,
        f.message(f.sign(f.claims(), jku="https://evil.example/jwks.json")),
    ),
    "x5u header": lambda f: (
        SUBJECT,
        f.message(f.sign(f.claims(), x5u="https://evil.example/cert.pem")),
    ),
    "embedded jwk header": lambda f: (
        SUBJECT,
        f.message(f.sign(f.claims(), jwk={"kty": "OKP", "crv": "Ed25519", "x": "AA"})),
    ),
    "crit header": lambda f: (SUBJECT, f.message(f.sign(f.claims(), crit=["exp"]))),
    "expired": lambda f: (SUBJECT, f.message(f.sign(f.claims(exp=int(time.time()) - 60)))),
    "not yet valid": lambda f: (SUBJECT, f.message(f.sign(f.claims(nbf=int(time.time()) + 600)))),
    "issued in the future": lambda f: (
        SUBJECT,
        f.message(f.sign(f.claims(iat=int(time.time()) + 600))),
    ),
    "wrong audience": lambda f: (SUBJECT, f.message(f.sign(f.claims(aud="prvng")))),
    "audience list without ours": lambda f: (SUBJECT, f.message(f.sign(f.claims(aud=["a", "b"])))),
    "wrong issuer": lambda f: (SUBJECT, f.message(f.sign(f.claims(iss="prvng-control-center")))),
    "missing jti": lambda f: (SUBJECT, f.message(f.sign(f.claims(jti=_DROP)))),
    "empty jti": lambda f: (SUBJECT, f.message(f.sign(f.claims(jti="")))),
    "jti not a string": lambda f: (SUBJECT, f.message(f.sign(f.claims(jti=12345678)))),
    "jti with spaces": lambda f: (SUBJECT, f.message(f.sign(f.claims(jti="a b c d e f g h")))),
    "missing exp": lambda f: (SUBJECT, f.message(f.sign(f.claims(exp=_DROP)))),
    "exp not a number": lambda f: (SUBJECT, f.message(f.sign(f.claims(exp="tomorrow")))),
    "missing sub": lambda f: (SUBJECT, f.message(f.sign(f.claims(sub=_DROP)))),
    "missing op_type": lambda f: (SUBJECT, f.message(f.sign(f.claims(op_type=_DROP)))),
    "op_type of another subject": lambda f: (
        SUBJECT,
        f.message(f.sign(f.claims(op_type="server.delete"))),
    ),
    "op_type with wildcard": lambda f: ("ops.pending.>", f.message(f.sign(f.claims(op_type=">")))),
    "missing target": lambda f: (SUBJECT, f.message(f.sign(f.claims(target=_DROP)))),
    "missing params digest": lambda f: (SUBJECT, f.message(f.sign(f.claims(params_sha256=_DROP)))),
    "digest not hex": lambda f: (SUBJECT, f.message(f.sign(f.claims(params_sha256="z" * 64)))),
    "params edited": lambda f: (
        SUBJECT,
        f.message(f.sign(f.claims()), params={**PARAMS, "servers": ["db-01"]}),
    ),
    "params swapped for another op's": lambda f: (
        SUBJECT,
        f.message(f.sign(f.claims()), params={"workspace": "/other"}),
    ),
    "params reordered keys (same canonical form) but extra key": lambda f: (
        SUBJECT,
        f.message(f.sign(f.claims()), params={**PARAMS, "x": 1}),
    ),
    "payload tampered, old signature": tampered_payload,
    "signature of another token": swapped_signature,
    "signature truncated": lambda f: (SUBJECT, f.message(f.sign(f.claims())[:-10])),
    "two dots missing": lambda f: (SUBJECT, f.message("eyJhbGciOiJFZERTQSJ9")),
    "token not a string": lambda f: (SUBJECT, json.dumps({"token": 42, "params": PARAMS}).encode()),
    "params not an object": lambda f: (
        SUBJECT,
        json.dumps({"token": f.sign(f.claims()), "params": [1]}).encode(),
    ),
    "extra field beside token": lambda f: (SUBJECT, f.message(f.sign(f.claims()), approved=True)),
    "message not json": lambda f: (SUBJECT, b"\xff\xfe not json"),
    "message a list": lambda f: (SUBJECT, b"[]"),
    "oversize message": lambda f: (
        SUBJECT,
        f.message(f.sign(f.claims()), params={"blob": "x" * 300_000}),
    ),
    "oversize token": lambda f: (SUBJECT, f.message(f.sign(f.claims(pad="x" * 20_000)))),
    "deeply nested params": lambda f: (
        SUBJECT,
        b'{"token": "a.b.c", "params": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ),
}


@pytest.fixture
def forge(tmp_path: Path) -> Forge:
    return Forge(tmp_path)


def test_there_are_at_least_forty_hostile_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
async def test_a_hostile_message_is_refused_with_a_reason(forge: Forge, name: str) -> None:
    subject, data = CASES[name](forge)
    with pytest.raises(OpRejected) as err:
        await verify_op(forge.verifier, subject, data)
    assert err.value.reason and err.value.message


async def test_the_genuine_message_is_accepted(forge: Forge) -> None:
    op = await verify_op(forge.verifier, SUBJECT, forge.message(forge.sign(forge.claims())))
    assert (op.op_type, op.target, op.requester) == ("server.create", "demo/web-01", "u-alice")
    assert op.params == PARAMS
    # Key order of the params does not matter: the digest is over their canonical form.
    shuffled = dict(reversed(list(PARAMS.items())))
    again = await verify_op(
        forge.verifier, SUBJECT, forge.message(forge.sign(forge.claims()), params=shuffled)
    )
    assert again.jti == op.jti
