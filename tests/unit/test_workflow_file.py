"""Workflow files: every format loads, and every mistake names the file, line or field."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from provisioning.core.errors import NickelError, UsageError, ValidationError
from provisioning.orchestrator.api import DependencyKind, WorkflowSpec
from provisioning.orchestrator.workflow_file import (
    describe_validation_error,
    field_path,
    load_workflow_file,
    parse_workflow_text,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "workflows"
EXAMPLE_FILES = sorted(p for p in EXAMPLES.iterdir() if p.suffix in {".ncl", ".json", ".yaml"})


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_every_example_workflow_loads(path: Path) -> None:
    spec = load_workflow_file(path)

    names = {t.name for t in spec.tasks}
    assert len(names) == len(spec.tasks)
    for task in spec.tasks:
        assert {d.task for d in task.dependencies()} <= names
        for argv in (task.command, task.rollback):
            assert argv is None or argv[0] == "sh"


def test_examples_cover_every_format() -> None:
    assert {p.name for p in EXAMPLE_FILES} >= {
        "hello.ncl",
        "hello.json",
        "rollback-demo.ncl",
        "parallel.yaml",
    }


def test_hello_in_nickel_and_in_json_is_the_same_workflow() -> None:
    from_nickel = load_workflow_file(EXAMPLES / "hello.ncl")

    assert from_nickel == load_workflow_file(EXAMPLES / "hello.json")
    kinds = {d.task: d.kind for t in from_nickel.tasks for d in t.dependencies()}
    assert DependencyKind.SOFT in kinds.values()


def test_rollback_demo_fails_after_two_tasks_that_have_rollbacks() -> None:
    spec = load_workflow_file(EXAMPLES / "rollback-demo.ncl")

    assert all(t.rollback is not None and t.retry.max_attempts == 1 for t in spec.tasks)
    assert spec.tasks[-1].command is not None and "exit 1" in spec.tasks[-1].command[-1]


def test_nickel_workflow_may_use_lets_and_merges_and_gets_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "wf.ncl",
        """
