"""audit-mirror: audit events mirrored into a git repository as SSH-signed commits, and the
verifier of such a repository (DESIGN §7)."""

from provisioning.audit_mirror.mirror import ALREADY_MIRRORED, GitMirror, PublishResult
from provisioning.audit_mirror.verify import Problem, VerifyReport, verify_repo

__all__ = [
    "ALREADY_MIRRORED",
    "GitMirror",
    "Problem",
    "PublishResult",
    "VerifyReport",
    "verify_repo",
]
