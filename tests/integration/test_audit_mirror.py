"""The audit-mirror against real git and ssh-keygen: commits, dedup, crash points, tampering.

Tampering is done the way an attacker with shell access would: plain git in a clone, rebases
re-signed with the mirror's real key, a force-push back into the mirror's repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from provisioning.audit_mirror import ALREADY_MIRRORED, GitMirror, VerifyReport, verify_repo
from provisioning.audit_mirror import mirror as mirror_module
from provisioning.audit_mirror.mirror import SshSigner
from provisioning.cli.commands.audit_mirror_cli import verify_repo_command
from provisioning.core.errors import ConfigError, OperationFailed, ValidationError

AUTHOR_ENV = {
    "GIT_AUTHOR_NAME": "mallory",
    "GIT_AUTHOR_EMAIL": "mallory@example.org",
    "GIT_COMMITTER_NAME": "mallory",
    "GIT_COMMITTER_EMAIL": "mallory@example.org",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **AUTHOR_ENV, **(env or {})},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def canonical(event: dict[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def make_events(n: int, *, day: str = "2025-03-04", start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "id": str(uuid.uuid4()),
            "ts": f"{day}T10:{(start + i) // 60 % 60:02d}:{(start + i) % 60:02d}.123456Z",
            "actor": "ana",
            "action": "ops:approve",
            "object_type": "operation",
            "object_id": f"op-{start + i}",
            "result": "success",
            "service": "ops-keeper",
            "details": {"n": start + i, "note": "größe ✓", "nested": {"b": 1, "a": [1, 2]}},
        }
        for i in range(n)
    ]


def verify(m: GitMirror, repo: Path | None = None) -> VerifyReport:
    return verify_repo(repo or m.repo, m.allowed_signers_path, m.checkpoint_path)


def assert_fsck_clean(repo: Path) -> None:
    out = git(repo, "fsck", "--full", "--strict", "--no-dangling")
    assert not out.strip()


def real_key_signing(m: GitMirror) -> list[str]:
    """git -c options that sign with the mirror's own key: the strongest attacker."""
    return [
        "-c", "gpg.format=ssh",
        "-c", f"user.signingkey={m.key_path}",
        "-c", "commit.gpgsign=true",
    ]  # fmt: skip


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[GitMirror]:
    with GitMirror(tmp_path / "audit.git", tmp_path / "state") as m:
        yield m


def make_clone(mirror: GitMirror, tmp_path: Path) -> Path:
    """A working clone of the mirror's repository, where the attacker edits."""
    where = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(mirror.repo), str(where))
    return where


def force_push(clone: Path) -> None:
    git(clone, "push", "-q", "--force", "origin", "HEAD:refs/heads/main")


# ---------------------------------------------------------------------- writing


def test_open_initialises_repo_key_allowed_signers_and_checkpoint(mirror: GitMirror) -> None:
    assert (mirror.key_path.stat().st_mode & 0o777) == 0o600
    assert git(mirror.repo, "rev-parse", "--is-bare-repository").strip() == "true"
    signers = mirror.allowed_signers_path.read_text(encoding="utf-8")
    public = mirror.key_path.with_suffix(".pub").read_text(encoding="utf-8").split()[1]
    assert signers.startswith("audit-mirror@prvng ")
    assert public in signers
    checkpoint = json.loads(mirror.checkpoint_path.read_text(encoding="utf-8"))
    assert (checkpoint["head"], checkpoint["count"]) == (None, 0)
    report = verify(mirror)
    assert report.ok, report
    assert report.checked == 0


def test_each_event_becomes_one_signed_commit_with_trailer_and_canonical_file(
    mirror: GitMirror,
) -> None:
    events = make_events(4, day="2025-03-04") + make_events(3, day="2025-12-31")
    events += make_events(2, day="2025-03-04", start=10)  # back to a day written in this batch
    events.append({**make_events(1)[0], "ts": "2026-01-01T00:30:00+02:00"})  # UTC day: Dec 31

    commits = mirror.mirror(events)

    assert len(set(commits)) == len(events)
    assert mirror.count == len(events) and mirror.head == commits[-1]
    log = git(
        mirror.repo,
        "log",
        "--reverse",
        "--format=%H %(trailers:key=Audit-Event-Id,valueonly,separator=)",
    )
    assert log.split() == [x for c, e in zip(commits, events, strict=True) for x in (c, e["id"])]
    for commit, event in zip(commits, events, strict=True):
        git(
            mirror.repo,
            "-c", f"gpg.ssh.allowedSignersFile={mirror.allowed_signers_path}",
            "verify-commit", commit,
        )  # fmt: skip
        changed = git(mirror.repo, "show", "--format=", "--name-status", commit).split()
        day = "2025/12/31" if event["ts"].startswith(("2025-12", "2026")) else "2025/03/04"
        path = f"events/{day}/{event['id']}.json"
        assert changed == ["A", path]
        blob = subprocess.run(
            ["git", "-C", str(mirror.repo), "show", f"{commit}:{path}"],
            capture_output=True,
            check=True,
        ).stdout
        assert blob == canonical(event)
    assert_fsck_clean(mirror.repo)
    assert verify(mirror).ok


