"""The one error tree of the platform.

Every error a user can see is a :class:`ProvisioningError` with a stable ``code``; the mapper
functions at the bottom turn a code into an HTTP status and a CLI exit code, so every surface
(REST, CLI, MCP) reports the same failure the same way::

    ProvisioningError              internal            500  exit 1
    ├── UsageError                 usage_error         400  exit 2
    │   ├── ValidationError        validation_error    422  exit 2
    │   │   ├── NickelError        nickel_error        422  exit 2
    │   │   ├── DagError           invalid_dag         422  exit 2
    │   │   └── LimitExceeded      limit_exceeded      413  exit 2
    │   └── ConfigError            config_error        400  exit 2
    ├── NotFound                   not_found           404  exit 1
    ├── Conflict                   conflict            409  exit 1
    │   └── InvalidState           invalid_state       409  exit 1
    ├── RateLimited                rate_limited        429  exit 1
    ├── OperationFailed            operation_failed    500  exit 1
    │   └── ExtensionError         extension_error     502  exit 1
    ├── StoreError                 store_error         503  exit 1
    ├── Unreachable                unreachable         503  exit 3
    └── Unauthorized               unauthorized        401  exit 3
        └── Forbidden              forbidden           403  exit 3

Each class's docstring is its default message; each message says how to fix the problem.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ConfigError",
    "Conflict",
    "DagError",
    "ExtensionError",
    "Forbidden",
    "InvalidState",
    "LimitExceeded",
    "NickelError",
    "NotFound",
    "OperationFailed",
    "ProvisioningError",
    "RateLimited",
    "StoreError",
    "Unauthorized",
    "Unreachable",
    "UsageError",
    "ValidationError",
    "error_from_wire",
    "exit_code_for",
    "http_status_for",
]


class ProvisioningError(Exception):
    """An internal error occurred; the service log has the details."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or (self.__doc__ or self.code).strip().splitlines()[0]
        self.details: dict[str, Any] = details
        super().__init__(self.message)

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` object of the JSON envelope."""
        return {"code": self.code, "message": self.message, "details": self.details}


class UsageError(ProvisioningError):
    """The request is not valid; check the command or request against `--help` or /docs."""

    code = "usage_error"
    http_status = 400
    exit_code = 2


class ValidationError(UsageError):
    """A field has a wrong value; the message names the field and what it expects."""

    code = "validation_error"
    http_status = 422


class NickelError(ValidationError):
    """A Nickel file does not evaluate or breaks its contract; Nickel's diagnostic follows."""

    code = "nickel_error"


class DagError(ValidationError):
    """The workflow's tasks do not form a valid DAG: fix the named tasks' `depends_on`."""

    code = "invalid_dag"


class LimitExceeded(ValidationError):
    """The request is larger than the configured maximum; split it or raise the limit."""

    code = "limit_exceeded"
    http_status = 413


class ConfigError(UsageError):
    """The platform configuration is invalid; fix the named setting."""

    code = "config_error"


class NotFound(ProvisioningError):
    """No such object; list the objects to find its id."""

    code = "not_found"
    http_status = 404


class Conflict(ProvisioningError):
    """The request conflicts with the object's current state; reload it and try again."""

    code = "conflict"
    http_status = 409


class InvalidState(Conflict):
    """The object is not in a state that allows this action; see its status."""

    code = "invalid_state"


class RateLimited(ProvisioningError):
    """Too many attempts; wait the number of seconds in `Retry-After` and try again."""

    code = "rate_limited"
    http_status = 429


class OperationFailed(ProvisioningError):
    """The operation ran and failed; its logs say why."""

    code = "operation_failed"


class ExtensionError(OperationFailed):
    """An extension failed; its message names the extension, the operation and why."""

    code = "extension_error"
    http_status = 502


class StoreError(ProvisioningError):
    """The state store is not available; check `state.url` and that the database is running."""

    code = "store_error"
    http_status = 503


class Unreachable(ProvisioningError):
    """The service is not reachable; check `--url` and that the platform is running."""

    code = "unreachable"
    http_status = 503
    exit_code = 3


class Unauthorized(ProvisioningError):
    """Not authenticated; log in with `prvng login` or set PRVNG_API_KEY."""

    code = "unauthorized"
    http_status = 401
    exit_code = 3


class Forbidden(Unauthorized):
    """Not allowed; ask an administrator for the permission named in the message."""

    code = "forbidden"
    http_status = 403


def _all_subclasses(cls: type[ProvisioningError]) -> list[type[ProvisioningError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[ProvisioningError]] = {
    c.code: c for c in _all_subclasses(ProvisioningError)
}


def http_status_for(code: str) -> int:
    """The HTTP status a wire error code maps to (500 for an unknown code)."""
    return _BY_CODE.get(code, ProvisioningError).http_status


def exit_code_for(code: str) -> int:
    """The CLI exit code a wire error code maps to (1 for an unknown code)."""
    return _BY_CODE.get(code, ProvisioningError).exit_code


def error_from_wire(error: dict[str, Any], status: int | None = None) -> ProvisioningError:
    """Rebuild the typed error from an ``{"code", "message", "details"}`` wire object."""
    code = str(error.get("code", "internal"))
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = ProvisioningError
        for candidate in _BY_CODE.values():
            if status is not None and candidate.http_status == status:
                cls = candidate
                break
    details = error.get("details") or {}
    return cls(
        str(error.get("message") or cls.__doc__), **(details if isinstance(details, dict) else {})
    )
