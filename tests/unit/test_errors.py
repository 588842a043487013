"""The error tree: stable codes, one mapping to HTTP status and CLI exit code."""

from __future__ import annotations

import pytest

from provisioning.core import errors as e


@pytest.mark.parametrize(
    ("cls", "status", "exit_code"),
    [
        (e.ValidationError, 422, 2),
        (e.NickelError, 422, 2),
        (e.DagError, 422, 2),
        (e.LimitExceeded, 413, 2),
        (e.NotFound, 404, 1),
        (e.InvalidState, 409, 1),
        (e.Unreachable, 503, 3),
        (e.Unauthorized, 401, 3),
        (e.Forbidden, 403, 3),
        (e.ProvisioningError, 500, 1),
    ],
)
def test_each_error_maps_to_one_status_and_exit_code(
    cls: type[e.ProvisioningError], status: int, exit_code: int
) -> None:
    assert e.http_status_for(cls.code) == status
    assert e.exit_code_for(cls.code) == exit_code


def test_codes_are_unique_across_the_tree() -> None:
    # Subclasses elsewhere (e.g. a more specific Unauthorized) reuse their parent's code.
    tree = [c for c in e._all_subclasses(e.ProvisioningError) if c.__module__ == e.__name__]
    codes = [c.code for c in tree]
    assert len(codes) == len(set(codes))


def test_a_wire_error_comes_back_as_the_same_class_with_its_details() -> None:
    wire = e.DagError("the tasks form a cycle: a -> b -> a", cycle=["a", "b", "a"]).to_wire()
    back = e.error_from_wire(wire, 422)
    assert isinstance(back, e.DagError)
    assert back.details == {"cycle": ["a", "b", "a"]}
    assert back.message.startswith("the tasks form a cycle")


def test_an_error_without_message_uses_its_docstring() -> None:
    assert e.NotFound().message == "No such object; list the objects to find its id."


def test_every_error_class_documents_how_to_fix_it() -> None:
    for cls in e._all_subclasses(e.ProvisioningError):
        assert cls.__doc__ and cls.__doc__.strip(), cls
