"""Hostile and malformed tokens: every one is rejected with ``Unauthorized`` for the right reason.

Decisions recorded here: ``typ`` may be absent or ``JWT`` (any case), anything else is refused;
surrounding whitespace and a ``Bearer`` prefix are refused (the HTTP layer strips the scheme,
the verifier never guesses); key material embedded in the token (``jwk``, ``jku``, ``x5u``,
``x5c``) is ignored, so a token signed by such a key fails like any foreign token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provisioning.core.errors import Unauthorized
from provisioning.core.signing import (
    KeyRing,
    StaticJwks,
    TokenVerifier,
    jwk_thumbprint,
    verify_with_ring,
)

NOW = 1_800_000_000
AUD = "orchestrator"
ISS = "control-center"
LEEWAY = 30
ED25519_L = 2**252 + 27742317777372353535851937790883648493


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass
class Ctx:
    ring: KeyRing
    key: Ed25519PrivateKey
    kid: str
    attacker: Ed25519PrivateKey

    def claims(self, **changes: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "sub": "alice",
            "aud": AUD,
            "iss": ISS,
            "iat": NOW,
            "nbf": NOW,
            "exp": NOW + 300,
            "jti": "j-1",
        }
        base.update(changes)
        return {k: v for k, v in base.items() if v is not DROP}

    def header(self, **changes: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"alg": "EdDSA", "typ": "JWT", "kid": self.kid}
        base.update(changes)
        return {k: v for k, v in base.items() if v is not DROP}

    def forge(
        self,
        header: dict[str, Any] | str | None = None,
        claims: dict[str, Any] | str | None = None,
        key: object = ...,
    ) -> str:
        """A compact token; ``header``/``claims`` given as str are used verbatim as JSON text."""
        h = header if isinstance(header, str) else json.dumps(header or self.header())
        c = claims if isinstance(claims, str) else json.dumps(claims or self.claims())
        signing_input = f"{b64(h)}.{b64(c)}"
        signer = self.key if key is ... else key
        sig = signer.sign(signing_input.encode()) if isinstance(signer, Ed25519PrivateKey) else b""
        return f"{signing_input}.{b64(sig)}"

    def good(self) -> str:
        return self.forge()


DROP = object()


def _hs256(ctx: Ctx, secret: bytes) -> str:
    signing_input = f"{b64(json.dumps(ctx.header(alg='HS256')))}.{b64(json.dumps(ctx.claims()))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _public(ctx: Ctx) -> Any:
    return ctx.key.public_key()


def _pem(ctx: Ctx) -> bytes:
    return _public(ctx).public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _raw(ctx: Ctx) -> bytes:
    return _public(ctx).public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _jwk_of(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}


def _replace_part(token: str, index: int, text: str) -> str:
    parts = token.split(".")
    parts[index] = text
    return ".".join(parts)


def _raw_payload(ctx: Ctx, payload: bytes) -> str:
    signing_input = f"{b64(json.dumps(ctx.header()))}.{b64(payload)}"
    return f"{signing_input}.{b64(ctx.key.sign(signing_input.encode()))}"


def _high_s(ctx: Ctx) -> str:
    """The same signature with S + L: valid arithmetic, non-canonical encoding (malleability)."""
    token = ctx.good()
    sig = base64.urlsafe_b64decode(token.split(".")[2] + "==")
    s = int.from_bytes(sig[32:], "little") + ED25519_L
    return _replace_part(token, 2, b64(sig[:32] + s.to_bytes(32, "little")))


def _noncanonical_b64_signature(ctx: Ctx) -> str:
    """Unused low bits set in the last character: decodes to the same bytes, different text."""
    token = ctx.good()
    sig = token.split(".")[2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(sig) == 86  # 512 bits in 86 characters: the last one has 4 unused bits
    last = alphabet[alphabet.index(sig[-1]) | 0b1]
    return _replace_part(token, 2, sig[:-1] + last)


# (reason expected in Unauthorized.details, token builder)
CASES: dict[str, tuple[str, Callable[[Ctx], Any]]] = {
    # algorithm confusion
    "alg-none-no-signature": ("bad_alg", lambda c: c.forge(c.header(alg="none"), key=None)),
    "alg-none-with-signature": ("bad_alg", lambda c: c.forge(c.header(alg="none"))),
    "alg-None-capitalised": ("bad_alg", lambda c: c.forge(c.header(alg="None"), key=None)),
    "hs256-with-public-pem": ("bad_alg", lambda c: _hs256(c, _pem(c))),
    "hs256-with-raw-public-bytes": ("bad_alg", lambda c: _hs256(c, _raw(c))),
    "hs256-with-x-value": ("bad_alg", lambda c: _hs256(c, b64(_raw(c)).encode())),
    "rs256-header": ("bad_alg", lambda c: c.forge(c.header(alg="RS256"))),
    "alg-ed25519-not-eddsa": ("bad_alg", lambda c: c.forge(c.header(alg="Ed25519"))),
    "alg-missing": ("bad_alg", lambda c: c.forge(c.header(alg=DROP))),
    # key selection
    "unknown-kid": (
        "unknown_kid",
        lambda c: c.forge(c.header(kid=jwk_thumbprint(c.attacker.public_key())), key=c.attacker),
    ),
    "missing-kid": ("bad_kid", lambda c: c.forge(c.header(kid=DROP))),
    "kid-path-traversal": ("bad_kid", lambda c: c.forge(c.header(kid="../../etc/passwd"))),
    "kid-not-a-string": ("bad_kid", lambda c: c.forge(c.header(kid=7))),
    "kid-empty": ("bad_kid", lambda c: c.forge(c.header(kid=""))),
    "other-ed25519-key-with-known-kid": ("bad_signature", lambda c: c.forge(key=c.attacker)),
    "jwk-header-with-attacker-key": (
        "bad_signature",
        lambda c: c.forge(c.header(jwk=_jwk_of(c.attacker)), key=c.attacker),
    ),
    "jwk-header-with-attacker-kid": (
        "unknown_kid",
        lambda c: c.forge(
            c.header(
                kid=jwk_thumbprint(c.attacker.public_key()),
                jwk={**_jwk_of(c.attacker), "kid": jwk_thumbprint(c.attacker.public_key())},
            ),
            key=c.attacker,
        ),
    ),
    "jku-header": (
        "bad_signature",
        lambda c: c.forge(c.header(jku="https://evil.test/jwks.json"), key=c.attacker),
    ),
    "x5u-header": (
        "bad_signature",
        lambda c: c.forge(c.header(x5u="https://evil.test/cert.pem"), key=c.attacker),
    ),
    # signature and integrity
    "tampered-payload": (
        "bad_signature",
        lambda c: _replace_part(c.good(), 1, b64(json.dumps(c.claims(sub="admin")))),
    ),
    "tampered-header": (
        "bad_signature",
        lambda c: _replace_part(c.good(), 0, b64(json.dumps(c.header(extra=1)))),
    ),
    "signature-stripped": ("bad_signature", lambda c: c.forge(key=None)),
    "signature-of-another-token": (
        "bad_signature",
        lambda c: _replace_part(c.good(), 2, c.forge(claims=c.claims(sub="bob")).split(".")[2]),
    ),
    "signature-high-s": ("bad_signature", _high_s),
    "signature-noncanonical-base64": ("malformed", _noncanonical_b64_signature),
    "signature-with-padding": ("malformed", lambda c: c.good() + "=="),
    # structure
    "truncated-signature": ("bad_signature", lambda c: c.good()[:-22]),
    "truncated-mid-character": ("malformed", lambda c: c.good()[:-1]),
    "two-segments": ("malformed", lambda c: c.good().rsplit(".", 1)[0]),
    "four-segments": ("malformed", lambda c: c.good() + "." + b64("x")),
    "empty-string": ("malformed", lambda c: ""),
    "dots-only": ("malformed", lambda c: ".."),
    "non-base64-garbage": ("malformed", lambda c: "!!!.@@@.###"),
    "non-ascii": ("malformed", lambda c: c.good()[:-1] + "é"),
    "not-a-string": ("malformed", lambda c: c.good().encode()),
    "header-json-array": ("malformed", lambda c: c.forge('["EdDSA"]')),
    "header-not-json": ("malformed", lambda c: c.forge("{alg: EdDSA}")),
    "header-duplicate-alg": (
        "malformed",
        lambda c: c.forge(f'{{"alg":"none","alg":"EdDSA","kid":"{c.kid}"}}'),
    ),
    "header-deeply-nested": ("malformed", lambda c: c.forge("[" * 2400 + "]" * 2400)),
    "payload-deeply-nested": (
        "malformed",
        lambda c: c.forge(claims='{"sub": "a", "x": ' + "[" * 2000 + "]" * 2000 + "}"),
    ),
    "payload-not-utf8": ("malformed", lambda c: _raw_payload(c, b"\xff\xfe{}")),
    "payload-json-array": ("malformed", lambda c: c.forge(claims='["alice"]')),
    "payload-duplicate-sub": (
        "malformed",
        lambda c: c.forge(claims=json.dumps(c.claims())[:-1] + ', "sub": "admin"}'),
    ),
    "payload-nan": (
        "malformed",
        lambda c: c.forge(claims=json.dumps(c.claims())[:-1] + ', "exp2": NaN}'),
    ),
    "oversize": (
        "too_large",
        lambda c: c.forge(claims=c.claims(pad="x" * 9000)),
    ),
    "leading-whitespace": ("malformed", lambda c: " " + c.good()),
    "trailing-whitespace": ("malformed", lambda c: c.good() + " "),
    "trailing-newline": ("malformed", lambda c: c.good() + "\n"),
    "bearer-prefix": ("malformed", lambda c: "Bearer " + c.good()),
    # header policy
    "crit-unknown-extension": (
        "bad_header",
        lambda c: c.forge(
            c.header(crit=["http://example.invalid/ext"], **{"http://example.invalid/ext": 1})
        ),
    ),
    "crit-b64-false": ("bad_header", lambda c: c.forge(c.header(crit=["b64"], b64=False))),
    "typ-other": ("bad_header", lambda c: c.forge(c.header(typ="at+jwt"))),
    "typ-not-a-string": ("bad_header", lambda c: c.forge(c.header(typ=1))),
    # time claims
    "expired": ("expired", lambda c: c.forge(claims=c.claims(exp=NOW - LEEWAY - 1))),
    "expired-exactly-at-leeway": ("expired", lambda c: c.forge(claims=c.claims(exp=NOW - LEEWAY))),
    "nbf-beyond-leeway": ("not_yet_valid", lambda c: c.forge(claims=c.claims(nbf=NOW + 31))),
    "iat-far-future": ("not_yet_valid", lambda c: c.forge(claims=c.claims(iat=NOW + 86400))),
    "exp-as-string": ("bad_claim", lambda c: c.forge(claims=c.claims(exp=str(NOW + 300)))),
    "exp-as-bool": ("bad_claim", lambda c: c.forge(claims=c.claims(exp=True))),
    "exp-null": ("bad_claim", lambda c: c.forge(claims=c.claims(exp=None))),
    "iat-as-string": ("bad_claim", lambda c: c.forge(claims=c.claims(iat="now"))),
    "exp-huge": ("bad_claim", lambda c: c.forge(claims=c.claims(exp=10**400))),
    # required claims
    "missing-exp": ("missing_claim", lambda c: c.forge(claims=c.claims(exp=DROP))),
    "missing-sub": ("missing_claim", lambda c: c.forge(claims=c.claims(sub=DROP))),
    "missing-aud": ("missing_claim", lambda c: c.forge(claims=c.claims(aud=DROP))),
    "missing-iat": ("missing_claim", lambda c: c.forge(claims=c.claims(iat=DROP))),
    "sub-empty": ("bad_claim", lambda c: c.forge(claims=c.claims(sub=""))),
    "sub-not-a-string": ("bad_claim", lambda c: c.forge(claims=c.claims(sub=42))),
    # audience and issuer
    "wrong-aud": ("wrong_audience", lambda c: c.forge(claims=c.claims(aud="billing"))),
    "aud-list-without-ours": (
        "wrong_audience",
        lambda c: c.forge(claims=c.claims(aud=["billing", "ops-controller"])),
    ),
    "aud-empty-list": ("wrong_audience", lambda c: c.forge(claims=c.claims(aud=[]))),
    "aud-not-a-string": ("bad_claim", lambda c: c.forge(claims=c.claims(aud={"orchestrator": 1}))),
    "ops-controller-token-to-orchestrator": (
        "wrong_audience",
        lambda c: c.ring.sign({"sub": "keeper"}, audience="ops-controller", ttl_s=60, issuer=ISS),
    ),
    "wrong-issuer": ("wrong_issuer", lambda c: c.forge(claims=c.claims(iss="evil"))),
}


@pytest.fixture
def ctx(tmp_path: Path) -> Ctx:
    ring = KeyRing(tmp_path, clock=lambda: float(NOW))
    key = ring.load_or_create()
    return Ctx(ring, key.private_key, key.kid, Ed25519PrivateKey.generate())


def _verifier(ctx: Ctx) -> TokenVerifier:
    return TokenVerifier(
        StaticJwks(ctx.ring), audience=AUD, issuer=ISS, leeway_s=LEEWAY, clock=lambda: float(NOW)
    )


def test_there_are_at_least_25_hostile_cases() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize(("reason", "build"), CASES.values(), ids=CASES.keys())
async def test_a_hostile_token_is_rejected_for_its_reason(
    ctx: Ctx, reason: str, build: Callable[[Ctx], Any]
) -> None:
    token = build(ctx)
    with pytest.raises(Unauthorized) as exc:
        await _verifier(ctx).verify(token)
    assert type(exc.value) is Unauthorized
    assert exc.value.details == {"reason": reason}
    wire = json.dumps(exc.value.to_wire())
    for part in str(token).split("."):
        if len(part) > 8:
            assert part not in wire, "the rejection echoes the token"
    assert ctx.ring.current.public_jwk()["x"] not in wire


@pytest.mark.parametrize(("reason", "build"), CASES.values(), ids=CASES.keys())
def test_the_sync_helper_rejects_the_same_tokens(
    ctx: Ctx, reason: str, build: Callable[[Ctx], Any]
) -> None:
    with pytest.raises(Unauthorized) as exc:
        verify_with_ring(ctx.ring, build(ctx), AUD, issuer=ISS, leeway_s=LEEWAY)
    assert exc.value.details == {"reason": reason}


async def test_a_fresh_token_verifies_with_its_claims(ctx: Ctx) -> None:
    token = ctx.ring.sign(
        {"sub": "alice", "roles": ["operator"]}, audience=AUD, ttl_s=60, issuer=ISS
    )
    claims = await _verifier(ctx).verify(token)
    assert claims["sub"] == "alice"
    assert claims["roles"] == ["operator"]
    assert claims["aud"] == AUD


@pytest.mark.parametrize(
    "changes",
    [
        {"exp": NOW - LEEWAY + 1},
        {"nbf": NOW + LEEWAY},
        {"iat": NOW + LEEWAY},
        {"aud": ["billing", AUD]},
        {"nbf": DROP, "jti": DROP},
    ],
    ids=["exp-inside-leeway", "nbf-inside-leeway", "iat-inside-leeway", "aud-list", "optional"],
)
async def test_a_token_within_the_leeway_and_rules_is_accepted(
    ctx: Ctx, changes: dict[str, Any]
) -> None:
    claims = await _verifier(ctx).verify(ctx.forge(claims=ctx.claims(**changes)))
    assert claims["sub"] == "alice"


@pytest.mark.parametrize(
    "header",
    [{"typ": DROP}, {"typ": "jwt"}, {"cty": "json", "x-extra": 1}],
    ids=["no-typ", "lowercase-typ", "unknown-non-critical-headers"],
)
async def test_benign_header_variations_are_accepted(ctx: Ctx, header: dict[str, Any]) -> None:
    claims = await _verifier(ctx).verify(ctx.forge(ctx.header(**header)))
    assert claims["sub"] == "alice"


async def test_leeway_zero_rejects_what_the_default_leeway_accepts(ctx: Ctx) -> None:
    token = ctx.forge(claims=ctx.claims(exp=NOW - 5))
    assert (await _verifier(ctx).verify(token))["sub"] == "alice"
    strict = TokenVerifier(StaticJwks(ctx.ring), audience=AUD, leeway_s=0, clock=lambda: NOW)
    with pytest.raises(Unauthorized):
        await strict.verify(token)
