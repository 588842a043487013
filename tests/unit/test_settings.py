"""Settings: each layer overrides the one below, and bad values name setting and layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioning.core.errors import ConfigError, NickelError
from provisioning.core.settings import load_settings


def _write_config(home: Path, text: str) -> None:
    (home / "config").mkdir(parents=True)
    (home / "config" / "platform.ncl").write_text(text, encoding="utf-8")


def test_defaults_apply_when_nothing_is_configured(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path, env={})
    assert s.orchestrator.port == 8080
    assert s.state_url == f"sqlite+aiosqlite:///{tmp_path / 'state' / 'platform.db'}"


def test_platform_ncl_overrides_defaults_env_overrides_file_and_flags_override_env(
    tmp_path: Path,
) -> None:
    _write_config(tmp_path, "{ orchestrator = { port = 9001, max_parallel = 3, lease_s = 7 } }")
    env = {"PRVNG_ORCHESTRATOR__PORT": "9002", "PRVNG_ORCHESTRATOR__MAX_PARALLEL": "4"}
    s = load_settings(home=tmp_path, env=env, overrides={"orchestrator": {"port": 9003}})
    assert s.orchestrator.port == 9003  # flag
    assert s.orchestrator.max_parallel == 4  # environment
    assert s.orchestrator.lease_s == 7  # file
    assert s.orchestrator.kill_grace_s == 10  # default


def test_prvng_home_chooses_the_data_dir(tmp_path: Path) -> None:
    assert load_settings(env={"PRVNG_HOME": str(tmp_path)}).home == tmp_path


def test_a_flag_set_to_none_does_not_hide_lower_layers(tmp_path: Path) -> None:
    s = load_settings(
        home=tmp_path,
        env={"PRVNG_ORCHESTRATOR__PORT": "9100"},
        overrides={"orchestrator": {"port": None}},
    )
    assert s.orchestrator.port == 9100


def test_a_json_environment_value_is_parsed(tmp_path: Path) -> None:
    env = {"PRVNG_ORCHESTRATOR__CONCURRENCY_LIMITS": '{"provider:local": 2}'}
    assert load_settings(home=tmp_path, env=env).orchestrator.concurrency_limits == {
        "provider:local": 2
    }


def test_a_bad_environment_value_names_the_setting_and_the_layer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(home=tmp_path, env={"PRVNG_ORCHESTRATOR__PORT": "eighty"})
    assert "orchestrator.port (from environment)" in err.value.message


def test_an_unknown_setting_from_flags_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"orchestrator.colour \(from flags\)"):
        load_settings(home=tmp_path, env={}, overrides={"orchestrator": {"colour": "red"}})


def test_a_contract_violation_in_platform_ncl_shows_nickels_diagnostic(tmp_path: Path) -> None:
    _write_config(tmp_path, "{\n  orchestrator = {\n    port = 70000,\n  },\n}\n")
    with pytest.raises(NickelError) as err:
        load_settings(home=tmp_path, env={})
    assert "platform.ncl:3" in err.value.message
    assert "\x1b[" not in err.value.message


def test_postgres_urls_map_to_the_async_driver(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path, env={"PRVNG_STATE__URL": "postgresql://u@h:5432/db"})
    assert s.state_url == "postgresql+asyncpg://u@h:5432/db"
