"""Reading a Nickel workflow file in a child process (:mod:`provisioning.core.isolated`): the
web UI's submission evaluates the text a user pasted there, never in the control center itself.

Kept apart from :mod:`.ui.submit_views` so that the child imports only what reading the file
needs (not FastAPI nor the UI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provisioning.orchestrator.client import load_workflow_file

__all__ = ["load_workflow_data"]


def load_workflow_data(path: str) -> dict[str, Any]:
    """:func:`load_workflow_file` of ``path``, as JSON data (``WorkflowSpec.model_validate``
    reads it back).

    Raises:
        UsageError, NickelError, ValidationError: as :func:`load_workflow_file`.
    """
    return load_workflow_file(Path(path)).model_dump(mode="json")
