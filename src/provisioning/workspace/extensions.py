"""Extensions: find them by layer, read their manifests, run their operations.

Layers, lowest first: the built-ins shipped with the platform, the workspace's ``extensions/``,
the infra's ``infra/<infra>/extensions/``; a higher layer's extension of the same kind and name
wins. The protocol (one JSON request on stdin, one JSON answer on stdout, progress on stderr) is
in ``docs/reference/extensions.md``; :func:`run_operation` enforces it and turns every way an
extension can fail into an :class:`~provisioning.core.errors.ExtensionError` naming the
extension, the operation and the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

from provisioning.core.errors import ExtensionError, NickelError, NotFound, ValidationError
from provisioning.core.nickel import contract, evaluate_file

__all__ = [
    "KINDS",
    "OPERATIONS",
    "Extension",
    "builtin_dir",
    "discover",
    "resolve",
    "run_operation",
]

Kind = Literal["provider", "taskserv", "cluster"]
KINDS: dict[str, str] = {"provider": "providers", "taskserv": "taskservs", "cluster": "clusters"}
#: The operations each kind must implement.
OPERATIONS: dict[str, tuple[str, ...]] = {
    "provider": ("create", "delete", "status", "list", "exec"),
    "taskserv": ("install", "remove", "check"),
    "cluster": ("create", "delete", "check"),
}
_STDERR_TAIL = 20
_MAX_ANSWER = 16 * 1024 * 1024


def builtin_dir() -> Path:
    """The built-in extensions: ``extensions/`` at the top of the source tree (editable install)
    or ``provisioning/_extensions`` inside an installed wheel."""
    here = Path(__file__).resolve().parent.parent  # src/provisioning
    packaged = here / "_extensions"
    if packaged.is_dir():
        return packaged
    return here.parent.parent / "extensions"


@dataclass(frozen=True)
class Extension:
    """One extension as found on disk."""

    name: str
    kind: str
    version: str
    description: str
    requires: tuple[str, ...]
    operations: Mapping[str, str]
    timeout_s: float
    roles: tuple[str, ...]
    path: Path
    layer: str  # builtin | workspace | infra

    @property
    def ref(self) -> str:
        """``taskservs/redis``: how users name it."""
        return f"{KINDS[self.kind]}/{self.name}"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "version": self.version,
            "layer": self.layer,
            "path": str(self.path),
            "description": self.description,
            "requires": list(self.requires),
            "operations": sorted(self.operations),
        }


def load_manifest(folder: Path, layer: str) -> Extension:
    """Read and check ``folder/extension.ncl``.

    Raises:
        NickelError: the manifest does not evaluate or breaks the contract (file, line, caret).
        ValidationError: an operation of the kind is missing, or names a missing executable.
    """
    data = evaluate_file(
        folder / "extension.ncl", wrap=f"({{file}}) | {contract('extension.ncl', 'Extension')}"
    )
    ext = Extension(
        name=data["name"],
        kind=data["kind"],
        version=data["version"],
        description=data.get("description", ""),
        requires=tuple(data.get("requires", ())),
        operations=dict(data["operations"]),
        timeout_s=float(data.get("timeout_s", 300)),
        roles=tuple(data.get("roles", ())),
        path=folder.resolve(),
        layer=layer,
    )
    where = f"extension {KINDS[ext.kind]}/{ext.name} ({folder / 'extension.ncl'})"
    if folder.name != ext.name:
        raise ValidationError(f"{where}: its folder must be named {ext.name!r}", field="name")
    if KINDS[ext.kind] != folder.parent.name:
        raise ValidationError(
            f"{where}: a {ext.kind} belongs under {KINDS[ext.kind]}/, not {folder.parent.name}/",
            field="kind",
        )
    missing = [op for op in OPERATIONS[ext.kind] if op not in ext.operations]
    if missing:
        raise ValidationError(
            f"{where}: a {ext.kind} must implement {', '.join(OPERATIONS[ext.kind])}; "
            f"missing {', '.join(missing)}",
            field="operations",
        )
    for op, exe in ext.operations.items():
        path = (ext.path / exe).resolve()
        if not path.is_file():
            raise ValidationError(f"{where}: operation {op}: executable {exe} not found", field=op)
        if ext.path not in path.parents:
            raise ValidationError(f"{where}: operation {op}: {exe} leaves the folder", field=op)
        if path.suffix != ".py" and not os.access(path, os.X_OK):
            raise ValidationError(
                f"{where}: operation {op}: {exe} is not executable (chmod +x, with a shebang)",
                field=op,
            )
    return ext


def layer_dirs(workspace: Path | None, infra: str | None) -> list[tuple[str, Path]]:
    """The extension roots, lowest layer first."""
    dirs = [("builtin", builtin_dir())]
    if workspace is not None:
        dirs.append(("workspace", workspace / "extensions"))
        if infra:
            dirs.append(("infra", workspace / "infra" / infra / "extensions"))
    return dirs


@dataclass
class Catalog:
    """Every extension visible from a workspace and infra, the winner of each name first."""

    found: dict[tuple[str, str], Extension] = field(default_factory=dict)
    shadowed: list[Extension] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def all(self) -> list[Extension]:
        return sorted(self.found.values(), key=lambda e: (e.kind, e.name))


def discover(workspace: Path | None = None, infra: str | None = None) -> Catalog:
    """Scan every layer. A broken extension is reported in ``errors`` (and not usable), so one
    bad folder does not hide the others."""
    cat = Catalog()
    for layer, root in layer_dirs(workspace, infra):
        for kind, plural in KINDS.items():
            base = root / plural
            if not base.is_dir():
                continue
            for folder in sorted(p for p in base.iterdir() if (p / "extension.ncl").is_file()):
                try:
                    ext = load_manifest(folder, layer)
                except (NickelError, ValidationError) as exc:
                    cat.errors.append(exc.message)
                    continue
                key = (kind, ext.name)
                if key in cat.found:
                    cat.shadowed.append(cat.found[key])
                cat.found[key] = ext
    return cat


def resolve(
    ref: str, workspace: Path | None = None, infra: str | None = None, *, kind: str | None = None
) -> Extension:
    """The extension ``ref`` names (``taskservs/redis``, or ``redis`` with ``kind``) in the
    highest layer that has it.

    Raises:
        NotFound: no layer has it (the message lists what exists of that kind).
        NickelError | ValidationError: the winning folder's manifest is broken.
    """
    if "/" in ref:
        plural, _, name = ref.partition("/")
        kinds = [k for k, p in KINDS.items() if p == plural or k == plural]
        if not kinds:
            raise ValidationError(
                f"unknown extension kind {plural!r}: use providers/, taskservs/ or clusters/"
            )
        kind = kinds[0]
    else:
        name = ref
        if kind is None:
            raise ValidationError(
                f"name the kind: providers/{ref}, taskservs/{ref} or clusters/{ref}"
            )
    for layer, root in reversed(layer_dirs(workspace, infra)):
        folder = root / KINDS[kind] / name
        if (folder / "extension.ncl").is_file():
            return load_manifest(folder, layer)
    known = sorted(e.name for (k, _), e in discover(workspace, infra).found.items() if k == kind)
    raise NotFound(
        f"no {kind} named {name!r} in any layer; known: {', '.join(known) or 'none'}",
        kind=kind,
        name=name,
    )


# ---------------------------------------------------------------------- answers


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _ServerState(_Open):
    hostname: str
    provider_id: str | None = None
    address: str | None = None
    status: Literal["running", "stopped", "absent"]


class _ServerAnswer(_Open):
    server: _ServerState


class _Deleted(_Open):
    deleted: bool


class _Listed(_Open):
    servers: list[_ServerState]


class _Exec(_Open):
    exit_code: int
    stdout: str = ""
    stderr: str = ""


class _Outcome(_Open):
    ok: bool
    details: dict[str, Any] = {}
    reason: str | None = None


_ANSWERS: dict[tuple[str, str], type[BaseModel]] = {
    ("provider", "create"): _ServerAnswer,
    ("provider", "status"): _ServerAnswer,
    ("provider", "delete"): _Deleted,
    ("provider", "list"): _Listed,
    ("provider", "exec"): _Exec,
}


def _answer_model(kind: str, operation: str) -> type[BaseModel]:
    return _ANSWERS.get((kind, operation), _Outcome)


# ---------------------------------------------------------------------- running


def command_for(ext: Extension, operation: str) -> list[str]:
    """The argv that runs ``operation`` of ``ext``.

    Raises:
        ValidationError: the extension does not implement ``operation``.
    """
    exe = ext.operations.get(operation)
    if exe is None:
        raise ValidationError(
            f"extension {ext.ref} has no operation {operation!r}; it has "
            f"{', '.join(sorted(ext.operations))}",
            field="operation",
        )
    path = str((ext.path / exe).resolve())
    return [sys.executable, path] if path.endswith(".py") else [path]


def run_operation(
    ext: Extension,
    operation: str,
    request: Mapping[str, Any],
    *,
    timeout_s: float | None = None,
    stderr_sink: Any = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``operation`` of ``ext`` with ``request`` (``operation`` is set in it) and answer
    its checked JSON answer. stderr lines are copied to ``stderr_sink`` (a text file) as they
    come, and the last ones are kept for the error.

    Raises:
        ExtensionError: it could not start, timed out, exited non-zero, answered something that
            is not one JSON object, or an answer that breaks the operation's schema.
    """
    argv = command_for(ext, operation)
    body = json.dumps({**request, "operation": operation}).encode()
    limit = timeout_s if timeout_s is not None else ext.timeout_s
    where = f"extension {ext.ref} ({ext.layer} layer) failed in {operation}"
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        proc = subprocess.Popen(
            argv,
            cwd=ext.path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            start_new_session=True,
        )
    except OSError as exc:
        raise ExtensionError(
            f"{where}: cannot start {argv[-1]}: {exc.strerror}",
            extension=ext.ref,
            operation=operation,
        ) from None
    out, tail, timed_out = _communicate(proc, body, limit, stderr_sink)
    reason_tail = "\n".join("  " + line for line in tail[-_STDERR_TAIL:])
    if timed_out:
        raise ExtensionError(
            f"{where}: no answer within {limit:g} s (killed)\n{reason_tail}".rstrip(),
            extension=ext.ref,
            operation=operation,
            stderr=tail[-_STDERR_TAIL:],
        )
    if proc.returncode != 0:
        raise ExtensionError(
            f"{where}: exit code {proc.returncode}\n{reason_tail}".rstrip(),
            extension=ext.ref,
            operation=operation,
            exit_code=proc.returncode,
            stderr=tail[-_STDERR_TAIL:],
        )
    try:
        answer = json.loads(out)
    except ValueError:
        shown = out[:200].decode("utf-8", "replace")
        raise ExtensionError(
            f"{where}: its answer on stdout is not JSON: {shown!r}",
            extension=ext.ref,
            operation=operation,
            stderr=tail[-_STDERR_TAIL:],
        ) from None
    if not isinstance(answer, dict):
        raise ExtensionError(
            f"{where}: its answer must be one JSON object, got {type(answer).__name__}",
            extension=ext.ref,
            operation=operation,
        )
    try:
        _answer_model(ext.kind, operation).model_validate(answer)
    except PydanticValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(answer)'}: {e['msg']}" for e in exc.errors()
        )
        raise ExtensionError(
            f"{where}: its answer breaks the {operation} schema: {problems}",
            extension=ext.ref,
            operation=operation,
        ) from None
    return answer


