"""`prvng serve <service>`: run one service alone (distributed mode)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from provisioning.cli.output import console
from provisioning.cli.state import run, state_of

app = typer.Typer(help="Run one platform service alone in this process.", no_args_is_help=True)


@app.command()
def orchestrator(
    ctx: typer.Context,
    port: Annotated[
        int | None, typer.Option(help="Port \\[env PRVNG_ORCHESTRATOR__PORT], default 8080.")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Bind address \\[env PRVNG_ORCHESTRATOR__HOST].")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Data dir for logs and SQLite \\[env PRVNG_HOME]."),
    ] = None,
    state_url: Annotated[
        str | None,
        typer.Option(help="Database URL, e.g. postgresql://user@host/db \\[env PRVNG_STATE__URL]."),
    ] = None,
    worker_id: Annotated[
        str | None,
        typer.Option(
            help="Stable worker id; a restarted worker with the same id takes its tasks back at "
            "once. Default: random \\[env PRVNG_ORCHESTRATOR__WORKER_ID]."
        ),
    ] = None,
    max_parallel: Annotated[
        int | None, typer.Option(help="Tasks run at once \\[env PRVNG_ORCHESTRATOR__MAX_PARALLEL].")
    ] = None,
) -> None:
    """Run an orchestrator worker: API plus scheduler. Several workers on one PostgreSQL
    (`--state-url postgresql://…`) share the ready tasks; a dead worker's tasks are taken over
    when its lease expires."""
    st = state_of(ctx)
    if data_dir is not None:
        st.home = data_dir
    settings = st.settings(
        orchestrator={
            "port": port,
            "host": host,
            "worker_id": worker_id,
            "max_parallel": max_parallel,
        },
        state={"url": state_url},
    )
    from provisioning.core.logging import configure_logging
    from provisioning.orchestrator.app import OrchestratorService
    from provisioning.platform.supervisor import run_services

    configure_logging(settings.log.level, settings.log.format)
    svc = OrchestratorService(settings, worker_id=settings.orchestrator.worker_id or None)
    run(
        run_services(
            [svc],
            on_ready=lambda _s: console.print(
                f"orchestrator worker {svc.engine.worker_id} on http://{svc.host}:{svc.port}"
            ),
        )
    )


@app.command("control-center")
def control_center(
    ctx: typer.Context,
    port: Annotated[
        int | None, typer.Option(help="Port \\[env PRVNG_CONTROL_CENTER__PORT], default 8081.")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Bind address \\[env PRVNG_CONTROL_CENTER__HOST].")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Data dir for signing keys and SQLite \\[env PRVNG_HOME]."),
    ] = None,
    state_url: Annotated[
        str | None,
        typer.Option(help="Database URL, e.g. postgresql://user@host/db \\[env PRVNG_STATE__URL]."),
    ] = None,
) -> None:
    """Run the control center alone: login, tokens and their JWKS, users, API keys, Cedar
    decisions and the audit log. Other services point at it with `control_center.url`
    \\[env PRVNG_CONTROL_CENTER__URL] and forward their audit events with a service API key
    (`control_center.service_api_key`, scope audit:write). Several control centers may share
    one PostgreSQL store and one signing-key directory."""
    st = state_of(ctx)
    if data_dir is not None:
        st.home = data_dir
    settings = st.settings(
        control_center={"port": port, "host": host},
        state={"url": state_url},
    )
    from provisioning.control_center.app import ControlCenterService
    from provisioning.core.logging import configure_logging
    from provisioning.platform.supervisor import run_services

    configure_logging(settings.log.level, settings.log.format)
    svc = ControlCenterService(settings)

    def ready(_services: object) -> None:
        console.print(f"control center on http://{svc.host}:{svc.port}")
        if svc.admin_password:
            console.print(
                f"first run: user [bold]admin[/], password [bold]{svc.admin_password}[/] — "
                "shown once; log in with `prvng login`."
            )

    run(run_services([svc], on_ready=ready))
