"""Helpers for extensions written in Python (the built-ins use them; so may yours).

An executable calls :func:`run` with its operations; each gets a :class:`Request` and returns the
answer of the protocol (``docs/reference/extensions.md``)::

    from provisioning.workspace.sdk import Failure, Request, run

    def check(req: Request) -> dict:
        out = req.exec(["redis-cli", "-h", req.server["address"], "ping"])
        if out.stdout.strip() != "PONG":
            raise Failure(f"redis on {req.server['hostname']} does not answer PING")
        return {"ok": True, "details": {}}

    run({"install": install, "remove": remove, "check": check})

:meth:`Request.exec` runs a command on a server through its provider's ``exec``, so a task
service works on any provider.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["ExecResult", "Failure", "Request", "run", "wait_until"]


class Failure(Exception):
    """The operation failed for a reason the user should read (printed to stderr, exit 1)."""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str = ""
    stderr: str = ""
    pid: int | None = None

    def check(self, what: str) -> ExecResult:
        """Raise :class:`Failure` naming ``what`` unless the command exited 0."""
        if self.exit_code != 0:
            detail = (self.stderr or self.stdout).strip().splitlines()[-5:]
            raise Failure(f"{what} failed (exit code {self.exit_code}): {' | '.join(detail)}")
        return self


@dataclass
class Request:
    """One request of the protocol."""

    operation: str
    target: dict[str, Any]
    settings: dict[str, Any]
    context: dict[str, Any]

    @property
    def server(self) -> dict[str, Any]:
        """The target server (provider and task-service operations)."""
        server = self.target.get("server")
        if not isinstance(server, dict):
            raise Failure(f"{self.operation}: the request's target has no server")
        return server

    @property
    def runtime_dir(self) -> Path:
        """``<workspace>/runtime`` (created)."""
        raw = self.context.get("runtime_dir") or str(Path.cwd() / "runtime")
        path = Path(raw)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def progress(self, message: str) -> None:
        """A line of progress for the task's log."""
        print(message, file=sys.stderr, flush=True)

    def exec(
        self,
        argv: Sequence[str],
        *,
        server: Mapping[str, Any] | None = None,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 120.0,
        background: bool = False,
    ) -> ExecResult:
        """Run ``argv`` on ``server`` (default: the target's) through its provider's ``exec``.

        Raises:
            Failure: the provider could not run it (not: the command exited non-zero — see
                :attr:`ExecResult.exit_code` and :meth:`ExecResult.check`).
        """
        from provisioning.core.errors import ProvisioningError
        from provisioning.workspace.extensions import request, resolve, run_operation

        host = dict(server if server is not None else self.server)
        ws = self.context.get("workspace")
        workspace = Path(ws) if ws else None
        infra = self.context.get("infra")
        try:
            provider = resolve(f"providers/{host['provider']}", workspace, infra)
            settings: dict[str, Any] = dict(host.get("provider_settings") or {})
            settings.update(command=list(argv), timeout_s=timeout_s, background=background)
            if input is not None:
                settings["input"] = input
            if env:
                settings["env"] = dict(env)
            body = request(
                {"kind": "server", "server": host},
                settings,
                workspace=workspace,
                infra=infra,
                ext=provider,
            )
            answer = run_operation(provider, "exec", body, timeout_s=timeout_s + 30)
        except ProvisioningError as exc:
            raise Failure(exc.message) from None
        return ExecResult(
            exit_code=int(answer["exit_code"]),
            stdout=str(answer.get("stdout", "")),
            stderr=str(answer.get("stderr", "")),
            pid=answer.get("pid"),
        )


def wait_until(
    what: str, probe: Callable[[], bool], *, timeout_s: float = 20.0, every_s: float = 0.2
) -> None:
    """Poll ``probe`` until it is true.

    Raises:
        Failure: not within ``timeout_s`` (the message names ``what``).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if probe():
                return
        except Exception:  # a probe that errors is a probe that is not yet true
            pass
        if time.monotonic() > deadline:
            raise Failure(f"{what}: not within {timeout_s:g} s")
        time.sleep(every_s)


Handler = Callable[[Request], Mapping[str, Any]]


def run(handlers: Mapping[str, Handler]) -> NoReturn:
    """Read the request from stdin, call the handler of its operation, print the answer, exit.

    Exit 1 with the reason on stderr for a :class:`Failure`, a traceback for anything else, and
    exit 2 for an operation this executable does not serve or a request that is not JSON.
    """
    try:
        raw = json.loads(sys.stdin.read())
        req = Request(
            operation=str(raw["operation"]),
            target=dict(raw.get("target") or {}),
            settings=dict(raw.get("settings") or {}),
            context=dict(raw.get("context") or {}),
        )
    except (ValueError, KeyError, TypeError) as exc:
        print(f"bad request on stdin: {exc}", file=sys.stderr)
        sys.exit(2)
    handler = handlers.get(req.operation)
    if handler is None:
        print(
            f"operation {req.operation!r} is not served here; known: {', '.join(sorted(handlers))}",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        answer = dict(handler(req))
    except Failure as exc:
        print(str(exc), file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        sys.exit(1)
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    sys.exit(0)
