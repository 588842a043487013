"""`prvng audit verify --repo PATH`: check an audit-mirror git repository offline.

:func:`verify_repo_command` is a plain function with Typer annotations, so it can be registered
as a command (``audit_app.command("verify")(verify_repo_command)``) or called from an existing
one. It prints the report and raises :class:`OperationFailed` (exit 1) on any problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from provisioning.audit_mirror import VerifyReport, verify_repo
from provisioning.cli.output import console
from provisioning.core.errors import ConfigError, OperationFailed

__all__ = ["print_report", "resolve_trust_files", "verify_repo_command"]


def resolve_trust_files(
    repo: Path, allowed_signers: Path | None, checkpoint: Path | None
) -> tuple[Path, Path]:
    """The allowed-signers file and the checkpoint; each defaults to the other's directory
    (the audit-mirror's state dir keeps both).

    Raises:
        ConfigError: neither was given.
    """
    if allowed_signers is None and checkpoint is None:
        raise ConfigError(
            f"to verify {repo}, pass --allowed-signers or --checkpoint (the audit-mirror's "
            "state dir holds `allowed_signers` and `checkpoint.json`)"
        )
    if allowed_signers is None:
        assert checkpoint is not None
        allowed_signers = checkpoint.parent / "allowed_signers"
    if checkpoint is None:
        checkpoint = allowed_signers.parent / "checkpoint.json"
    return allowed_signers, checkpoint


def print_report(report: VerifyReport) -> None:
    """Print ``report`` for a person: a verdict line, then each problem with its commit."""
    checkpoint = (
        f"checkpoint {report.checkpoint_head or '-'} (event {report.checkpoint_count})"
        if report.checkpoint_count is not None
        else "checkpoint unreadable"
    )
    if report.ok:
        console.print(
            f"[bold green]OK[/] {escape(report.repo)}: {report.checked} commit(s) verified, "
            f"head {report.head or '-'}, {checkpoint}",
            highlight=False,
            soft_wrap=True,
        )
        return
    console.print(
        f"[bold red]FAILED[/] {escape(report.repo)}: {report.problem_count} problem(s); "
        f"{report.checked} of {report.total} commit(s) verified, head {report.head or '-'}, "
        f"{checkpoint}",
        highlight=False,
        soft_wrap=True,
    )
    for problem in report.problems:
        where = f"commit {problem.commit}" if problem.commit else "repository"
        console.print(f"  {where}: {escape(problem.reason)}", highlight=False, soft_wrap=True)
    if report.problem_count > len(report.problems):
        console.print(f"  … and {report.problem_count - len(report.problems)} more")


def verify_repo_command(
    repo: Annotated[
        Path, typer.Option("--repo", help="The audit-mirror git repository (bare or not).")
    ],
    allowed_signers: Annotated[
        Path | None,
        typer.Option(
            "--allowed-signers",
            help="SSH allowed-signers file of the mirror's keys "
            "(default: `allowed_signers` next to the checkpoint).",
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="The mirror's signed checkpoint (default: `checkpoint.json` next to the "
            "allowed-signers file).",
        ),
    ] = None,
) -> VerifyReport:
    """Check every commit's SSH signature, the unbroken history, the canonical events and the
    external checkpoint; exit 1 on any problem.

    Raises:
        ConfigError: a path is missing (exit 2).
        OperationFailed: the repository did not verify (exit 1); the report names the commit.
    """
    signers, checkpoint_path = resolve_trust_files(repo, allowed_signers, checkpoint)
    report = verify_repo(repo, signers, checkpoint_path)
    print_report(report)
    if not report.ok:
        where = f"commit {report.commit}" if report.commit else "the repository"
        raise OperationFailed(
            f"audit repository {repo} failed verification at {where}: {report.reason}",
            commit=report.commit,
            problems=report.problem_count,
        )
    return report
