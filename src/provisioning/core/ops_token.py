"""Verification of one signed operation (a message on ``ops.pending.<op_type>``, or the body
the controller dispatches to the orchestrator), before anything acts on it. In ``core``: the
controller and the orchestrator both verify.

A message is the JSON object ``{"token": <compact JWT>, "params": {...}}`` the keeper
publishes. It is accepted only when all of these hold, else :class:`OpRejected` says which
(the controller answers **Term**: a bad message never gets better by waiting):

* the message is at most ``max_bytes``, one JSON object with exactly ``token`` and ``params``;
* the token's header has only ``alg`` (pinned to EdDSA), ``typ`` and ``kid`` (no ``jku``,
  ``x5u``, ``jwk``, ``crit``…), and ``kid`` is in the keeper's key set;
* the signature verifies; ``exp``/``nbf`` hold with a small leeway; ``aud`` is the ops
  audience; ``iss`` is the keeper;
* ``jti``, ``sub`` (the requester), ``op_type``, ``target`` and ``params_sha256`` are present and
  well formed; ``op_type`` is the one the subject names;
* ``params_sha256`` is the SHA-256 of the params' canonical JSON (sorted keys, no spaces,
  UTF-8): a payload swapped or edited beside a valid token is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from provisioning.core.errors import Unauthorized
from provisioning.core.settings import Settings
from provisioning.core.signing import HttpJwks, JwksSource, KeyRing, StaticJwks, TokenVerifier

__all__ = [
    "OPS_AUDIENCE",
    "OPS_ISSUER",
    "OpRejected",
    "VerifiedOp",
    "canonical_params",
    "ops_verifier",
    "verify_op",
]

#: ``aud`` and ``iss`` of operation tokens (the keeper signs, the controller and the
#: orchestrator verify).
OPS_AUDIENCE = "prvng-ops"
OPS_ISSUER = "prvng-ops-keeper"

_OP_TYPE = re.compile(r"^[a-z][a-z0-9_-]{0,62}(\.[a-z][a-z0-9_-]{0,62}){0,3}$")
_JTI = re.compile(r"^[A-Za-z0-9_.:-]{8,128}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HEADER_FIELDS = frozenset({"alg", "typ", "kid"})
SUBJECT_PREFIX = "ops.pending."


class OpRejected(Exception):
    """The message is not a valid operation; ``reason`` is one word, ``message`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class VerifiedOp:
    jti: str
    op_type: str
    target: str
    image: str | None
    requester: str
    params: dict[str, Any]
    claims: dict[str, Any]
    token: str


def canonical_params(params: Any) -> bytes:
    """The bytes ``params_sha256`` is computed over: sorted keys, compact, UTF-8 (the keeper
    signs over these, the controller and the orchestrator check them).

    Raises:
        ValueError: ``params`` holds NaN or Infinity, or something JSON cannot carry.
    """
    return json.dumps(
        params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _header(token: str) -> dict[str, Any]:
    try:
        head = token.split(".", 1)[0]
        raw = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
        header = json.loads(raw)
    except (ValueError, UnicodeError):
        raise OpRejected("malformed", "the token is not a compact JWS") from None
    if not isinstance(header, dict):
        raise OpRejected("malformed", "the token header is not a JSON object")
    return header


async def verify_op(
    verifier: TokenVerifier, subject: str | None, data: bytes, *, max_bytes: int = 256 * 1024
) -> VerifiedOp:
    """Check one message (see the module docstring); ``subject`` None (an HTTP dispatch) skips
    only the subject check.

    Raises:
        OpRejected: the message must be terminated; the reason says why.
    """
    if len(data) > max_bytes:
        raise OpRejected("too_large", f"message of {len(data)} bytes is over {max_bytes}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeError, RecursionError):  # deep nesting hits the recursion limit
        raise OpRejected("malformed", "the message is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"token", "params"}:
        raise OpRejected("malformed", "the message must be {token, params} and nothing else")
    token, params = doc["token"], doc["params"]
    if not isinstance(token, str) or not isinstance(params, dict):
        raise OpRejected("malformed", "token must be a string and params an object")
    extra = set(_header(token)) - _HEADER_FIELDS
    if extra:
        raise OpRejected("bad_header", f"header fields not allowed: {', '.join(sorted(extra))}")
    try:
        claims = await verifier.verify(token)
    except Unauthorized as exc:
        raise OpRejected(str(exc.details.get("reason", "rejected")), exc.message) from None
    for name in ("jti", "sub", "op_type", "target", "params_sha256"):
        if not isinstance(claims.get(name), str) or not claims[name]:
            raise OpRejected("missing_claim", f"claim {name} is missing or not a string")
    if not _JTI.match(claims["jti"]):
        raise OpRejected("bad_claim", "jti is not a valid id")
    op_type = claims["op_type"]
    if not _OP_TYPE.match(op_type):
        raise OpRejected("bad_claim", f"op_type {op_type[:80]!r} is not valid")
    if subject is not None and subject != SUBJECT_PREFIX + op_type:
        raise OpRejected("wrong_subject", f"a {op_type} token arrived on {subject[:120]}")
    if not _SHA256.match(claims["params_sha256"]):
        raise OpRejected("bad_claim", "params_sha256 is not a hex SHA-256")
    try:
        digest = hashlib.sha256(canonical_params(params)).hexdigest()
    except ValueError:
        raise OpRejected("malformed", "params hold a value JSON cannot carry (NaN?)") from None
    if digest != claims["params_sha256"]:
        raise OpRejected("params_mismatch", "the params are not the ones the token was signed for")
    image = claims.get("image")
    if image is not None and not isinstance(image, str):
        raise OpRejected("bad_claim", "image must be a string")
    return VerifiedOp(
        jti=claims["jti"],
        op_type=op_type,
        target=claims["target"],
        image=image,
        requester=claims["sub"],
        params=params,
        claims=claims,
        token=token,
    )


def ops_verifier(settings: Settings) -> TokenVerifier:
    """Verifies operation tokens against the ops-keeper's key set: its key ring in this data
    dir (the embedded platform, or services sharing the data dir), else its JWKS over HTTP
    (``ops_keeper.url``)."""
    k = settings.ops_keeper
    source: JwksSource = (
        HttpJwks(f"{k.url.rstrip('/')}/.well-known/jwks.json")
        if k.url
        else StaticJwks(KeyRing(settings.home / "keys" / "ops-keeper"))
    )
    return TokenVerifier(source, audience=k.token_audience, issuer=k.issuer)
