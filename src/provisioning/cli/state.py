"""What every command shares: the global flags and the settings built from them."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from provisioning.cli.credentials import Credentials
from provisioning.cli.output import OutputFormat
from provisioning.control_center.client import ControlCenterClient
from provisioning.core.settings import Settings, load_settings, service_url
from provisioning.orchestrator.client import OrchestratorClient
from provisioning.platform.pidfile import PidFile

if TYPE_CHECKING:
    from provisioning.ops_keeper.client import OpsKeeperClient

__all__ = ["CliState", "run", "state_of"]

T = TypeVar("T")


@dataclass
class CliState:
    output: OutputFormat
    url: str | None
    home: Path | None
    cc: str | None = None
    _settings: Settings | None = None

    def settings(self, **overrides: Any) -> Settings:
        """Settings from every layer; ``overrides`` are the command's own flags."""
        if overrides:
            return load_settings(home=self.home, overrides=overrides)
        if self._settings is None:
            self._settings = load_settings(home=self.home)
        return self._settings

    def orchestrator_url(self) -> str:
        """``--url``, else the URL the running platform of the data dir recorded, else settings."""
        if self.url:
            return self.url
        # `platform start --port P` must be found by later commands without repeating the port.
        if recorded := PidFile(self.settings().run_dir).url():
            return recorded
        o = self.settings().orchestrator
        return service_url(o.host, o.port)

    def cc_url(self) -> str:
        """``--cc-url``, else the URL the running platform recorded, else settings."""
        if self.cc:
            return self.cc.rstrip("/")
        if recorded := PidFile(self.settings().run_dir).url(1):
            return recorded
        return self.settings().control_center_url

    def keeper_url(self) -> str:
        """``ops_keeper.url``, else the URL the running platform recorded, else host:port."""
        k = self.settings().ops_keeper
        if k.url:
            return k.url.rstrip("/")
        if recorded := PidFile(self.settings().run_dir).url(2):
            return recorded
        return service_url(k.host, k.port)

    def keeper_client(self) -> OpsKeeperClient:
        """An ops-keeper client with the stored login or API key."""
        from provisioning.ops_keeper.client import OpsKeeperClient  # only the ops commands

        return OpsKeeperClient(self.keeper_url(), token=self.credentials().bearer_async)

    def credentials(self) -> Credentials:
        return Credentials(self.cc_url())

    def client(self) -> OrchestratorClient:
        return OrchestratorClient(self.orchestrator_url(), token=self.credentials().bearer_async)

    def cc_client(self, token: str | None = None) -> ControlCenterClient:
        """A control-center client; without ``token`` the stored login or API key is used."""
        return ControlCenterClient(self.cc_url(), token=token)


def state_of(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    assert isinstance(obj, CliState)
    return obj


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine at the CLI edge."""
    return asyncio.run(coro)
