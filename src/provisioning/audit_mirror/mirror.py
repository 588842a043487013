"""Mirror audit events into a git repository: a canonical-JSON file and a signed commit each.

Layout. The repository (bare, initialised on first :meth:`GitMirror.open`) holds, on
``refs/heads/main``, a linear history where commit *n* adds exactly one file,
``events/YYYY/MM/DD/<event id>.json`` (the UTC day of the event's ``ts``), whose bytes are the
event's canonical JSON (``sort_keys``, compact separators, UTF-8, no trailing newline), and whose
message ends in the trailers ``Audit-Event-Id: <id>`` and ``Audit-Seq: <n>``. The state dir
holds the Ed25519 key (mode 0600), ``allowed_signers``, ``index.sqlite3`` (mirrored ids) and
``checkpoint.json`` (the signed head, kept outside the repository).

How commits are written. Nothing is spawned per event (a subprocess costs ~1.5 ms here, and
``git commit-tree -S`` runs ``ssh-keygen`` on top): the mirror keeps the current tree in memory
(only the directories on the path of the last event are loaded, so memory stays bounded), builds
the blob, the five trees and the commit itself, and signs the commit in-process with
``cryptography``'s Ed25519 in the exact ``SSHSIG`` format of ``ssh-keygen -Y sign -n git``
(Ed25519 is deterministic, so the signature is byte-for-byte what ``ssh-keygen`` writes). The
verifier never trusts this code: it checks through ``git`` and ``ssh-keygen``
(:mod:`provisioning.audit_mirror.verify`).

Each batch becomes one pack (+ ``.idx``), in which a new version of a day's tree is a delta
against the previous one; a ``git cat-file --batch`` process reads the trees and commits already
in the repository (:mod:`provisioning.audit_mirror.gitobjects`).

Crash safety, per batch passed to :meth:`GitMirror.mirror`:

1. the pack and its index are written under temporary names, fsynced, renamed (pack first) and
   their directory fsynced; a crash leaves only unreferenced objects, which ``git fsck`` accepts;
2. ``refs/heads/main`` is compare-and-swapped through ``main.lock`` (fsync, rename, fsync of
   ``refs/heads``): the ref only ever names a fully written, signed commit;
3. only then are the new ids inserted into the index (SQLite, ``synchronous=FULL``), so the index
   never claims an id whose commit is not on the ref;
4. then the checkpoint is re-signed and atomically replaced; then :meth:`GitMirror.mirror`
   returns and the caller may ack.

On :meth:`GitMirror.open` the index is reconciled: walk back from the head only until the last
indexed commit (at most the batch that was in flight) and index the trailers found. So an event
redelivered after a crash at any point finds its id in the index and makes no second commit.
A checkpoint that lags behind (crash before step 4) is renewed after checking that its head is
the indexed commit at its position; one that does not match stops the mirror (the history was
rewritten: run ``prvng audit verify``).

Cost, measured on a 2-core VM: per batch a fixed ~4-8 ms (the pack and its index, the ref, the
checkpoint and the index commit, each fsynced), per event well under 1 ms plus hashing the
day's tree (git's object model: ~0.6 ms for a day of 10,000 events). A batch of one event also
writes that day's tree whole, so hand the mirror the batches the stream delivers.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provisioning.audit_mirror.durable import fsync_dir, write_durably
from provisioning.audit_mirror.gitobjects import (
    TMP_PREFIX,
    Dir,
    GitObjectReader,
    PackWriter,
    git_env,
)
from provisioning.audit_mirror.records import (
    CHECKPOINT_NAMESPACE,
    EVENT_ID_TRAILER,
    GIT_NAMESPACE,
    PRINCIPAL,
    REF,
    SEQ_TRAILER,
    Checkpoint,
    CommitInfo,
    SshSigner,
    canonical_json,
    checkpoint_payload,
    event_path,
    event_time,
    parse_commit,
    read_checkpoint,
)
from provisioning.core.errors import ConfigError, OperationFailed, ValidationError

# Also re-exported: the names of records and gitobjects that callers import from here.
__all__ = [
    "ALREADY_MIRRORED",
    "CHECKPOINT_NAMESPACE",
    "EVENT_ID_TRAILER",
    "GIT_NAMESPACE",
    "PRINCIPAL",
    "REF",
    "SEQ_TRAILER",
    "Checkpoint",
    "CommitInfo",
    "GitMirror",
    "GitObjectReader",
    "PublishResult",
    "SshSigner",
    "canonical_json",
    "check_event",
    "checkpoint_payload",
    "event_path",
    "git_env",
    "parse_commit",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

ALREADY_MIRRORED = "already-mirrored"
"""What :meth:`GitMirror.mirror` returns in place of a commit id for an event already mirrored."""
_IDENT = f"audit-mirror <{PRINCIPAL}>"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_GIT_TIMEOUT_S = 60.0
_PUSH_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------- the index


class _Index:
    """Mirrored ids in SQLite: ``event_id → (seq, commit)``; written only after the ref moved."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS mirrored (event_id TEXT PRIMARY KEY, "
                "seq INTEGER NOT NULL UNIQUE, commit_id TEXT NOT NULL)"
            )
        except sqlite3.Error as exc:
            self._db.close()
            raise OperationFailed(f"audit-mirror index {path} is unusable: {exc}") from exc

    def lookup(self, event_id: str) -> str | None:
        row = self._db.execute(
            "SELECT commit_id FROM mirrored WHERE event_id = ?", (event_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def commit_at(self, seq: int) -> str | None:
        row = self._db.execute("SELECT commit_id FROM mirrored WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else str(row[0])

    def last(self) -> tuple[int, str] | None:
        row = self._db.execute(
            "SELECT seq, commit_id FROM mirrored ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def add(self, rows: Iterable[tuple[str, int, str]]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT INTO mirrored (event_id, seq, commit_id) VALUES (?, ?, ?)", rows
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


# ---------------------------------------------------------------------- the mirror


@dataclass(frozen=True)
class PublishResult:
    """The outcome of pushing to one remote."""

    remote: str
    ok: bool
    skipped: bool = False
    message: str = ""


@dataclass(frozen=True)
class _Prepared:
    event_id: str
    dirs: tuple[bytes, ...]
    file_name: bytes
    blob: bytes
    author_time: int
    subject: str


def check_event(event: Any) -> None:
    """Raise what :meth:`GitMirror.mirror` would raise for ``event`` alone, writing nothing
    (a consumer sets a bad event aside instead of failing its whole batch).

    Raises:
        ValidationError: not a JSON object, no usable ``id``/``ts``, or not strict JSON.
    """
    _prepare(0, event)


def _prepare(index: int, event: Any) -> _Prepared:
    if not isinstance(event, Mapping):
        raise ValidationError(f"audit event #{index} is not a JSON object", field="events")
    *dirs, file_name = event_path(event).split("/")
    event_id = str(event["id"])
    parts = [event.get(k) for k in ("action", "object_type", "object_id")]
    what = " ".join(str(p) for p in parts if p not in (None, ""))
    subject = _CONTROL.sub(" ", f"audit {event_id} {what}").strip()[:200]
    return _Prepared(
        event_id=event_id,
        dirs=tuple(d.encode("ascii") for d in dirs),
        file_name=file_name.encode("ascii"),
        blob=canonical_json(dict(event)),
        author_time=max(0, int(event_time(event.get("ts"), event_id).timestamp())),
        subject=subject.encode("utf-8", "replace").decode("utf-8"),
    )


class GitMirror:
    """Mirrors audit events into ``repo``, one signed commit each; see the module docstring.

    ``state_dir`` holds the key (unless ``key_path`` names one; created if missing), the
    ``allowed_signers`` file, the index and the checkpoint. ``remotes`` are git remote names or
    URLs :meth:`publish` pushes to. Not thread-safe; one process per state dir (a lock enforces
    it). Use as a context manager or call :meth:`open` and :meth:`close`.
    """

    def __init__(
        self,
        repo: Path,
        state_dir: Path,
        *,
        key_path: Path | None = None,
        remotes: Sequence[str] = (),
    ) -> None:
        self.repo = Path(repo)
        self.state_dir = Path(state_dir)
        self.key_path = Path(key_path) if key_path else self.state_dir / "audit-mirror_ed25519"
        self.allowed_signers_path = self.state_dir / "allowed_signers"
        self.checkpoint_path = self.state_dir / "checkpoint.json"
        self.remotes = tuple(remotes)
        self.max_packs = 64
        """More packs than this (one is written per batch) and :meth:`mirror` merges them."""
        self._lock_fd: int | None = None
        self._reader: GitObjectReader | None = None
        self._index: _Index | None = None
        self._git_dir = self.repo
        self._head: str | None = None
        self._seq = 0
        self._root = Dir()
        self._generation = 0
        self._packs = 0

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> Self:
        """Initialise what is missing (repository, key, allowed signers), take the state-dir
        lock, reconcile the index with the repository and renew a lagging checkpoint.

        Raises:
            ConfigError: the key or the repository path is unusable.
            OperationFailed: another mirror holds the lock, or the repository no longer matches
                the index or the checkpoint (history changed outside the mirror).
        """
        if self._lock_fd is not None:
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise OperationFailed(
                    f"another audit-mirror is using the state dir {self.state_dir}"
                ) from exc
            self._signer = SshSigner(self._ensure_key())
            self._ensure_allowed_signers()
            self._git_dir = self._ensure_repo()
            self._remove_leftovers()
            stale_lock = self._git_dir / (REF + ".lock")
            if stale_lock.exists():
                logger.warning("removing %s left by an interrupted ref update", stale_lock)
                stale_lock.unlink()
            self._reader = GitObjectReader(self._git_dir)
            self._index = _Index(self.state_dir / "index.sqlite3")
            self._load_head()
            self._reconcile()
            self._reconcile_checkpoint()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Release the lock and stop helper processes; the mirror can be opened again."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._index is not None:
            self._index.close()
            self._index = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    @property
    def head(self) -> str | None:
        """The commit ``refs/heads/main`` points to (None before the first event)."""
        return self._head

    @property
    def count(self) -> int:
        """How many events are mirrored (the head's ``Audit-Seq``)."""
        return self._seq

    @property
    def git_dir(self) -> Path:
        """The repository's git directory (the repository itself when it is bare)."""
        return self._git_dir

    # ------------------------------------------------------------------ setup

    def _ensure_key(self) -> Path:
        key = self.key_path
        if not key.exists():
            # Made under a temporary name and renamed: a crash never leaves half a key.
            key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Generated in-process (an OpenSSH key file, as `ssh-keygen -t ed25519` writes).
            new_key = Ed25519PrivateKey.generate()
            private = new_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
            public = new_key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            pub = key.with_name(key.name + ".pub")
            write_durably(pub, public + b" " + PRINCIPAL.encode() + b"\n")
            write_durably(key, private, mode=0o600)  # last: the key's presence marks done
            fsync_dir(key.parent)
            logger.info("created audit-mirror signing key %s", key)
        mode = key.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(
                f"the audit-mirror signing key {key} has mode {mode:o}; run `chmod 600 {key}`"
            )
        return key

    def _ensure_allowed_signers(self) -> None:
        line = f'{PRINCIPAL} namespaces="{GIT_NAMESPACE},{CHECKPOINT_NAMESPACE}" '
        line += self._signer.public_key.split()[0] + " " + self._signer.public_key.split()[1]
        path = self.allowed_signers_path
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if line not in current.splitlines():
            # Old keys stay listed: commits they signed must keep verifying.
            prefix = current if not current or current.endswith("\n") else current + "\n"
            write_durably(path, (prefix + line + "\n").encode("utf-8"))

    def _ensure_repo(self) -> Path:
        repo = self.repo
        if not repo.exists() or (repo.is_dir() and not any(repo.iterdir())):
            # Initialised aside and renamed into place (over an empty directory, if one is
            # there): a crash never leaves half a repository.
            repo.parent.mkdir(parents=True, exist_ok=True)
            tmp = repo.with_name(f".{repo.name}.{secrets.token_hex(4)}.tmp")
            _run(["git", "init", "-q", "--bare", "-b", "main", str(tmp)])
            for key, value in (
                ("gpg.format", "ssh"),
                ("gpg.ssh.allowedSignersFile", str(self.allowed_signers_path.resolve())),
                ("gc.auto", "0"),
            ):
                _run(["git", f"--git-dir={tmp}", "config", key, value])
            os.rename(tmp, repo)
            fsync_dir(repo.parent)
            logger.info("initialised audit repository %s", repo)
        proc = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--absolute-git-dir"],
            capture_output=True,
            text=True,
            env=git_env(),
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
        if proc.returncode != 0:
            raise ConfigError(f"{repo} is neither empty nor a git repository")
        return Path(proc.stdout.strip())

    # ------------------------------------------------------------------ head and index

    def _read_ref(self) -> str | None:
        loose = self._git_dir / REF
        try:
            return loose.read_text(encoding="ascii").strip() or None
        except FileNotFoundError:
            pass
        packed = self._git_dir / "packed-refs"
        if packed.exists():
            for line in packed.read_text(encoding="ascii").splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == REF:
                    return parts[0]
        return None

    def _commit(self, object_id: str) -> CommitInfo:
        assert self._reader is not None
        kind, data = self._reader.read(object_id)
        if kind != "commit":
            raise OperationFailed(f"{object_id} in {self.repo} is a {kind}, not a commit")
        return parse_commit(data)

    def _load_head(self) -> None:
        """Load the head commit, its seq and its root tree from disk."""
        assert self._reader is not None
        self._head = self._read_ref()
        self._root, self._seq = Dir(), 0
        if self._head is None:
            return
        info = self._commit(self._head)
        if info.seq is None:
            raise OperationFailed(
                f"head commit {self._head} of {self.repo} has no {SEQ_TRAILER} trailer: the "
                "repository was changed outside the audit-mirror; run `prvng audit verify`"
            )
        self._seq = info.seq
        self._root = Dir.parse(self._reader.read(info.tree)[1])

    def _reconcile(self) -> None:
        """Index the commits after the last indexed one (those of a batch cut by a crash)."""
        assert self._index is not None
        last = self._index.last()
        tail: list[tuple[str, int, str]] = []
        commit, expected = self._head, self._seq
        while commit is not None and (last is None or commit != last[1]):
            info = self._commit(commit)
            if info.event_id is None or info.seq != expected or (last and expected <= last[0]):
                raise OperationFailed(
                    f"commit {commit} of {self.repo} does not continue the audit-mirror's index "
                    f"(last indexed: {last[1] if last else 'none'}): the repository was changed "
                    "outside the mirror; run `prvng audit verify`"
                )
            tail.append((info.event_id, expected, commit))
            commit = info.parents[0] if info.parents else None
            expected -= 1
        if commit is None and (last is not None or expected != 0):
            raise OperationFailed(
                f"the audit-mirror index of {self.state_dir} names commits that are not on "
                f"{REF} of {self.repo}: the history was rewritten; run `prvng audit verify`"
            )
        if tail:
            tail.reverse()
            self._index.add(tail)
            logger.info("indexed %d commit(s) of an interrupted batch", len(tail))

    def _reconcile_checkpoint(self) -> None:
        assert self._index is not None
        if self.checkpoint_path.exists():
            cp = read_checkpoint(self.checkpoint_path)
            if cp.head == self._head:
                return
            if cp.head is not None and self._index.commit_at(cp.count) != cp.head:
                raise OperationFailed(
                    f"the audit checkpoint {self.checkpoint_path} names commit {cp.head} as "
                    f"event {cp.count}, which is not in the history of {self.repo}: the "
                    "history was rewritten; run `prvng audit verify`"
                )
        self.checkpoint()

    def commit_for(self, event_id: str) -> str | None:
        """The commit that mirrored ``event_id``, or None."""
        self._require_open()
        assert self._index is not None
        return self._index.lookup(event_id)

    def _require_open(self) -> None:
        if self._index is None or self._reader is None:
            raise OperationFailed(f"the audit-mirror of {self.repo} is not open; call open()")

    # ------------------------------------------------------------------ mirroring

    def mirror(self, events: Sequence[Mapping[str, Any]]) -> list[str]:
        """Commit each new event in order, skip those already mirrored; durable on return.

        Returns one entry per event: the new commit id, or :data:`ALREADY_MIRRORED`. Every
        event is validated before anything is written.

        Raises:
            ValidationError: an event has no usable ``id``/``ts`` or is not JSON (nothing written).
            OperationFailed: writing failed; nothing was acked, redeliver the batch.
        """
        self._require_open()
        assert self._index is not None
        prepared = [_prepare(i, event) for i, event in enumerate(events)]
        results: list[str] = []
        new: list[tuple[str, int, str]] = []
        in_batch: set[str] = set()
        base = self._head
        self._generation += 1
        pack = PackWriter(self._git_dir / "objects" / "pack", self._generation)
        try:
            for item in prepared:
                if item.event_id in in_batch or self.commit_for(item.event_id) is not None:
                    results.append(ALREADY_MIRRORED)
                    continue
                commit = self._write_commit(pack, item)
                in_batch.add(item.event_id)
                new.append((item.event_id, self._seq, commit))
                results.append(commit)
            if not new:
                return results
            pack.write()
            self._packs += 1
            self._update_ref(base, new[-1][2])
            self._index.add(new)
            self.checkpoint()
        except (OSError, sqlite3.Error, subprocess.SubprocessError) as exc:
            self._recover()
            raise OperationFailed(f"mirroring into {self.repo} failed: {exc}") from exc
        except BaseException:
            self._recover()
            raise
        if self._packs > self.max_packs:
            try:
                self.pack()
            except OperationFailed:
                # The batch is durable already; merging packs can wait for the next one.
                logger.exception("merging the packs of %s failed", self.repo)
        return results

    def _recover(self) -> None:
        """After a failed batch: forget unwritten commits, index any that did reach the ref."""
        try:
            self._load_head()
            self._reconcile()
        except Exception:
            logger.exception("audit-mirror could not recover after a failed batch; reopen it")
            self.close()

    def _write_commit(self, pack: PackWriter, item: _Prepared) -> str:
        assert self._reader is not None
        path = [self._root]
        for name in item.dirs:
            path.append(path[-1].child(name, self._reader, pack))
        path[-1].set(item.file_name, pack.add(b"blob", item.blob)[0], tree=False)
        for depth in range(len(item.dirs), 0, -1):
            path[depth - 1].set(item.dirs[depth - 1], path[depth].write(pack), tree=True)
        tree = self._root.write(pack).hex()
        seq = self._seq + 1
        header = f"tree {tree}\n"
        if self._head is not None:
            header += f"parent {self._head}\n"
        header += f"author {_IDENT} {item.author_time} +0000\n"
        header += f"committer {_IDENT} {int(time.time())} +0000\n"
        message = f"{item.subject}\n\n{EVENT_ID_TRAILER}: {item.event_id}\n{SEQ_TRAILER}: {seq}\n"
        signature = self._signer.sign(f"{header}\n{message}".encode(), GIT_NAMESPACE)
        gpgsig = "gpgsig " + signature.rstrip("\n").replace("\n", "\n ") + "\n"
        commit = pack.add(b"commit", f"{header}{gpgsig}\n{message}".encode())[0].hex()
        self._head, self._seq = commit, seq
        return commit

    def _update_ref(self, expected: str | None, new: str) -> None:
        """Compare-and-swap ``refs/heads/main`` to ``new``, durably (as git's lock protocol)."""
        current = self._read_ref()
        if current != expected:
            raise OperationFailed(
                f"{REF} of {self.repo} moved to {current} outside the audit-mirror "
                f"(expected {expected}); run `prvng audit verify`"
            )
        ref = self._git_dir / REF
        ref.parent.mkdir(parents=True, exist_ok=True)
        lock = ref.with_name(ref.name + ".lock")
        with open(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
            f.write(new.encode("ascii") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(lock, ref)
        fsync_dir(ref.parent)

    # ------------------------------------------------------------------ checkpoint, publish

    def checkpoint(self) -> Path:
        """Sign the current head and count into the checkpoint file (atomic, durable).

        :meth:`mirror` calls it after each batch; calling it again is harmless.
        """
        self._require_open()
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        payload = checkpoint_payload(self._head, self._seq, REF, PRINCIPAL, at)
        doc = json.loads(payload)
        doc["signature"] = self._signer.sign(payload, CHECKPOINT_NAMESPACE)
        text = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        write_durably(self.checkpoint_path, text.encode("utf-8"))
        return self.checkpoint_path

    def publish(self) -> list[PublishResult]:
        """Push ``refs/heads/main`` to every remote (never forced); report each outcome.

        A Radicle remote (``rad`` or a ``rad:`` URL) is skipped when the ``rad`` CLI is not
        installed. Failures are logged and returned, never raised: local commits stay.
        """
        self._require_open()
        results = []
        for remote in self.remotes:
            if (remote == "rad" or remote.startswith("rad:")) and shutil.which("rad") is None:
                results.append(PublishResult(remote, ok=False, skipped=True, message="no `rad`"))
                logger.info("skipping Radicle remote %s: the rad CLI is not installed", remote)
                continue
            try:
                proc = subprocess.run(
                    [
                        "git",
                        f"--git-dir={self._git_dir}",
                        "push",
                        "--porcelain",
                        "-q",
                        remote,
                        f"{REF}:{REF}",
                    ],
                    capture_output=True,
                    text=True,
                    env=git_env(),
                    timeout=_PUSH_TIMEOUT_S,
                    check=False,
                )
                ok, message = proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}".strip()
            except (OSError, subprocess.TimeoutExpired) as exc:
                ok, message = False, str(exc)
            if not ok:
                logger.warning("publishing %s to %s failed: %s", self.repo, remote, message)
            results.append(PublishResult(remote, ok=ok, message=message))
        return results

    def pack(self) -> None:
        """Merge the small per-batch packs (``git repack -d --geometric=2``, deltas included).

        :meth:`mirror` calls it when there are more than :attr:`max_packs` packs. Safe at any
        moment between batches: git writes the new pack before it deletes the old ones.
        """
        self._require_open()
        assert self._reader is not None
        argv = ["git", f"--git-dir={self._git_dir}", "repack", "-d", "-q", "--geometric=2"]
        _run(argv, timeout=3600)
        # The reader may hold packs that repack just deleted.
        self._reader.close()
        self._reader = GitObjectReader(self._git_dir)
        self._packs = self._count_packs()

    def _count_packs(self) -> int:
        return sum(1 for _ in (self._git_dir / "objects" / "pack").glob("pack-*.idx"))

    def _remove_leftovers(self) -> None:
        """Delete the temporary files of a killed batch.

        A pack renamed just before a crash but without its index is left alone: git ignores it
        (and ``git gc`` removes it), while deleting it could race with a ``git repack`` still
        running after its parent mirror was killed.
        """
        pack_dir = self._git_dir / "objects" / "pack"
        for tmp in pack_dir.glob(f"{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
        self._packs = self._count_packs()


def _run(argv: list[str], *, timeout: float = _GIT_TIMEOUT_S) -> str:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=git_env(), timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OperationFailed(f"`{' '.join(argv)}` failed: {exc}") from exc
    if proc.returncode != 0:
        raise OperationFailed(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc.stdout
