"""Verify an audit-mirror repository against its allowed signers and its external checkpoint.

Each check, and what it catches (see :mod:`provisioning.audit_mirror.mirror` for the format):

* every commit on ``refs/heads/main`` carries a good SSH signature from a key of
  ``allowed_signers`` — checked by git and ``ssh-keygen`` themselves (``git log`` with ``%G?``,
  ``gpg.ssh.allowedSignersFile``), never by the mirror's own signing code: an edited or added
  file committed by anyone without the key, signed or not;
* the history is linear and ``Audit-Seq`` runs 1, 2, …, N: a dropped, reordered or inserted
  commit, even one re-signed with the real key, as long as the trailers were kept;
* every commit adds exactly one file, ``events/YYYY/MM/DD/<id>.json`` for its
  ``Audit-Event-Id`` (ids unique), whose bytes are the canonical JSON of an event with that id
  and day: an edited blob, a non-canonical file;
* the checkpoint verifies (``ssh-keygen -Y verify``, namespace ``prvng-audit-checkpoint``) and
  its head is commit number ``count`` of the history (later commits are the ones mirrored since,
  checked like the rest): any rewrite, truncation or amended commit, even one re-signed with the
  real key and with consistent trailers, because the checkpointed commit is gone from history.

Replace objects are ignored and a shallow repository is refused. The checkpoint and the
allowed-signers file are the roots of trust: keep them where the repository's writers cannot
write.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from provisioning.audit_mirror.gitobjects import GitObjectReader, git_env
from provisioning.audit_mirror.records import (
    CHECKPOINT_NAMESPACE,
    REF,
    Checkpoint,
    canonical_json,
    event_path,
    parse_commit,
    read_checkpoint,
)
from provisioning.core.errors import ConfigError, OperationFailed, ValidationError

__all__ = ["Problem", "VerifyReport", "verify_repo"]

_TIMEOUT_S = 3600.0
_SIGNATURE_STATUS = {
    "N": "is not signed",
    "B": "has a bad signature",
    "U": "is signed by a key that is not in the allowed signers",
    "E": "has a signature that cannot be checked",
    "X": "has an expired signature",
    "Y": "is signed by an expired key",
    "R": "is signed by a revoked key",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong: the commit it was found at (None for the repository as a whole)."""

    commit: str | None
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_repo`.

    ``checked`` counts the commits that passed every check (all ``total`` of them when ``ok``);
    ``problems`` lists the first ``problem_count`` problems found, in history order, then the
    checkpoint's; ``commit`` and ``reason`` are the first one's.
    """

    ok: bool
    repo: str
    checked: int
    total: int
    head: str | None
    checkpoint_head: str | None
    checkpoint_count: int | None
    problems: tuple[Problem, ...] = ()
    problem_count: int = 0

    @property
    def commit(self) -> str | None:
        """The commit of the first problem."""
        return self.problems[0].commit if self.problems else None

    @property
    def reason(self) -> str | None:
        """The first problem, in words."""
        return self.problems[0].reason if self.problems else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with ``commit`` and ``reason`` of the first problem)."""
        return {**asdict(self), "commit": self.commit, "reason": self.reason}


def _git(git_dir: Path, *args: str, stdin: bytes | None = None) -> bytes:
    argv = ["git", f"--git-dir={git_dir}", *args]
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, env=git_env(), timeout=_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OperationFailed(f"`{' '.join(argv)}` failed: {exc}") from exc
    if proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip()
        raise OperationFailed(f"`{' '.join(argv)}` failed: {message}")
    return proc.stdout


def _resolve_git_dir(repo: Path) -> Path:
    if not repo.is_dir():
        raise ConfigError(f"the audit repository {repo} does not exist")
    proc = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--absolute-git-dir"],
        capture_output=True,
        text=True,
        env=git_env(),
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise ConfigError(f"{repo} is not a git repository: {proc.stderr.strip()}")
    return Path(proc.stdout.strip())


def _checkpoint_problem(cp: Checkpoint, allowed_signers: Path) -> str | None:
    if cp.ref != REF:
        return f"the checkpoint is for {cp.ref}, not {REF}"
    with tempfile.TemporaryDirectory(prefix="prvng-verify-") as tmp:
        sig = Path(tmp) / "checkpoint.sig"
        sig.write_text(cp.signature, encoding="utf-8")
        argv = ["ssh-keygen", "-Y", "verify", "-f", str(allowed_signers), "-I", cp.principal]
        argv += ["-n", CHECKPOINT_NAMESPACE, "-s", str(sig)]
        try:
            proc = subprocess.run(
                argv, input=cp.payload(), capture_output=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OperationFailed(f"`ssh-keygen -Y verify` failed: {exc}") from exc
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip()
        return f"the checkpoint's signature does not verify for {cp.principal!r}: {detail}"
    return None


def _history(git_dir: Path) -> list[tuple[str, tuple[str, ...]]]:
    """``(commit, parents)`` of everything reachable from the ref, oldest first."""
    out = _git(git_dir, "rev-list", "--topo-order", "--reverse", "--parents", REF)
    rows = []
    for line in out.decode("ascii").splitlines():
        commit, *parents = line.split()
        rows.append((commit, tuple(parents)))
    return rows


def _signatures(git_dir: Path, allowed_signers: Path, commits: list[str]) -> dict[str, str]:
    """``commit → %G?`` (``G`` = good signature by an allowed signer), verified by git.

    git runs ``ssh-keygen`` twice per commit, so the commits are split over one ``git log``
    per CPU.
    """
    workers = max(1, min(os.cpu_count() or 1, 8, len(commits) // 100))
    step = -(-len(commits) // workers)
    chunks = [commits[i : i + step] for i in range(0, len(commits), step)]

    def check(chunk: list[str]) -> bytes:
        return _git(
            git_dir,
            "-c", "gpg.format=ssh",
            "-c", "gpg.ssh.program=ssh-keygen",
            "-c", f"gpg.ssh.allowedSignersFile={allowed_signers}",
            "-c", "log.showSignature=false",
            "log", "--no-walk=unsorted", "--stdin", "--format=%H %G?",
            stdin="".join(c + "\n" for c in chunk).encode("ascii"),
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=workers) as pool:
        outputs = list(pool.map(check, chunks))
    return dict(line.split(" ", 1) for out in outputs for line in out.decode("ascii").splitlines())


def _changes(git_dir: Path, commits: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    """``commit → [("<status> <new mode>", new blob, path), …]`` against its parent."""
    out = _git(
        git_dir,
        "diff-tree", "--stdin", "-r", "-z", "--root", "--no-renames",
        stdin="".join(c + "\n" for c in commits).encode("ascii"),
    )  # fmt: skip
    changes: dict[str, list[tuple[str, str, str]]] = {}
    fields = out.split(b"\x00")
    current: list[tuple[str, str, str]] = []
    i = 0
    while i < len(fields):
        field = fields[i].decode("utf-8", "surrogateescape")
        if field.startswith(":"):
            _, new_mode, _, blob, status = field[1:].split(" ")
            path = fields[i + 1].decode("utf-8", "surrogateescape")
            current.append((f"{status} {new_mode}", blob, path))
            i += 2
            continue
        if field:
            current = changes.setdefault(field.strip(), [])
        i += 1
    return changes


def _event_problem(data: bytes, event_id: str, path: str) -> str | None:
    try:
        event = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return f"{path} is not UTF-8 JSON"
    if not isinstance(event, dict):
        return f"{path} is not a JSON object"
    try:
        if canonical_json(event) != data:
            return f"{path} is not canonical JSON (sorted keys, no spaces, UTF-8)"
        if event.get("id") != event_id:
            return f"{path} holds event {event.get('id')!r}, the commit names {event_id!r}"
        expected = event_path(event)
    except ValidationError as exc:
        return f"{path}: {exc.message}"
    if expected != path:
        return f"event {event_id} belongs at {expected}, not {path}"
    return None


class _Walk:
    """Checks the commits one by one, oldest first."""

    def __init__(self, git_dir: Path, allowed_signers: Path, commits: list[str]) -> None:
        self.signatures = _signatures(git_dir, allowed_signers, commits)
        self.changes = _changes(git_dir, commits)
        self.reader = GitObjectReader(git_dir)
        self.seen: set[str] = set()

    def problem(
        self, seq: int, commit: str, parents: tuple[str, ...], prev: str | None
    ) -> str | None:
        expected_parents = (prev,) if prev else ()
        if parents != expected_parents:
            return (
                f"parents are {list(parents)}, expected {list(expected_parents)}: "
                "the history is not one unbroken line"
            )
        status = self.signatures.get(commit, "N")
        if status != "G":
            return f"commit {_SIGNATURE_STATUS.get(status, f'has signature status {status}')}"
        kind, data = self.reader.read(commit)
        if kind != "commit":
            return f"{commit} is a {kind}, not a commit"
        info = parse_commit(data)
        event_id = info.event_id
        if event_id is None:
            return "the commit has no single Audit-Event-Id trailer"
        if info.seq != seq:
            return (
                f"Audit-Seq is {'/'.join(info.seqs) or 'missing'} where {seq} was expected: a "
                "commit was removed, reordered or inserted"
            )
        if event_id in self.seen:
            return f"event {event_id} is mirrored twice"
        self.seen.add(event_id)
        changes = self.changes.get(commit, [])
        if len(changes) != 1 or changes[0][0] != "A 100644":
            listed = ", ".join(f"{c[0].split()[0]} {c[2]}" for c in changes) or "nothing"
            return f"the commit changes {listed} instead of adding one event file"
        _, blob, path = changes[0]
        return _event_problem(self.reader.read(blob)[1], event_id, path)


def _check_commits(
    git_dir: Path,
    signers: Path,
    history: list[tuple[str, tuple[str, ...]]],
    problems: list[Problem],
) -> int:
    walk = _Walk(git_dir, signers, [commit for commit, _ in history])
    checked = 0
    try:
        prev: str | None = None
        for seq, (commit, parents) in enumerate(history, 1):
            reason = walk.problem(seq, commit, parents, prev)
            if reason:
                problems.append(Problem(commit, reason))
            else:
                checked += 1
            prev = commit
    finally:
        walk.reader.close()
    return checked


def verify_repo(
    repo: Path, allowed_signers: Path, checkpoint_path: Path, *, max_problems: int = 20
) -> VerifyReport:
    """Check an audit-mirror repository; see the module docstring for what is checked.

    Raises:
        ConfigError: the repository, the allowed-signers file or the checkpoint is missing.
        OperationFailed: git or ssh-keygen could not run.
    """
    for path, what in ((allowed_signers, "allowed-signers file"), (checkpoint_path, "checkpoint")):
        if not path.is_file():
            raise ConfigError(f"the audit {what} {path} does not exist")
    git_dir = _resolve_git_dir(repo)
    signers = allowed_signers.resolve()
    problems: list[Problem] = []
    cp: Checkpoint | None = None
    try:
        cp = read_checkpoint(checkpoint_path)
    except ValidationError as exc:
        problems.append(Problem(None, exc.message))
    if cp is not None and (reason := _checkpoint_problem(cp, signers)):
        problems.append(Problem(None, reason))
    if (git_dir / "shallow").exists():
        problems.append(Problem(None, "the repository is shallow: its history is cut off"))

    head_out = subprocess.run(
        ["git", f"--git-dir={git_dir}", "rev-parse", "--verify", "-q", f"{REF}^{{commit}}"],
        capture_output=True,
        text=True,
        env=git_env(),
        timeout=60,
        check=False,
    )
    head = head_out.stdout.strip() or None
    history: list[tuple[str, tuple[str, ...]]] = []
    checked = 0
    try:
        history = _history(git_dir) if head else []
        if history:
            checked = _check_commits(git_dir, signers, history, problems)
    except OperationFailed as exc:
        # A corrupt or incomplete object store is a finding, not a crash of the verifier.
        problems.append(Problem(None, f"git cannot read the history: {exc.message}"))

    if cp is not None:
        positions = {commit: seq for seq, (commit, _) in enumerate(history, 1)}
        if cp.head is None and cp.count != 0:
            problems.append(Problem(None, f"the checkpoint has no head but count {cp.count}"))
        elif cp.head is not None and cp.head not in positions:
            problems.append(
                Problem(
                    cp.head,
                    f"the checkpointed head (event {cp.count}) is not in the history of {REF}: "
                    "the history was rewritten or truncated (or this copy is behind)",
                )
            )
        elif cp.head is not None and positions[cp.head] != cp.count:
            problems.append(
                Problem(
                    cp.head,
                    f"the checkpointed head is commit {positions[cp.head]} of the history, "
                    f"the checkpoint says {cp.count}",
                )
            )
    return VerifyReport(
        ok=not problems,
        repo=str(repo),
        checked=checked,
        total=len(history),
        head=head,
        checkpoint_head=cp.head if cp else None,
        checkpoint_count=cp.count if cp else None,
        problems=tuple(problems[:max_problems]),
        problem_count=len(problems),
    )