let base = { timeout_s = 2.5, retry = { max_attempts = 1 } } in
{
  name = "n",
  tasks = [
    base & { name = "a", command = ["echo", "a"] },
    { name = "b", action = "noop", depends_on = [{ task = "a", kind = "optional" }] },
  ],
}
""",
    )

    spec = load_workflow_file(path)

    assert spec.tasks[0].timeout_s == 2.5
    assert spec.tasks[0].retry.max_attempts == 1
    assert spec.tasks[1].timeout_s == 300
    assert spec.tasks[1].dependencies()[0].kind is DependencyKind.OPTIONAL


# A bad value is reported at its own line (8); a record-level mistake at the task's first line (5).
@pytest.mark.parametrize(
    ("task_line", "expected", "line"),
    [
        ("timeout_s = -1,", "timeout_s", 8),
        ('comand = ["echo"],', "extra field `comand`", 5),
        ('on_failure = "explode",', '"fail", "continue", "rollback"', 8),
        ("retry = { max_attempts = 0 },", "max_attempts", 8),
        ('depends_on = [{ task = "a", kind = "sometimes" }],', '"hard", "soft", "optional"', 8),
        ('action = "noop",', "exactly one of `command`", 5),
    ],
    ids=[
        "negative-timeout",
        "misspelt-field",
        "bad-on-failure",
        "zero-attempts",
        "bad-kind",
        "xor",
    ],
)
def test_nickel_contract_violation_names_the_users_file_and_line(
    tmp_path: Path, task_line: str, expected: str, line: int
) -> None:
    path = _write(
        tmp_path,
        "broken.ncl",
        f"""{{
  name = "broken",
  tasks = [
    {{ name = "a", command = ["echo", "a"] }},
    {{
      name = "b",
      command = ["echo", "b"],
      {task_line}
    }},
  ],
}}
""",
    )

    with pytest.raises(NickelError) as info:
        load_workflow_file(path)

    message = info.value.message
    assert expected in message
    assert f"{path.resolve()}:{line}:" in message
    assert "\x1b[" not in message
    assert "\x1b[" in info.value.details["diagnostic_ansi"]


def test_nickel_value_error_points_at_the_offending_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "late.ncl",
        '{\n  name = "late",\n  tasks = [\n'
        '    { name = "a", command = ["x"], timeout_s = -1 },\n'
        "  ],\n}\n",
    )

    with pytest.raises(NickelError, match=r"late\.ncl:4:"):
        load_workflow_file(path)


def test_nickel_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "syntax.ncl", '{\n  name = "s",\n  tasks = [ { name = },\n}\n')

    with pytest.raises(NickelError, match=r"syntax\.ncl:3:"):
        load_workflow_file(path)


def test_nickel_workflow_named_workflow_ncl_does_not_shadow_the_contract(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "workflow.ncl", '{ name = "w", tasks = [{ name = "a", action = "noop" }] }'
    )

    assert load_workflow_file(path).name == "w"


def test_malformed_json_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "bad.json", '{\n  "name": "x",\n  "tasks": [\n    {"name": "a" "x": 1}\n  ]\n}\n'
    )

    with pytest.raises(ValidationError) as info:
        load_workflow_file(path)

    assert type(info.value) is ValidationError
    assert f"{path}:4:18: invalid JSON" in info.value.message
    assert info.value.details["line"] == 4


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "bad.yaml", "name: x\ntasks:\n  - name: a\n    command: [sh\n  - name: b\n"
    )

    with pytest.raises(ValidationError) as info:
        load_workflow_file(path)

    assert type(info.value) is ValidationError
    assert f"{path}:5:" in info.value.message
    assert "invalid YAML" in info.value.message


def test_yml_extension_is_read_as_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "w.yml", "name: y\ntasks:\n  - {name: a, command: [echo, a]}\n")

    assert load_workflow_file(path).tasks[0].command == ["echo", "a"]


def test_json_field_of_the_wrong_type_is_named_by_its_path(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "types.json",
        '{"name": "t", "tasks": [{"name": "a", "action": "noop"},'
        ' {"name": "b", "command": ["x"], "retry": {"max_attempts": "many"}},'
        ' {"name": "c", "command": ["x"], "timeout_s": -1}]}',
    )

    with pytest.raises(ValidationError) as info:
        load_workflow_file(path)

    message = info.value.message
    assert str(path) in message
    assert "tasks[1].retry.max_attempts: Input should be a valid integer" in message
    assert "tasks[2].timeout_s: Input should be greater than 0" in message
    fields = {e["field"] for e in info.value.details["errors"]}
    assert fields == {"tasks[1].retry.max_attempts", "tasks[2].timeout_s"}


def test_yaml_misspelt_field_is_named_by_its_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "typo.yaml", "name: y\ntasks:\n  - {name: a, comand: [echo]}\n")

    with pytest.raises(
        ValidationError, match=r"tasks\[0\]\.comand: Extra inputs are not permitted"
    ):
        load_workflow_file(path)


@pytest.mark.parametrize(
    ("text", "got"),
    [("[1, 2]", "a list"), ("", "nothing"), ("just text", "a str")],
    ids=["list", "empty", "scalar"],
)
def test_yaml_document_that_is_not_a_mapping_is_rejected(text: str, got: str) -> None:
    with pytest.raises(ValidationError, match=f"src.yaml: a workflow is a mapping.*{got}"):
        parse_workflow_text(text, "yaml", "src.yaml")


def test_parse_workflow_text_names_the_given_source() -> None:
    with pytest.raises(ValidationError, match=r"^request body:1:2: invalid JSON"):
        parse_workflow_text("{,}", "json", "request body")


def test_parse_workflow_text_returns_a_spec() -> None:
    spec = parse_workflow_text(
        '{"name": "p", "tasks": [{"name": "a", "action": "noop"}]}', "json", "s"
    )

    assert isinstance(spec, WorkflowSpec)
    assert spec.tasks[0].action == "noop"


def test_unsupported_extension_is_a_usage_error_naming_the_supported_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, "w.toml", 'name = "x"\n')

    with pytest.raises(UsageError) as info:
        load_workflow_file(path)

    assert not isinstance(info.value, ValidationError)
    for suffix in (".ncl", ".json", ".yaml", ".yml"):
        assert suffix in info.value.message


@pytest.mark.parametrize("name", ["missing.ncl", "missing.json", "missing.yaml"])
def test_missing_file_is_a_usage_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError, match="not found") as info:
        load_workflow_file(tmp_path / name)

    assert not isinstance(info.value, ValidationError)


def test_describe_validation_error_writes_one_path_per_line_for_any_model() -> None:
    class Inner(pydantic.BaseModel):
        count: int

    class Outer(pydantic.BaseModel):
        items: list[Inner]
        tags: dict[str, int]

    with pytest.raises(pydantic.ValidationError) as info:
        Outer.model_validate({"items": [{"count": 1}, {"count": "x"}], "tags": {"a.b": "y"}})

    text = describe_validation_error(info.value, "body")

    assert text.splitlines() == [
        "body: 2 validation errors:",
        "  items[1].count: Input should be a valid integer, unable to parse string as an integer"
        " (got 'x')",
        '  tags["a.b"]: Input should be a valid integer, unable to parse string as an integer'
        " (got 'y')",
    ]


def test_field_path_of_the_whole_document_is_top_level() -> None:
    assert field_path(()) == "(top level)"
    assert field_path(("tasks", 2, "retry", "max_attempts")) == "tasks[2].retry.max_attempts"
