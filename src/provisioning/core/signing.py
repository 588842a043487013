"""Ed25519 JWT signing keys and a strict verifier that needs only public keys.

The control center signs access tokens and the ops-keeper signs approved operations with a
:class:`KeyRing`; every other service checks them with a :class:`TokenVerifier` fed by a
:class:`JwksSource` (the issuer's ``/.well-known/jwks.json`` over HTTP, or a ring in-process)::

    KeyRing ──sign()──▶ compact JWT ─────────────────▶ TokenVerifier.verify() ──▶ claims
       └──jwks()──▶ StaticJwks | HttpJwks ──fetch_jwks()──┘   (any failure: Unauthorized)

**Keys on disk.** A ring is a directory (mode 0700) holding one PKCS#8 PEM file per private key
(mode 0600, ``<prefix>key-<kid>.pem``) and a JSON index ``<prefix>keyring.json`` listing each
key's ``kid``, ``created_at``, ``retired_at`` and ``expires_at`` (ISO 8601, UTC). ``prefix`` lets
two rings share one directory. Every write goes to a temporary file, is fsynced, then
``os.replace``-d into place, always the key file before the index that names it; writers hold an
``fcntl`` lock on ``<prefix>keyring.lock``, so two processes starting at once end up with one
key. Readers need no lock: they re-read the index whenever its inode or mtime changes, so a
rotation done by one worker is seen by the others on their next ``sign`` or ``jwks``.

A key file readable or writable by group or others is **refused** (:class:`ConfigError`), as
OpenSSH does: such a key must be presumed leaked, and silently fixing the mode would hide that.
A directory writable by group or others is refused too (someone could swap keys); one merely
readable by them is tightened to 0700 with a warning.

**kid** is the RFC 7638 JWK thumbprint (SHA-256, base64url without padding) of the public key:
stable, derivable by anyone holding the public key, and checked against the key file on load.

**Rotation.** :meth:`KeyRing.rotate` makes a new current key and retires the previous one, which
stays in the JWKS for ``keep_old_for_s`` seconds (choose at least the longest token TTL, so
tokens signed just before the rotation still verify) and is then left out of the JWKS and
deleted on the next ``rotate``/``load_or_create``/``prune``. ``keep_old_for_s=0`` drops the old
key at once, for a compromised key.

**Verification** is written against RFC 7515/7519 rather than delegated, so that every decision
is explicit: the token is ASCII base64url in exactly three canonical segments (no whitespace, no
padding, at most ``max_token_bytes``); the header is a JSON object without duplicate names whose
``alg`` is exactly ``EdDSA`` (the algorithm is pinned, never read from the token), whose ``kid``
is a known key id, whose ``typ``, if present, is ``JWT`` and which has no ``crit``. Key material
embedded in the token (``jwk``, ``jku``, ``x5u``, ``x5c``) is ignored: keys come only from the
source. On an unknown ``kid`` the verifier refreshes the source once, at most every
``min_refresh_interval_s``, before rejecting. Claims: ``exp`` and ``aud`` are always required;
numeric dates must be numbers (not strings or booleans); ``exp``, ``nbf`` and ``iat`` (not in the
future) are checked with ``leeway_s``. Rejections carry a short stable ``reason`` in their
details, and never echo the token, its claims or key material.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from provisioning.core.errors import ConfigError, ProvisioningError, Unauthorized, Unreachable
from provisioning.core.logging import get_logger

__all__ = [
    "HttpJwks",
    "JwksSource",
    "KeyRing",
    "SigningKey",
    "StaticJwks",
    "TokenVerifier",
    "jwk_thumbprint",
    "verify_with_ring",
]

log = get_logger("signing")

_KID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{0,64}")
_B64URL_RE = re.compile(rb"[A-Za-z0-9_-]*")
_ALG = "EdDSA"


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(segment: bytes) -> bytes:
    """Strict base64url: alphabet only, no padding, canonical (re-encodes to the same text)."""
    if _B64URL_RE.fullmatch(segment) is None or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    if _b64e(data).encode("ascii") != segment:
        raise ValueError("not canonical base64url")
    return data


def jwk_thumbprint(public_key: Ed25519PublicKey) -> str:
    """The RFC 7638 thumbprint of an Ed25519 public key: SHA-256, base64url, no padding."""
    x = _b64e(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    return _b64e(hashlib.sha256(canonical.encode("ascii")).digest())


def _public_jwk(public_key: Ed25519PublicKey, kid: str) -> dict[str, str]:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64e(raw), "kid": kid, "alg": _ALG, "use": "sig"}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _ts(value: Any) -> float | None:
    return None if value is None else datetime.fromisoformat(str(value)).timestamp()


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key of a ring: its id, lifetime (epoch seconds) and the private key (never printed)."""

    kid: str
    created_at: float
    retired_at: float | None = None
    expires_at: float | None = None
    private_key: Ed25519PrivateKey = field(repr=False, compare=False, kw_only=True)

    def public_jwk(self) -> dict[str, str]:
        """The public half as a JWK (``kty``, ``crv``, ``x``, ``kid``, ``alg``, ``use``)."""
        return _public_jwk(self.private_key.public_key(), self.kid)

    def valid_at(self, now: float) -> bool:
        """Whether the key is current, or retired but still inside its overlap."""
        return self.expires_at is None or now < self.expires_at


