"""What the audit repository is made of, shared by the mirror that writes it and the verifier
that checks it (:mod:`provisioning.audit_mirror.mirror` describes the layout): an event's
canonical JSON and path, a commit's audit trailers, the in-process SSH signer, the checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provisioning.core.errors import ConfigError, ValidationError

__all__ = [
    "CHECKPOINT_NAMESPACE",
    "EVENT_ID_TRAILER",
    "GIT_NAMESPACE",
    "PRINCIPAL",
    "REF",
    "SEQ_TRAILER",
    "Checkpoint",
    "CommitInfo",
    "SshSigner",
    "canonical_json",
    "checkpoint_payload",
    "event_path",
    "event_time",
    "parse_commit",
    "read_checkpoint",
]

PRINCIPAL = "audit-mirror@prvng"
CHECKPOINT_NAMESPACE = "prvng-audit-checkpoint"
GIT_NAMESPACE = "git"
REF = "refs/heads/main"
EVENT_ID_TRAILER = "Audit-Event-Id"
SEQ_TRAILER = "Audit-Seq"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


# ---------------------------------------------------------------------- the event format


def canonical_json(value: Any) -> bytes:
    """The canonical JSON bytes of ``value``: sorted keys, no spaces, UTF-8, no NaN.

    Raises:
        ValidationError: ``value`` is not representable as strict JSON.
    """
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"audit event is not representable as JSON: {exc}") from exc


def event_time(ts: Any, event_id: str) -> datetime:
    try:
        if isinstance(ts, str):
            parsed = datetime.fromisoformat(ts)
            return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
        if isinstance(ts, int | float) and not isinstance(ts, bool):
            return datetime.fromtimestamp(ts, UTC)
    except (ValueError, OverflowError, OSError):
        pass
    raise ValidationError(
        f"audit event {event_id!r} needs `ts` as an RFC 3339 time or epoch seconds, got {ts!r}",
        field="ts",
    )


def event_path(event: Mapping[str, Any]) -> str:
    """``events/YYYY/MM/DD/<id>.json``: where ``event`` is stored (UTC day of its ``ts``).

    Raises:
        ValidationError: the ``id`` is missing or not a safe file name, or ``ts`` is not a time.
    """
    event_id = event.get("id")
    if not isinstance(event_id, str) or not _ID_RE.fullmatch(event_id):
        raise ValidationError(
            f"audit event id must be 1-128 characters of [A-Za-z0-9._:-] starting with a letter "
            f"or digit, got {event_id!r}",
            field="id",
        )
    day = event_time(event.get("ts"), event_id)
    return f"events/{day:%Y/%m/%d}/{event_id}.json"


@dataclass(frozen=True)
class CommitInfo:
    """The parts of a commit object the mirror and the verifier look at."""

    tree: str
    parents: tuple[str, ...]
    message: str
    event_ids: tuple[str, ...]
    seqs: tuple[str, ...]

    @property
    def event_id(self) -> str | None:
        """The one ``Audit-Event-Id`` trailer, or None when there is not exactly one."""
        return self.event_ids[0] if len(self.event_ids) == 1 else None

    @property
    def seq(self) -> int | None:
        """The one ``Audit-Seq`` trailer as a number, or None when missing or malformed."""
        if len(self.seqs) != 1 or not self.seqs[0].isdigit():
            return None
        return int(self.seqs[0])


def parse_commit(data: bytes) -> CommitInfo:
    """Parse a raw commit object (headers, blank line, message) and its audit trailers."""
    head, _, body = data.partition(b"\n\n")
    tree, parents = "", []
    for line in head.split(b"\n"):
        if line.startswith(b"tree "):
            tree = line[5:].decode("ascii", "replace")
        elif line.startswith(b"parent "):
            parents.append(line[7:].decode("ascii", "replace"))
    message = body.decode("utf-8", "replace")
    trailers = message.rstrip("\n").rsplit("\n\n", 1)[-1].split("\n")
    ids: list[str] = []
    seqs: list[str] = []
    for trailer in trailers:
        key, sep, value = trailer.partition(": ")
        if sep and key == EVENT_ID_TRAILER:
            ids.append(value.strip())
        elif sep and key == SEQ_TRAILER:
            seqs.append(value.strip())
    return CommitInfo(tree, tuple(parents), message, tuple(ids), tuple(seqs))


# ---------------------------------------------------------------------- signing


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class SshSigner:
    """Signs like ``ssh-keygen -Y sign -f <key> -n <namespace>``, in-process (Ed25519 only).

    Raises:
        ConfigError: the key cannot be read, is passphrase-protected or is not Ed25519.
    """

    def __init__(self, key_path: Path) -> None:
        try:
            key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(
                f"cannot load the audit-mirror signing key {key_path}: {exc} (it must be an "
                "OpenSSH Ed25519 private key without a passphrase)"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"the audit-mirror signing key {key_path} is not an Ed25519 key")
        self._key = key
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        self.public_key = public.decode("ascii")
        """``ssh-ed25519 AAAA…``, as in an ``allowed_signers`` line."""
        self._public_blob = base64.b64decode(public.split()[1])

    def sign(self, message: bytes, namespace: str) -> str:
        """The armored ``SSHSIG`` signature of ``message`` (hash sha512), as ssh-keygen writes."""
        ns = namespace.encode("ascii")
        digest = hashlib.sha512(message).digest()
        signed = (
            b"SSHSIG" + _ssh_string(ns) + _ssh_string(b"") + _ssh_string(b"sha512")
        ) + _ssh_string(digest)
        signature = _ssh_string(b"ssh-ed25519") + _ssh_string(self._key.sign(signed))
        blob = (
            b"SSHSIG"
            + struct.pack(">I", 1)
            + _ssh_string(self._public_blob)
            + _ssh_string(ns)
            + _ssh_string(b"")
            + _ssh_string(b"sha512")
            + _ssh_string(signature)
        )
        text = base64.b64encode(blob).decode("ascii")
        lines = [text[i : i + 70] for i in range(0, len(text), 70)]
        return (
            "-----BEGIN SSH SIGNATURE-----\n" + "\n".join(lines) + "\n-----END SSH SIGNATURE-----\n"
        )


# ---------------------------------------------------------------------- the checkpoint


@dataclass(frozen=True)
class Checkpoint:
    """The signed head kept outside the repository; ``signature`` covers every other field."""

    head: str | None
    count: int
    ref: str
    principal: str
    updated_at: str
    signature: str

    def payload(self) -> bytes:
        """The signed bytes: canonical JSON of every field but ``signature``."""
        return checkpoint_payload(self.head, self.count, self.ref, self.principal, self.updated_at)


def checkpoint_payload(head: str | None, count: int, ref: str, principal: str, at: str) -> bytes:
    """The bytes a checkpoint's signature covers."""
    return canonical_json(
        {
            "version": 1,
            "head": head,
            "count": count,
            "ref": ref,
            "principal": principal,
            "updated_at": at,
        }
    )


def read_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint file.

    Raises:
        ValidationError: the file is not a version-1 checkpoint (message names the file).
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ValueError("not a version 1 checkpoint")
        head, count = doc["head"], doc["count"]
        if not (head is None or isinstance(head, str)) or not isinstance(count, int):
            raise ValueError("`head` must be a commit id or null and `count` a number")
        return Checkpoint(
            head=head,
            count=count,
            ref=str(doc["ref"]),
            principal=str(doc["principal"]),
            updated_at=str(doc["updated_at"]),
            signature=str(doc["signature"]),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValidationError(f"audit checkpoint {path} is unreadable: {exc}") from exc
