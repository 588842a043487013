"""The key ring (files, rotation, concurrency) and key distribution (JWKS, unknown-kid refresh)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from provisioning.core import signing
from provisioning.core.errors import ConfigError, Unauthorized, Unreachable
from provisioning.core.signing import (
    HttpJwks,
    JwksSource,
    KeyRing,
    StaticJwks,
    TokenVerifier,
    jwk_thumbprint,
    verify_with_ring,
)

NOW = 1_800_000_000.0
AUD = "orchestrator"
ISS = "control-center"


class Clock:
    """A settable clock, so tests move time instead of sleeping."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingSource:
    """Wraps a source and counts plain and refresh fetches."""

    def __init__(self, inner: JwksSource) -> None:
        self.inner = inner
        self.fetches = 0
        self.refreshes = 0

    async def fetch_jwks(self, *, refresh: bool = False) -> dict[str, Any]:
        self.fetches += 1
        self.refreshes += refresh
        return await self.inner.fetch_jwks(refresh=refresh)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _serve(ring: KeyRing, log: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        log.append(request)
        return httpx.Response(200, json=ring.jwks())

    return httpx.MockTransport(handler)


def test_key_files_are_0600_and_the_directory_0700(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        ring = KeyRing(tmp_path / "keys" / "cc")
        ring.load_or_create()
    finally:
        os.umask(old)
    assert _mode(ring.directory) == 0o700
    files = list(ring.directory.iterdir())
    assert sorted(p.suffix for p in files) == [".json", ".lock", ".pem"]
    assert all(_mode(p) == 0o600 for p in files)


def test_a_key_file_readable_by_others_is_refused_not_silently_fixed(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    key = ring.load_or_create()
    pem = ring.directory / f"key-{key.kid}.pem"
    pem.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        KeyRing(ring.directory).load_or_create()
    assert _mode(pem) == 0o640


def test_a_directory_writable_by_others_is_refused_and_a_readable_one_tightened(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    KeyRing(directory).load_or_create()
    assert _mode(directory) == 0o700
    directory.chmod(0o770)
    with pytest.raises(ConfigError, match="writable by group or others"):
        KeyRing(directory).load_or_create()


@pytest.mark.parametrize(
    "damage",
    ["index-not-json", "index-kid-traversal", "key-swapped", "key-not-pem", "key-symlink"],
)
def test_a_damaged_or_tampered_ring_is_refused(tmp_path: Path, damage: str) -> None:
    ring = KeyRing(tmp_path / "keys")
    kid = ring.load_or_create().kid
    index, pem = ring.directory / "keyring.json", ring.directory / f"key-{kid}.pem"
    if damage == "index-not-json":
        index.write_text("{", encoding="utf-8")
    elif damage == "index-kid-traversal":
        doc = json.loads(index.read_text(encoding="utf-8"))
        doc["keys"][0]["kid"] = "../../etc/passwd"
        index.write_text(json.dumps(doc), encoding="utf-8")
    elif damage == "key-swapped":
        other = KeyRing(tmp_path / "other")
        other_kid = other.load_or_create().kid
        pem.write_bytes((other.directory / f"key-{other_kid}.pem").read_bytes())
    elif damage == "key-not-pem":
        pem.write_bytes(b"garbage")
    else:
        target = tmp_path / "elsewhere.pem"
        target.write_bytes(pem.read_bytes())
        target.chmod(0o600)
        pem.unlink()
        pem.symlink_to(target)
    with pytest.raises(ConfigError):
        KeyRing(ring.directory).load_or_create()
    with pytest.raises(ConfigError):
        KeyRing(ring.directory).jwks()


def test_kid_is_the_rfc_7638_thumbprint_of_the_public_key() -> None:
    # RFC 8037, appendix A.2 and A.3
    x = base64.urlsafe_b64decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
    key = Ed25519PublicKey.from_public_bytes(x)
    assert jwk_thumbprint(key) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_load_or_create_twice_keeps_the_first_key(tmp_path: Path) -> None:
    first = KeyRing(tmp_path).load_or_create()
    again = KeyRing(tmp_path).load_or_create()
    assert again.kid == first.kid
    assert again.public_jwk() == first.public_jwk()


def test_a_ring_that_was_never_created_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="load_or_create"):
        KeyRing(tmp_path / "absent").sign({"sub": "a"}, audience=AUD, ttl_s=60, issuer=ISS)


def test_two_rings_with_different_prefixes_share_a_directory(tmp_path: Path) -> None:
    cc = KeyRing(tmp_path, prefix="cc-").load_or_create()
    keeper = KeyRing(tmp_path, prefix="keeper-").load_or_create()
    assert cc.kid != keeper.kid
    assert KeyRing(tmp_path, prefix="cc-").current.kid == cc.kid


def test_a_prefix_with_a_path_separator_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        KeyRing(tmp_path, prefix="../x")


def test_sign_sets_the_header_and_the_registered_claims(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, clock=Clock())
    key = ring.load_or_create()
    token = ring.sign(
        {"sub": "alice", "exp": 1, "roles": ["admin"]}, audience=AUD, ttl_s=900, issuer=ISS
    )
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "typ": "JWT", "kid": key.kid}
    claims = verify_with_ring(ring, token, AUD, issuer=ISS, leeway_s=0)
    assert claims["iat"] == claims["nbf"] == int(NOW)
    assert claims["exp"] == int(NOW) + 900
    assert (claims["aud"], claims["iss"], claims["roles"]) == (AUD, ISS, ["admin"])
    assert len(claims["jti"]) >= 16


def test_sign_keeps_a_given_jti_and_draws_a_fresh_one_otherwise(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    ring.load_or_create()

    def jti(claims: dict[str, Any]) -> str:
        token = ring.sign(claims, audience=AUD, ttl_s=60, issuer=ISS)
        return str(verify_with_ring(ring, token, AUD)["jti"])

    assert jti({"sub": "a", "jti": "op-42"}) == "op-42"
    assert jti({"sub": "a"}) != jti({"sub": "a"})


def test_sign_refuses_a_non_positive_ttl(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    ring.load_or_create()
    with pytest.raises(ValueError, match="ttl_s"):
        ring.sign({"sub": "a"}, audience=AUD, ttl_s=0, issuer=ISS)


def test_a_signing_key_never_prints_its_private_key(tmp_path: Path) -> None:
    key = KeyRing(tmp_path).load_or_create()
    assert "private" not in repr(key)
    assert set(key.public_jwk()) == {"kty", "crv", "x", "kid", "alg", "use"}


def test_tokens_verify_with_pyjwt_against_the_published_jwks(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    ring.load_or_create()
    token = ring.sign({"sub": "alice"}, audience=AUD, ttl_s=60, issuer=ISS)
    jwk = jwt.PyJWKSet.from_dict(ring.jwks())[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(token, jwk, algorithms=["EdDSA"], audience=AUD, issuer=ISS)
    assert claims["sub"] == "alice"


async def test_rotation_keeps_the_old_key_during_the_overlap_then_drops_it(
    tmp_path: Path,
) -> None:
    clock = Clock()
    ring = KeyRing(tmp_path, clock=clock)
    old = ring.load_or_create()
    old_token = ring.sign({"sub": "alice"}, audience=AUD, ttl_s=3600, issuer=ISS)
    verifier = TokenVerifier(StaticJwks(ring), audience=AUD, clock=clock)

    clock.now += 10
    new = ring.rotate(keep_old_for_s=600)
    assert new.kid != old.kid
    assert [k["kid"] for k in ring.jwks()["keys"]] == [new.kid, old.kid]
    assert (await verifier.verify(old_token))["sub"] == "alice"
    assert verify_with_ring(ring, old_token, AUD)["sub"] == "alice"
    new_token = ring.sign({"sub": "bob"}, audience=AUD, ttl_s=3600, issuer=ISS)
    assert jwt.get_unverified_header(new_token)["kid"] == new.kid

    clock.now += 601
    assert [k["kid"] for k in ring.jwks()["keys"]] == [new.kid]
    with pytest.raises(Unauthorized) as exc:
        await verifier.verify(old_token)
    assert exc.value.details["reason"] == "unknown_kid"
    with pytest.raises(Unauthorized):
        verify_with_ring(ring, old_token, AUD)
    assert (await verifier.verify(new_token))["sub"] == "bob"

    assert ring.prune() == [old.kid]
    assert not (tmp_path / f"key-{old.kid}.pem").exists()
    assert [k.kid for k in KeyRing(tmp_path, clock=clock).keys()] == [new.kid]


def test_rotating_with_no_overlap_drops_the_old_key_at_once(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    old = ring.load_or_create()
    token = ring.sign({"sub": "alice"}, audience=AUD, ttl_s=3600, issuer=ISS)
    ring.rotate(keep_old_for_s=0)
    assert old.kid not in {k["kid"] for k in ring.jwks()["keys"]}
    assert not (tmp_path / f"key-{old.kid}.pem").exists()
    with pytest.raises(Unauthorized):
        verify_with_ring(ring, token, AUD)


def test_a_rotation_by_another_process_is_seen_without_reloading(tmp_path: Path) -> None:
    worker_a, worker_b = KeyRing(tmp_path), KeyRing(tmp_path)
    old = worker_a.load_or_create()
    worker_b.load_or_create()
    new = worker_b.rotate(keep_old_for_s=300)
    assert worker_a.current.kid == new.kid
    assert {k["kid"] for k in worker_a.jwks()["keys"]} == {old.kid, new.kid}


_CHILD = """
import sys
from pathlib import Path
from provisioning.core.signing import KeyRing
print("ready", flush=True)
sys.stdin.readline()
print(KeyRing(Path(sys.argv[1])).load_or_create().kid, flush=True)
"""


def test_processes_creating_the_ring_at_once_end_up_with_one_key(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for child in children:  # every child is imported and waiting
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        kids = {child.communicate(timeout=60)[0].strip() for child in children}
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert all(child.returncode == 0 for child in children)
    assert len(kids) == 1
    assert [p.name for p in directory.glob("*.pem")] == [f"key-{kids.pop()}.pem"]


async def test_the_jwks_round_trips_through_http_jwks(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    ring.load_or_create()
    requests: list[httpx.Request] = []
    ticks = Clock(0.0)
    source = HttpJwks(
        "http://cc.test/.well-known/jwks.json",
        transport=_serve(ring, requests),
        cache_ttl_s=300,
        monotonic=ticks,
    )
    verifier = TokenVerifier(source, audience=AUD, issuer=ISS)
    token = ring.sign({"sub": "alice"}, audience=AUD, ttl_s=60, issuer=ISS)

    assert (await verifier.verify(token))["sub"] == "alice"
    assert (await verifier.verify(token))["sub"] == "alice"
    assert len(requests) == 1
    assert str(requests[0].url) == "http://cc.test/.well-known/jwks.json"
    assert await source.fetch_jwks() == ring.jwks()

    ticks.now += 301
    await verifier.verify(token)
    assert len(requests) == 2


async def test_an_unknown_kid_triggers_exactly_one_refresh(tmp_path: Path) -> None:
    ring, stranger = KeyRing(tmp_path / "ours"), KeyRing(tmp_path / "theirs")
    ring.load_or_create()
    stranger.load_or_create()
    ticks = Clock(0.0)
    source = CountingSource(StaticJwks(ring))
    verifier = TokenVerifier(source, audience=AUD, min_refresh_interval_s=10, monotonic=ticks)
    foreign = stranger.sign({"sub": "mallory"}, audience=AUD, ttl_s=60, issuer=ISS)

    for _ in range(5):
        with pytest.raises(Unauthorized) as exc:
            await verifier.verify(foreign)
        assert exc.value.details["reason"] == "unknown_kid"
    assert source.refreshes == 1

    ticks.now += 10
    with pytest.raises(Unauthorized):
        await verifier.verify(foreign)
    assert source.refreshes == 2


async def test_concurrent_verifies_of_an_unknown_kid_share_one_refresh(tmp_path: Path) -> None:
    ring, stranger = KeyRing(tmp_path / "ours"), KeyRing(tmp_path / "theirs")
    ring.load_or_create()
    stranger.load_or_create()
    source = CountingSource(StaticJwks(ring))
    verifier = TokenVerifier(source, audience=AUD)
    foreign = stranger.sign({"sub": "mallory"}, audience=AUD, ttl_s=60, issuer=ISS)
    results = await asyncio.gather(
        *(verifier.verify(foreign) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, Unauthorized) for r in results)
    assert source.refreshes == 1


async def test_a_key_rotated_in_after_the_cache_was_filled_is_found_by_the_refresh(
    tmp_path: Path,
) -> None:
    ring = KeyRing(tmp_path)
    ring.load_or_create()
    requests: list[httpx.Request] = []
    source = HttpJwks("http://cc.test/jwks", transport=_serve(ring, requests), cache_ttl_s=3600)
    verifier = TokenVerifier(source, audience=AUD)
    await verifier.verify(ring.sign({"sub": "a"}, audience=AUD, ttl_s=60, issuer=ISS))

    ring.rotate(keep_old_for_s=300)
    claims = await verifier.verify(ring.sign({"sub": "b"}, audience=AUD, ttl_s=60, issuer=ISS))
    assert claims["sub"] == "b"
    assert len(requests) == 2


async def test_http_jwks_serves_its_cached_set_while_the_issuer_is_down(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    ring.load_or_create()
    up = True

    def handler(request: httpx.Request) -> httpx.Response:
        if not up:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=ring.jwks())

    ticks = Clock(0.0)
    source = HttpJwks(
        "http://cc.test/jwks",
        transport=httpx.MockTransport(handler),
        cache_ttl_s=60,
        max_stale_s=600,
        monotonic=ticks,
    )
    verifier = TokenVerifier(source, audience=AUD)
    token = ring.sign({"sub": "a"}, audience=AUD, ttl_s=3600, issuer=ISS)
    await verifier.verify(token)

    up = False
    ticks.now += 120
    assert (await verifier.verify(token))["sub"] == "a"
    ticks.now += 600
    for _ in range(2):  # past max_stale_s, also inside the retry back-off
        with pytest.raises(Unauthorized) as exc:
            await verifier.verify(token)
        assert exc.value.details["reason"] == "keys_unavailable"

    up = True
    ticks.now += 30
    assert (await verifier.verify(token))["sub"] == "a"


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(500, json={"keys": []}),
        httpx.Response(200, content=b"<html>"),
        httpx.Response(200, json=["not", "a", "set"]),
        httpx.Response(200, json={"keys": "nope"}),
        httpx.Response(200, content=b'{"keys": [' + b'{"kty": "OKP"},' * 20000 + b"{}]}"),
        httpx.Response(302, headers={"Location": "http://evil.test/jwks"}),
    ],
    ids=["5xx", "html", "array", "keys-not-list", "oversize", "redirect"],
)
async def test_http_jwks_refuses_an_answer_that_is_not_a_jwk_set(response: httpx.Response) -> None:
    source = HttpJwks("http://cc.test/jwks", transport=httpx.MockTransport(lambda r: response))
    with pytest.raises(Unreachable):
        await source.fetch_jwks()


async def test_jwks_entries_that_are_not_ed25519_signing_keys_are_ignored(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    good = ring.load_or_create().public_jwk()
    bad: list[Any] = [
        "junk",
        {**good, "kid": "rsa", "kty": "RSA"},
        {**good, "kid": "enc", "use": "enc"},
        {**good, "kid": "hs", "alg": "HS256"},
        {**good, "kid": "short", "x": good["x"][:-2]},
        {**good, "kid": "../../etc/passwd"},
    ]

    class Fixed:
        async def fetch_jwks(self, *, refresh: bool = False) -> dict[str, Any]:
            return {"keys": [*bad, good]}

    verifier = TokenVerifier(Fixed(), audience=AUD)
    token = ring.sign({"sub": "a"}, audience=AUD, ttl_s=60, issuer=ISS)
    assert (await verifier.verify(token))["sub"] == "a"
    assert signing._parse_jwks({"keys": [*bad, good]}).keys() == {good["kid"]}


def test_the_index_records_creation_and_retirement_in_utc(tmp_path: Path) -> None:
    clock = Clock()
    ring = KeyRing(tmp_path, clock=clock)
    old = ring.load_or_create()
    clock.now += 5
    ring.rotate(keep_old_for_s=60)
    index = json.loads((tmp_path / "keyring.json").read_text(encoding="utf-8"))
    retired = next(k for k in index["keys"] if k["kid"] == old.kid)
    assert retired["created_at"] == "2027-01-15T08:00:00+00:00"
    assert retired["retired_at"] == "2027-01-15T08:00:05+00:00"
    assert retired["expires_at"] == "2027-01-15T08:01:05+00:00"


def test_every_public_name_is_exported() -> None:
    assert sorted(signing.__all__) == [
        "HttpJwks",
        "JwksSource",
        "KeyRing",
        "SigningKey",
        "StaticJwks",
        "TokenVerifier",
        "jwk_thumbprint",
        "verify_with_ring",
    ]
    assert isinstance(StaticJwks(KeyRing(Path("/nonexistent"))), JwksSource)
