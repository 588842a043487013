"""The signed operation token of DESIGN §7 and the message that carries it to the controller.

An approved operation travels on ``ops.pending.<op_type>`` as one JSON message::

    {"token": "<compact EdDSA JWT of OpsClaims>", "params": {...}}

with ``Nats-Msg-Id`` = the token's ``jti`` (the operation's id), so JetStream drops a
re-publish. The parameters travel beside the token rather than inside it (they may be large,
and a token is a header-sized thing); the token binds them by ``params_sha256``, the SHA-256 of
:func:`canonical_params`. The controller verifies the token (``core.signing.TokenVerifier``
against the keeper's ``/.well-known/jwks.json``), then :meth:`OpsClaims.binds` the params.

Canonical JSON is what the audit mirror uses too: keys sorted, no whitespace, UTF-8 (not
``\\u`` escapes), no NaN or Infinity. Anyone can recompute the digest from the message.

The controller may import only ``ops_keeper.api`` and ``ops_keeper.client``; ``api`` re-exports
everything here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from provisioning.core.errors import ValidationError
from provisioning.core.ops_token import canonical_params

__all__ = [
    "PENDING_SUBJECT_PREFIX",
    "OpsClaims",
    "PendingMessage",
    "canonical_params",
    "params_sha256",
    "pending_subject",
]

PENDING_SUBJECT_PREFIX = "ops.pending."
_STR_CLAIMS = ("iss", "aud", "sub", "jti", "op_type", "target", "params_sha256")
_OPT_STR_CLAIMS = ("image", "policy", "approved_by")
_INT_CLAIMS = ("iat", "nbf", "exp")


def params_sha256(params: Mapping[str, Any]) -> str:
    """The hex SHA-256 of :func:`canonical_params` (the ``params_sha256`` claim)."""
    return hashlib.sha256(canonical_params(params)).hexdigest()


def pending_subject(op_type: str) -> str:
    """The subject an approved operation of ``op_type`` is published on."""
    return PENDING_SUBJECT_PREFIX + op_type


@dataclass(frozen=True, slots=True)
class OpsClaims:
    """The claims of an operation token.

    ``sub`` is the requester's user id, ``jti`` the operation's id, ``exp`` the end of the
    policy's ``token_ttl_s``, ``policy`` the keeper policy that decided and ``approved_by`` the
    approver's user id (None when the policy approved on its own).
    """

    iss: str
    aud: str
    sub: str
    jti: str
    iat: int
    nbf: int
    exp: int
    op_type: str
    target: str
    image: str | None
    params_sha256: str
    policy: str | None
    approved_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def binds(self, params: Mapping[str, Any]) -> bool:
        """Whether ``params`` are the parameters this token was signed for."""
        try:
            digest = params_sha256(params)
        except (ValueError, TypeError):
            return False
        return hmac.compare_digest(digest, self.params_sha256)

    @classmethod
    def from_dict(cls, claims: Mapping[str, Any]) -> OpsClaims:
        """The claims of a verified token, their types checked.

        Raises:
            ValidationError: a claim is missing or has the wrong type (named).
        """
        out: dict[str, Any] = {}
        for name in _STR_CLAIMS:
            value = claims.get(name)
            if not isinstance(value, str) or not value:
                raise ValidationError(f"operation token: claim {name} must be a non-empty string")
            out[name] = value
        for name in _OPT_STR_CLAIMS:
            value = claims.get(name)
            if value is not None and not isinstance(value, str):
                raise ValidationError(f"operation token: claim {name} must be a string or null")
            out[name] = value
        for name in _INT_CLAIMS:
            value = claims.get(name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValidationError(f"operation token: claim {name} must be a whole number")
            out[name] = value
        return cls(**out)


@dataclass(frozen=True, slots=True)
class PendingMessage:
    """What is published on ``ops.pending.<op_type>``: the token and the params it binds."""

    token: str
    params: dict[str, Any]

    def to_bytes(self) -> bytes:
        params = json.loads(canonical_params(self.params))  # refuses what canonical JSON cannot
        return json.dumps(
            {"token": self.token, "params": params},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> PendingMessage:
        """Parse a published message (nothing is verified here).

        Raises:
            ValidationError: not a JSON object with a string ``token`` and an object ``params``.
        """
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ValidationError("operation message is not JSON") from None
        if not isinstance(doc, dict):
            raise ValidationError("operation message must be a JSON object")
        token, params = doc.get("token"), doc.get("params")
        if not isinstance(token, str) or not token:
            raise ValidationError("operation message: token must be a non-empty string")
        if not isinstance(params, dict):
            raise ValidationError("operation message: params must be an object")
        return cls(token, params)