def _communicate(
    proc: subprocess.Popen[bytes], body: bytes, timeout_s: float, sink: Any
) -> tuple[bytes, list[str], bool]:
    """Feed stdin, collect stdout, stream stderr lines to ``sink``; kill the process group on
    timeout. Answers (stdout, stderr lines, timed out). A background process the extension left
    holding the pipes does not block this once the extension itself has exited."""
    tail: list[str] = []
    chunks: list[bytes] = []
    size = [0]

    def read_err() -> None:
        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            tail.append(line)
            if len(tail) > 200:
                del tail[:100]
            if sink is not None:
                print(line, file=sink, flush=True)

    def read_out() -> None:
        assert proc.stdout is not None
        while size[0] <= _MAX_ANSWER:
            try:
                chunk = os.read(proc.stdout.fileno(), 65536)
            except (OSError, ValueError):  # closed under us: the call is over
                return
            if not chunk:
                return
            chunks.append(chunk)
            size[0] += len(chunk)

    def write_in() -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(body)
            proc.stdin.close()
        except OSError:  # it exited without reading: its exit code tells
            pass

    threads = [threading.Thread(target=f, daemon=True) for f in (read_err, read_out, write_in)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        proc.wait(10)
    for t in threads:
        t.join(2)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    return b"".join(chunks), tail, timed_out


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def request(
    target: Mapping[str, Any],
    settings: Mapping[str, Any] | None,
    *,
    workspace: Path | None,
    infra: str | None,
    ext: Extension,
    dry_run: bool = False,
) -> dict[str, Any]:
    """The request body (without ``operation``) the protocol defines."""
    runtime = (workspace / "runtime") if workspace is not None else None
    return {
        "target": dict(target),
        "settings": dict(settings or {}),
        "context": {
            "workspace": str(workspace) if workspace else None,
            "infra": infra,
            "runtime_dir": str(runtime) if runtime else None,
            "extension_dir": str(ext.path),
            "python": sys.executable,
            "prvng": [sys.executable, "-m", "provisioning.cli.main"],
            "dry_run": dry_run,
        },
    }