class KeyRing:
    """Ed25519 signing keys kept in ``directory``: one current key, retired ones while valid.

    ``load_or_create`` creates the directory and the first key; the other methods read what is
    on disk (re-reading it when another process changed it). ``clock`` returns epoch seconds.
    """

    def __init__(
        self, directory: Path, *, prefix: str = "", clock: Callable[[], float] = time.time
    ) -> None:
        if _PREFIX_RE.fullmatch(prefix) is None:
            raise ConfigError(f"key ring prefix {prefix!r} may use only letters, digits, . _ -")
        self.directory = Path(directory)
        self.prefix = prefix
        self._clock = clock
        self._index = self.directory / f"{prefix}keyring.json"
        self._lockfile = self.directory / f"{prefix}keyring.lock"
        self._stamp: tuple[int, int] | None = None
        self._keys: tuple[SigningKey, ...] = ()

    # -- public API -------------------------------------------------------------------------

    def load_or_create(self) -> SigningKey:
        """Load the ring, creating the directory and a first key when there is none.

        Safe when several processes call it at once: they all end up with the same key.

        Raises:
            ConfigError: the directory or a key file has unsafe permissions or is corrupt.
        """
        self._prepare_directory()
        with self._locked():
            keys = self._read_disk()
            if not keys:
                keys = (self._new_key(),)
                self._write_index(keys)
            self._prune_locked(keys)
        return self.current

    @property
    def current(self) -> SigningKey:
        """The key that signs.

        Raises:
            ConfigError: the ring does not exist yet (call ``load_or_create``) or is corrupt.
        """
        return self._sync()[0]

    def keys(self) -> tuple[SigningKey, ...]:
        """The current key first, then retired keys still inside their overlap."""
        now = self._clock()
        return tuple(k for k in self._sync() if k.valid_at(now))

    def rotate(self, keep_old_for_s: float) -> SigningKey:
        """Make a new current key; the previous one verifies for ``keep_old_for_s`` more seconds.

        Raises:
            ValueError: ``keep_old_for_s`` is negative.
            ConfigError: the ring does not exist yet or is corrupt.
        """
        if keep_old_for_s < 0 or math.isnan(keep_old_for_s):
            raise ValueError("keep_old_for_s must be >= 0")
        self._prepare_directory()
        with self._locked():
            keys = self._read_disk()
            if not keys:
                raise ConfigError(f"no signing key in {self.directory}; call load_or_create()")
            now = self._clock()
            old = replace(keys[0], retired_at=now, expires_at=now + keep_old_for_s)
            keys = (self._new_key(), old, *keys[1:])
            self._write_index(keys)
            self._prune_locked(keys)
        return self.current

    def prune(self) -> list[str]:
        """Delete the keys whose overlap has ended; answer their kids.

        Raises:
            ConfigError: the ring does not exist yet or is corrupt.
        """
        with self._locked():
            return self._prune_locked(self._read_disk())

    def jwks(self) -> dict[str, Any]:
        """The JWK Set of the public keys that verify: current and still-valid retired ones.

        Raises:
            ConfigError: the ring does not exist yet or is corrupt.
        """
        return {"keys": [k.public_jwk() for k in self.keys()]}

    def sign(self, claims: dict[str, Any], *, audience: str, ttl_s: float, issuer: str) -> str:
        """A compact JWT of ``claims`` signed by the current key.

        Sets ``iat``, ``nbf``, ``exp``, ``aud`` and ``iss`` (overriding any in ``claims``) and a
        random ``jti`` unless ``claims`` has one. The header is ``{alg: EdDSA, typ: JWT, kid}``.

        Raises:
            ValueError: ``ttl_s`` is not positive.
            ConfigError: the ring does not exist yet or is corrupt.
        """
        if not ttl_s > 0 or math.isinf(ttl_s):
            raise ValueError("ttl_s must be a positive number of seconds")
        key = self.current
        now = self._clock()
        iat = int(now)
        payload = {**claims, "iat": iat, "nbf": iat, "exp": iat + math.ceil(ttl_s)}
        payload.update(aud=audience, iss=issuer)
        payload.setdefault("jti", secrets.token_urlsafe(16))
        return jwt.encode(
            payload, key.private_key, algorithm=_ALG, headers={"kid": key.kid, "typ": "JWT"}
        )

    # -- disk -------------------------------------------------------------------------------

    def _key_path(self, kid: str) -> Path:
        return self.directory / f"{self.prefix}key-{kid}.pem"

    def _prepare_directory(self) -> None:
        if not self.directory.exists():
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)  # mkdir's mode is filtered by the umask
        st = self.directory.stat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise ConfigError(f"{self.directory} must be a directory owned by this user")
        if st.st_mode & 0o022:
            raise ConfigError(
                f"{self.directory} is writable by group or others, so keys may have been "
                f"swapped: check its contents, then `chmod 700 {self.directory}`"
            )
        if st.st_mode & 0o077:
            log.warning("tightening key directory to 0700", extra={"path": str(self.directory)})
            os.chmod(self.directory, 0o700)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self._lockfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise ConfigError(f"no key ring in {self.directory}; call load_or_create()") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _sync(self) -> tuple[SigningKey, ...]:
        """The keys on disk, re-read only when the index file was replaced."""
        try:
            st = self._index.stat()
        except FileNotFoundError:
            raise ConfigError(f"no key ring in {self.directory}; call load_or_create()") from None
        if (st.st_ino, st.st_mtime_ns) != self._stamp or not self._keys:
            self._read_disk()
        if not self._keys:
            raise ConfigError(f"key ring {self._index} lists no key; delete it to start afresh")
        return self._keys

    def _read_disk(self) -> tuple[SigningKey, ...]:
        try:
            st = self._index.stat()
            doc = json.loads(self._index.read_text(encoding="utf-8"))
            entries = [
                (e["kid"], _ts(e["created_at"]), _ts(e["retired_at"]), _ts(e["expires_at"]))
                for e in doc["keys"]
            ]
        except FileNotFoundError:
            return ()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"key ring index {self._index} is corrupt: {exc!r}") from None
        keys: list[SigningKey] = []
        for i, (kid, created, retired, expires) in enumerate(entries):
            if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
                raise ConfigError(f"key ring index {self._index} has an invalid kid")
            try:
                private = self._load_private(kid)
            except FileNotFoundError:
                if i == 0:
                    raise ConfigError(f"signing key {self._key_path(kid)} is missing") from None
                continue  # a retired key being pruned by another process
            keys.append(SigningKey(kid, created or 0.0, retired, expires, private_key=private))
        self._keys, self._stamp = tuple(keys), (st.st_ino, st.st_mtime_ns)
        return self._keys

    def _load_private(self, kid: str) -> Ed25519PrivateKey:
        path = self._key_path(kid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:  # ELOOP: a symlink, which could point anywhere
            raise ConfigError(f"cannot open signing key {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise ConfigError(f"signing key {path} must be a regular file owned by this user")
            if st.st_mode & 0o077:
                raise ConfigError(
                    f"signing key {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable by "
                    f"others, so it may have leaked: `chmod 600 {path}`, then rotate the key"
                )
            pem = fh.read()
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise ConfigError(f"signing key {path} is not an unencrypted PEM key") from None
        if not isinstance(key, Ed25519PrivateKey) or jwk_thumbprint(key.public_key()) != kid:
            raise ConfigError(f"signing key {path} is not the Ed25519 key its name says")
        return key

    def _atomic_write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")  # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _new_key(self) -> SigningKey:
        private = Ed25519PrivateKey.generate()
        kid = jwk_thumbprint(private.public_key())
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._atomic_write(self._key_path(kid), pem)
        return SigningKey(kid, self._clock(), private_key=private)

    def _write_index(self, keys: Sequence[SigningKey]) -> None:
        entries = [
            {
                "kid": k.kid,
                "created_at": _iso(k.created_at),
                "retired_at": _iso(k.retired_at),
                "expires_at": _iso(k.expires_at),
            }
            for k in keys
        ]
        data = json.dumps({"version": 1, "keys": entries}, indent=2) + "\n"
        self._atomic_write(self._index, data.encode("utf-8"))
        self._read_disk()

    def _prune_locked(self, keys: Sequence[SigningKey]) -> list[str]:
        now = self._clock()
        gone = [k.kid for k in keys if not k.valid_at(now)]
        if gone:
            self._write_index([k for k in keys if k.valid_at(now)])
            for kid in gone:  # after the index stops naming them
                with contextlib.suppress(FileNotFoundError):
                    self._key_path(kid).unlink()
        return gone


# -- key sources ---------------------------------------------------------------------------


@runtime_checkable
class JwksSource(Protocol):
    """Where a verifier gets the issuer's public keys.

    ``fetch_jwks`` answers a JWK Set ``{"keys": [...]}``. It may answer from a cache, and should
    answer the *same object* while its content is unchanged (the verifier re-parses only a new
    object). ``refresh=True`` asks for the newest set, bypassing any cache; the verifier asks
    for it at most once per ``min_refresh_interval_s``, when it meets an unknown ``kid``.
    Failures raise a :class:`ProvisioningError` (the verifier turns it into ``Unauthorized``).
    """

    async def fetch_jwks(self, *, refresh: bool = False) -> dict[str, Any]: ...


class StaticJwks:
    """The keys of a :class:`KeyRing` in this process (always current; nothing to refresh)."""

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        self._last: dict[str, Any] | None = None

    async def fetch_jwks(self, *, refresh: bool = False) -> dict[str, Any]:
        """The ring's JWKS.

        Raises:
            ConfigError: the ring does not exist or is corrupt.
        """
        doc = self._ring.jwks()
        if self._last is not None and doc == self._last:
            return self._last  # the same object, so the verifier need not re-parse it
        self._last = doc
        return doc


class HttpJwks:
    """A JWK Set fetched over HTTP(S), cached for ``cache_ttl_s``.

    When a refetch fails, the cached set keeps being served (with a warning) for up to
    ``max_stale_s`` after it was fetched, retried at most every ``retry_after_s``. Redirects
    are not followed; answers over ``max_bytes`` are refused. ``transport`` is for tests.
    """

    def __init__(
        self,
        url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        cache_ttl_s: float = 300.0,
        max_stale_s: float = 3600.0,
        retry_after_s: float = 30.0,
        timeout_s: float = 5.0,
        max_bytes: int = 256 * 1024,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._transport = transport
        self._ttl, self._max_stale, self._retry = cache_ttl_s, max_stale_s, retry_after_s
        self._timeout, self._max_bytes, self._monotonic = timeout_s, max_bytes, monotonic
        self._doc: dict[str, Any] | None = None
        self._fetched_at = -math.inf
        self._next_try = -math.inf
        self._lock = asyncio.Lock()

    async def fetch_jwks(self, *, refresh: bool = False) -> dict[str, Any]:
        """The cached set, refetched when older than ``cache_ttl_s`` or when ``refresh``.

        Raises:
            Unreachable: the URL does not answer a JWK Set and no usable cached set exists.
        """
        if not refresh and self._doc is not None and self._fresh(self._monotonic()):
            return self._doc  # the hot path: no lock
        async with self._lock:
            now = self._monotonic()
            if not refresh and self._doc is not None and self._fresh(now):
                return self._doc  # fetched while this call waited for the lock
            stale = self._doc if now - self._fetched_at <= self._max_stale else None
            if now < self._next_try:  # a fetch failed moments ago; do not hammer the issuer
                if stale is not None:
                    return stale
                raise Unreachable(f"JWKS at {self.url} failed recently; retrying shortly")
            try:
                doc = await self._get()
            except Unreachable:
                self._next_try = now + self._retry
                if stale is None:
                    raise
                log.warning("serving cached JWKS; refetch failed", extra={"url": self.url})
                return stale
            self._doc, self._fetched_at = doc, now
            return doc

    def _fresh(self, now: float) -> bool:
        return now - self._fetched_at < self._ttl

    async def _get(self) -> dict[str, Any]:
        try:
            async with (
                httpx.AsyncClient(transport=self._transport, timeout=self._timeout) as client,
                client.stream("GET", self.url, headers={"Accept": "application/json"}) as resp,
            ):
                if resp.status_code != 200:
                    raise Unreachable(f"JWKS at {self.url} answered HTTP {resp.status_code}")
                body = b""
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise Unreachable(f"JWKS at {self.url} is larger than {self._max_bytes} B")
        except httpx.HTTPError as exc:
            raise Unreachable(f"JWKS at {self.url} is not reachable: {type(exc).__name__}") from exc
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise Unreachable(f"JWKS at {self.url} is not a JWK Set")
        return doc


def _parse_jwks(doc: dict[str, Any]) -> dict[str, Ed25519PublicKey]:
    """The usable Ed25519 signing keys of a JWK Set, by kid; other entries are skipped."""
    keys: dict[str, Ed25519PublicKey] = {}
    entries = doc.get("keys") if isinstance(doc, dict) else None
    for jwk in entries if isinstance(entries, list) else []:
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        if jwk.get("alg", _ALG) != _ALG or jwk.get("use", "sig") != "sig":
            continue
        kid, x = jwk.get("kid"), jwk.get("x")
        if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None or not isinstance(x, str):
            continue
        try:
            keys[kid] = Ed25519PublicKey.from_public_bytes(_b64d(x.encode("ascii")))
        except (ValueError, UnicodeEncodeError):
            continue
    return keys


# -- verification --------------------------------------------------------------------------


def _reject(reason: str, message: str) -> Unauthorized:
    return Unauthorized(f"token rejected: {message}", reason=reason)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member")
    return out


def _json_object(data: bytes) -> dict[str, Any]:
    def no_constants(name: str) -> Any:
        raise ValueError(name)

    doc = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=no_constants)
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    return doc


@dataclass(frozen=True, slots=True)
class _Parsed:
    kid: str
    signing_input: bytes
    signature: bytes
    payload: bytes


def _parse(token: object, max_bytes: int) -> _Parsed:
    if not isinstance(token, str):
        raise _reject("malformed", "not a string")
    if len(token) > max_bytes:
        raise _reject("too_large", f"longer than {max_bytes} bytes")
    try:
        raw = token.encode("ascii")
        head, body, sig = raw.split(b".")
        header = _json_object(_b64d(head))
        payload, signature = _b64d(body), _b64d(sig)
    except (ValueError, UnicodeError, binascii.Error, RecursionError):
        raise _reject("malformed", "not a compact JWS") from None
    if header.get("alg") != _ALG:
        raise _reject("bad_alg", "algorithm must be EdDSA")
    if "crit" in header:
        raise _reject("bad_header", "critical header extensions are not supported")
    typ = header.get("typ", "JWT")
    if not isinstance(typ, str) or typ.upper() != "JWT":
        raise _reject("bad_header", "typ must be JWT")
    kid = header.get("kid")
    if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
        raise _reject("bad_kid", "missing or invalid kid")
    if len(signature) != 64:
        raise _reject("bad_signature", "signature does not verify")
    return _Parsed(kid, head + b"." + body, signature, payload)


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None and name not in claims:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(name)
        number = float(value)  # OverflowError for a huge integer
        if not math.isfinite(number):
            raise ValueError(name)
    except (ValueError, OverflowError):
        raise _reject("bad_claim", f"{name} must be a number") from None
    return number


def _check_claims(
    claims: dict[str, Any],
    *,
    audience: str,
    issuer: str | None,
    required: frozenset[str],
    leeway: float,
    now: float,
) -> None:
    for name in sorted(required):
        if name not in claims:
            raise _reject("missing_claim", f"missing claim {name}")
    exp, nbf, iat = _number(claims, "exp"), _number(claims, "nbf"), _number(claims, "iat")
    if exp is not None and now >= exp + leeway:
        raise _reject("expired", "expired")
    if nbf is not None and now + leeway < nbf:
        raise _reject("not_yet_valid", "not valid yet (nbf)")
    if iat is not None and now + leeway < iat:
        raise _reject("not_yet_valid", "issued in the future (iat)")
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud
    if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds):
        raise _reject("bad_claim", "aud must be a string or a list of strings")
    if audience not in auds:
        raise _reject("wrong_audience", "not meant for this audience")
    if issuer is not None and claims.get("iss") != issuer:
        raise _reject("wrong_issuer", "not from the expected issuer")
    for name in ("sub", "jti", "iss"):
        value = claims.get(name)
        if name in claims and (not isinstance(value, str) or not value):
            raise _reject("bad_claim", f"{name} must be a non-empty string")


class TokenVerifier:
    """Verifies EdDSA JWTs against the public keys of ``keys_source``.

    ``exp`` and ``aud`` are always required, on top of ``required``. ``clock`` gives epoch
    seconds for the time claims; ``monotonic`` paces the refreshes on an unknown kid.
    """

    def __init__(
        self,
        keys_source: JwksSource,
        *,
        audience: str,
        issuer: str | None = None,
        leeway_s: float = 30.0,
        max_token_bytes: int = 8192,
        required: Sequence[str] = ("exp", "iat", "aud", "sub"),
        min_refresh_interval_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = keys_source
        self.audience, self.issuer, self.leeway_s = audience, issuer, leeway_s
        self.max_token_bytes = max_token_bytes
        self.required = frozenset(required) | {"exp", "aud"}
        self._min_refresh, self._clock, self._monotonic = min_refresh_interval_s, clock, monotonic
        self._doc: dict[str, Any] | None = None
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._last_refresh = -math.inf
        self._lock = asyncio.Lock()

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, once its signature, header and claims are all acceptable.

        Raises:
            Unauthorized: the token is rejected; ``details["reason"]`` says why in one word.
        """
        return (await self.verify_with_kid(token))[0]

    async def verify_with_kid(self, token: str) -> tuple[dict[str, Any], str]:
        """:meth:`verify`, also answering the ``kid`` that signed (for :meth:`trusts`).

        Raises:
            Unauthorized: the token is rejected; ``details["reason"]`` says why in one word.
        """
        parsed = _parse(token, self.max_token_bytes)
        key = (await self._fetch(refresh=False)).get(parsed.kid)
        if key is None:
            key = (await self._refresh()).get(parsed.kid)
        if key is None:
            raise _reject("unknown_kid", "unknown signing key")
        return self._finish(parsed, key), parsed.kid

    async def trusts(self, kid: str) -> bool:
        """Whether ``kid`` is still in the key set (as cached: no refetch is forced), so a
        caller that remembers verified tokens drops them when their key leaves the set.

        Raises:
            Unauthorized: the key set is unavailable (``keys_unavailable``).
        """
        return kid in await self._fetch(refresh=False)

    def _finish(self, parsed: _Parsed, key: Ed25519PublicKey) -> dict[str, Any]:
        return _finish(
            parsed,
            key,
            audience=self.audience,
            issuer=self.issuer,
            required=self.required,
            leeway=self.leeway_s,
            now=self._clock(),
        )

    async def _fetch(self, *, refresh: bool) -> dict[str, Ed25519PublicKey]:
        try:
            doc = await self._source.fetch_jwks(refresh=refresh)
        except ProvisioningError as exc:
            log.warning("signing keys unavailable", extra={"error": type(exc).__name__})
            raise _reject("keys_unavailable", "signing keys are unavailable") from exc
        if doc is not self._doc:
            self._doc, self._keys = doc, _parse_jwks(doc)
        return self._keys

    async def _refresh(self) -> dict[str, Ed25519PublicKey]:
        async with self._lock:
            if self._monotonic() - self._last_refresh < self._min_refresh:
                return self._keys  # refreshed recently (maybe by a concurrent verify)
            self._last_refresh = self._monotonic()
            return await self._fetch(refresh=True)


def _finish(parsed: _Parsed, key: Ed25519PublicKey, **policy: Any) -> dict[str, Any]:
    try:
        key.verify(parsed.signature, parsed.signing_input)
        claims = _json_object(parsed.payload)
    except InvalidSignature:
        raise _reject("bad_signature", "signature does not verify") from None
    except (ValueError, UnicodeError, RecursionError):  # deep nesting hits the recursion limit
        raise _reject("malformed", "payload is not a JSON object") from None
    _check_claims(claims, **policy)
    return claims


def verify_with_ring(
    ring: KeyRing,
    token: str,
    audience: str,
    *,
    issuer: str | None = None,
    leeway_s: float = 30.0,
    max_token_bytes: int = 8192,
    required: Sequence[str] = ("exp", "iat", "aud", "sub"),
) -> dict[str, Any]:
    """Synchronously verify ``token`` against the keys of ``ring`` (same rules as the verifier).

    Raises:
        Unauthorized: the token is rejected; ``details["reason"]`` says why in one word.
    """
    parsed = _parse(token, max_token_bytes)
    try:
        known = next((k for k in ring.keys() if k.kid == parsed.kid), None)
    except ConfigError as exc:
        raise _reject("keys_unavailable", "signing keys are unavailable") from exc
    if known is None:
        raise _reject("unknown_kid", "unknown signing key")
    return _finish(
        parsed,
        known.private_key.public_key(),
        audience=audience,
        issuer=issuer,
        required=frozenset(required) | {"exp", "aud"},
        leeway=leeway_s,
        now=ring._clock(),
    )