def test_in_process_signature_is_byte_identical_to_ssh_keygen(mirror: GitMirror) -> None:
    message = "tree x\n\nsubject ✓\n".encode()
    for namespace in ("git", "prvng-audit-checkpoint"):
        theirs = subprocess.run(
            ["ssh-keygen", "-q", "-Y", "sign", "-f", str(mirror.key_path), "-n", namespace],
            input=message,
            capture_output=True,
            check=True,
        ).stdout.decode()
        assert SshSigner(mirror.key_path).sign(message, namespace) == theirs


def test_duplicates_make_no_commit_in_a_batch_in_a_later_call_or_after_reopening(
    tmp_path: Path,
) -> None:
    events = make_events(5)
    with GitMirror(tmp_path / "r", tmp_path / "s") as m:
        first = m.mirror([events[0], events[1], events[0], events[2]])
        assert first[2] == ALREADY_MIRRORED and ALREADY_MIRRORED not in (first[:2] + first[3:])
        again = m.mirror([events[1], {**events[2], "result": "failure"}, events[3]])
        assert again[:2] == [ALREADY_MIRRORED, ALREADY_MIRRORED]
        assert m.count == 4
        assert m.commit_for(events[1]["id"]) == first[1]
    with GitMirror(tmp_path / "r", tmp_path / "s") as m:
        assert m.mirror(events) == [ALREADY_MIRRORED] * 4 + [m.head]
        assert m.count == 5
        assert m.mirror(events) == [ALREADY_MIRRORED] * 5
        assert int(git(m.repo, "rev-list", "--count", "main")) == 5
        assert verify(m).ok


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"ts": "2025-01-01T00:00:00Z"}, "id"),
        ({"id": "../etc/passwd", "ts": "2025-01-01T00:00:00Z"}, "id"),
        ({"id": "", "ts": "2025-01-01T00:00:00Z"}, "id"),
        ({"id": "x"}, "ts"),
        ({"id": "x", "ts": "yesterday"}, "ts"),
        ({"id": "x", "ts": "2025-01-01T00:00:00Z", "details": {"v": float("nan")}}, None),
        ({"id": "x", "ts": "2025-01-01T00:00:00Z", "details": {"v": object()}}, None),
        ("not an object", "events"),
    ],
)
def test_a_bad_event_fails_the_batch_before_anything_is_written(
    mirror: GitMirror, bad: Any, field: str | None
) -> None:
    with pytest.raises(ValidationError) as err:
        mirror.mirror([*make_events(2), bad])
    assert err.value.details.get("field") == field
    assert mirror.count == 0 and mirror.head is None
    assert mirror.mirror(make_events(1))[0] == mirror.head


def test_the_repo_may_be_an_empty_directory_but_not_another_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with GitMirror(tmp_path / "empty", tmp_path / "s1") as m:
        m.mirror(make_events(1))
        assert verify(m).ok
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="neither empty nor a git repository"):
        GitMirror(tmp_path / "other", tmp_path / "s2").open()


def test_a_second_mirror_on_the_same_state_dir_is_refused(mirror: GitMirror) -> None:
    with pytest.raises(OperationFailed, match="another audit-mirror"):
        GitMirror(mirror.repo, mirror.state_dir).open()


def test_a_signing_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    GitMirror(tmp_path / "r", tmp_path / "s").open().close()
    key = tmp_path / "s" / "audit-mirror_ed25519"
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        GitMirror(tmp_path / "r", tmp_path / "s").open()


def test_large_days_are_stored_as_deltas_and_packs_are_merged(tmp_path: Path) -> None:
    events = [
        e for i in range(6) for e in make_events(50, day=f"2025-03-0{1 + i % 2}", start=i * 50)
    ]
    with GitMirror(tmp_path / "r", tmp_path / "s") as m:
        m.max_packs = 3
        for i in range(0, len(events), 30):
            m.mirror(events[i : i + 30])
        packs = list((m.git_dir / "objects" / "pack").glob("*.pack"))
        assert len(packs) <= 4
        assert_fsck_clean(m.repo)
        files = git(m.repo, "ls-tree", "-r", "--name-only", "main").split()
        assert len(files) == len(events) == m.count
        report = verify(m)
        assert report.ok and report.checked == len(events), report


# ---------------------------------------------------------------------- crash points


def test_crash_before_the_ref_moves_leaves_the_repo_unchanged_and_the_retry_commits(
    mirror: GitMirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror.mirror(make_events(3))
    head = mirror.head
    batch = make_events(4, start=3)

    def crash(self: GitMirror, expected: str | None, new: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(GitMirror, "_update_ref", crash)
    with pytest.raises(OperationFailed, match="disk gone"):
        mirror.mirror(batch)
    monkeypatch.undo()
    assert mirror.head == head and mirror.count == 3
    assert git(mirror.repo, "rev-parse", "main").strip() == head
    assert ALREADY_MIRRORED not in mirror.mirror(batch)
    assert mirror.count == 7
    assert_fsck_clean(mirror.repo)
    assert verify(mirror).ok


def test_crash_after_the_ref_moved_but_before_the_index_is_reconciled_on_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = make_events(5)
    m = GitMirror(tmp_path / "r", tmp_path / "s").open()
    m.mirror(batch[:2])

    def crash(self: object, rows: object) -> None:
        raise KeyboardInterrupt  # as abrupt as it gets inside the process

    monkeypatch.setattr(mirror_module._Index, "add", crash)
    with pytest.raises(KeyboardInterrupt):
        m.mirror(batch)
    monkeypatch.undo()
    m.close()
    assert int(git(tmp_path / "r", "rev-list", "--count", "main")) == 5

    with GitMirror(tmp_path / "r", tmp_path / "s") as m:
        assert m.mirror(batch) == [ALREADY_MIRRORED] * 5
        assert m.count == 5
        assert verify(m).ok


def test_crash_before_the_checkpoint_is_renewed_on_open_and_verifies_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = GitMirror(tmp_path / "r", tmp_path / "s").open()
    m.mirror(make_events(2))

    def crash(self: GitMirror) -> Path:
        raise OSError("no space left")

    monkeypatch.setattr(GitMirror, "checkpoint", crash)
    with pytest.raises(OperationFailed):
        m.mirror(make_events(3, start=2))
    monkeypatch.undo()
    # The repository is ahead of its checkpoint: fine, the newer commits are checked.
    assert json.loads(m.checkpoint_path.read_text(encoding="utf-8"))["count"] == 2
    report = verify(m)
    assert report.ok and report.checked == 5, report
    m.close()
    with GitMirror(tmp_path / "r", tmp_path / "s") as m:
        assert json.loads(m.checkpoint_path.read_text(encoding="utf-8"))["count"] == 5


# ---------------------------------------------------------------------- tampering


def test_an_edited_event_committed_without_signature_is_detected(
    mirror: GitMirror, tmp_path: Path
) -> None:
    events = make_events(4)
    mirror.mirror(events)
    clone = make_clone(mirror, tmp_path)
    path = next(clone.glob(f"events/*/*/*/{events[1]['id']}.json"))
    path.write_bytes(canonical({**events[1], "result": "denied"}))
    git(clone, "commit", "-q", "-am", f"fix\n\nAudit-Event-Id: {events[1]['id']}\nAudit-Seq: 5")
    force_push(clone)

    report = verify(mirror)

    assert not report.ok
    assert report.commit == git(clone, "rev-parse", "HEAD").strip()
    assert "not signed" in (report.reason or "")
    assert report.checked == 4


def test_an_edited_event_signed_with_another_key_is_detected(
    mirror: GitMirror, tmp_path: Path
) -> None:
    events = make_events(3)
    mirror.mirror(events)
    other = tmp_path / "other_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    clone = make_clone(mirror, tmp_path)
    path = next(clone.glob(f"events/*/*/*/{events[0]['id']}.json"))
    path.write_bytes(canonical({**events[0], "actor": "mallory"}))
    git(
        clone,
        "-c", "gpg.format=ssh", "-c", f"user.signingkey={other}",
        "commit", "-q", "-S", "-am", f"x\n\nAudit-Event-Id: {events[0]['id']}\nAudit-Seq: 4",
    )  # fmt: skip
    force_push(clone)

    report = verify(mirror)

    assert not report.ok
    assert "not in the allowed signers" in (report.reason or "")


def test_a_removed_commit_re_signed_with_the_real_key_is_detected(
    mirror: GitMirror, tmp_path: Path
) -> None:
    commits = mirror.mirror(make_events(6))
    clone = make_clone(mirror, tmp_path)
    git(clone, *real_key_signing(mirror), "rebase", "-q", "--onto", commits[1], commits[2])
    force_push(clone)

    report = verify(mirror)

    assert not report.ok
    assert "Audit-Seq is 4 where 3 was expected" in (report.reason or "")
    assert any("checkpointed head" in p.reason for p in report.problems)


def test_dropping_the_newest_commits_is_caught_by_the_checkpoint(mirror: GitMirror) -> None:
    commits = mirror.mirror(make_events(4))
    git(mirror.repo, "update-ref", "refs/heads/main", commits[1])

    report = verify(mirror)

    assert not report.ok and report.checked == report.total == 2
    assert report.commit == commits[3]
    assert "rewritten or truncated" in (report.reason or "")


def test_reordered_commits_re_signed_with_the_real_key_are_detected(
    mirror: GitMirror, tmp_path: Path
) -> None:
    mirror.mirror(make_events(5))
    clone = make_clone(mirror, tmp_path)
    swap = "sed -i -e '2{h;d}' -e '3G'"  # move the 2nd pick after the 3rd
    git(
        clone, *real_key_signing(mirror), "rebase", "-q", "-i", "--root",
        env={"GIT_SEQUENCE_EDITOR": swap},
    )  # fmt: skip
    force_push(clone)
    signers = f"gpg.ssh.allowedSignersFile={mirror.allowed_signers_path}"
    assert git(clone, "-c", signers, "log", "--format=%G?").split() == ["G"] * 5

    report = verify(mirror)

    assert not report.ok
    assert "Audit-Seq is 3 where 2 was expected" in (report.reason or "")


def test_an_amended_commit_re_signed_with_the_real_key_is_caught_by_the_checkpoint(
    mirror: GitMirror, tmp_path: Path
) -> None:
    events = make_events(3)
    commits = mirror.mirror(events)
    clone = make_clone(mirror, tmp_path)
    path = next(clone.glob(f"events/*/*/*/{events[2]['id']}.json"))
    path.write_bytes(canonical({**events[2], "result": "failure"}))
    git(clone, *real_key_signing(mirror), "commit", "-q", "-a", "--amend", "--no-edit")
    force_push(clone)

    report = verify(mirror)

    assert not report.ok
    assert report.checked == report.total == 3  # every commit is valid on its own
    assert report.commit == commits[2]
    assert "not in the history" in (report.reason or "")


def test_a_whole_rewrite_re_signed_with_the_real_key_is_caught_by_the_checkpoint(
    mirror: GitMirror, tmp_path: Path
) -> None:
    events = make_events(4)
    mirror.mirror(events)
    forged = [*events[:1], {**events[1], "actor": "nobody"}, *events[2:]]
    with GitMirror(
        tmp_path / "forged.git", tmp_path / "forged-state", key_path=mirror.key_path
    ) as f:
        f.mirror(forged)
        git(f.repo, "push", "-q", "--force", str(mirror.repo), "main:main")
    # The forger's own state verifies the forgery; the real checkpoint does not.
    assert verify(f, mirror.repo).ok

    report = verify(mirror)

    assert not report.ok and report.checked == 4
    assert "history was rewritten" in (report.reason or "")
    mirror.close()
    with pytest.raises(OperationFailed, match=r"rewritten|outside the mirror"):
        GitMirror(mirror.repo, mirror.state_dir).open()


def test_a_non_canonical_event_file_is_detected(mirror: GitMirror, tmp_path: Path) -> None:
    mirror.mirror(make_events(2))
    clone = make_clone(mirror, tmp_path)
    event = make_events(1, start=9)[0]
    path = clone / "events/2025/03/04" / f"{event['id']}.json"
    path.write_text(json.dumps(event, indent=2), encoding="utf-8")
    git(clone, "add", ".")
    message = f"audit\n\nAudit-Event-Id: {event['id']}\nAudit-Seq: 3"
    git(clone, *real_key_signing(mirror), "commit", "-q", "-m", message)
    force_push(clone)

    report = verify(mirror)

    assert not report.ok
    assert report.commit == git(clone, "rev-parse", "HEAD").strip()
    assert "not canonical JSON" in (report.reason or "")


def test_an_edited_checkpoint_is_detected(mirror: GitMirror) -> None:
    mirror.mirror(make_events(3))
    doc = json.loads(mirror.checkpoint_path.read_text(encoding="utf-8"))
    mirror.checkpoint_path.write_text(json.dumps({**doc, "count": 2}), encoding="utf-8")

    report = verify(mirror)

    assert not report.ok
    assert "checkpoint's signature does not verify" in (report.reason or "")


# ---------------------------------------------------------------------- publishing, CLI


def test_publish_pushes_to_a_bare_remote_that_then_verifies(tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    missing = str(tmp_path / "nowhere.git")
    with GitMirror(tmp_path / "r", tmp_path / "s", remotes=[str(remote), missing, "rad"]) as m:
        m.mirror(make_events(3))
        results = m.publish()
        assert [r.ok for r in results[:2]] == [True, False]
        assert "nowhere.git" in results[1].message
        if shutil.which("rad") is None:
            assert results[2].skipped
        m.mirror(make_events(2, start=3))
        assert m.publish()[0].ok
        assert git(remote, "rev-parse", "main").strip() == m.head
        report = verify_repo(remote, m.allowed_signers_path, m.checkpoint_path)
        assert report.ok and report.checked == 5, report
        # A remote that diverged is reported, never overwritten, and nothing local is lost.
        git(remote, "update-ref", "refs/heads/main", f"{m.head}~1")
        m.mirror(make_events(1, start=5))
        assert m.publish()[0].ok  # fast-forward from the older commit still works
        forked = git(remote, "commit-tree", "-p", "main", "-m", "fork", "main^{tree}").strip()
        git(remote, "update-ref", "refs/heads/main", forked)
        m.mirror(make_events(1, start=6))
        result = m.publish()[0]
        assert not result.ok and "rejected" in result.message
        assert m.count == 7 and verify(m).ok
    assert_fsck_clean(remote)


def test_cli_verify_prints_the_report_and_exits_1_on_a_problem(
    mirror: GitMirror, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror.mirror(make_events(2))
    report = verify_repo_command(mirror.repo, None, mirror.checkpoint_path)
    assert report.ok
    assert "OK" in capsys.readouterr().out

    app = typer.Typer()
    app.command()(verify_repo_command)
    result = CliRunner().invoke(
        app, ["--repo", str(mirror.repo), "--allowed-signers", str(mirror.allowed_signers_path)]
    )
    assert result.exit_code == 0, result.output
    assert "2 commit(s) verified" in result.output

    doc = json.loads(mirror.checkpoint_path.read_text(encoding="utf-8"))
    mirror.checkpoint_path.write_text(json.dumps({**doc, "head": None}), encoding="utf-8")
    with pytest.raises(OperationFailed) as err:
        verify_repo_command(mirror.repo, mirror.allowed_signers_path, None)
    assert err.value.exit_code == 1
    assert str(mirror.repo) in err.value.message
    assert "FAILED" in capsys.readouterr().out

    with pytest.raises(ConfigError):
        verify_repo_command(mirror.repo, None, None)
    with pytest.raises(ConfigError, match="does not exist"):
        verify_repo_command(mirror.repo.with_name("nope"), mirror.allowed_signers_path, None)


def test_prvng_audit_verify_repo_checks_it_from_the_command_line(
    mirror: GitMirror, tmp_path: Path
) -> None:
    import subprocess
    import sys

    mirror.mirror(make_events(3))
    argv = [sys.executable, "-m", "provisioning.cli.main", "audit", "verify"]
    argv += ["--repo", str(mirror.repo), "--allowed-signers", str(mirror.allowed_signers_path)]
    argv += ["--checkpoint", str(mirror.checkpoint_path)]
    good = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr

    clone = make_clone(mirror, tmp_path)
    (clone / "events" / "tampered.json").parent.mkdir(parents=True, exist_ok=True)
    (clone / "events" / "tampered.json").write_text("{}")
    git(clone, "add", "-A")
    git(clone, "-c", "commit.gpgsign=false", "commit", "-q", "-m", "sneaky")
    force_push(clone)
    bad = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1, bad.stdout + bad.stderr
