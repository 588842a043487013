"""`prvng serve <service>`: run one service alone (distributed mode)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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


DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data dir: keys, SQLite, repository \\[env PRVNG_HOME]."),
]
StateUrl = Annotated[
    str | None,
    typer.Option(help="Database URL, e.g. postgresql://user@host/db \\[env PRVNG_STATE__URL]."),
]
NatsUrl = Annotated[
    str | None,
    typer.Option(
        help="NATS server or cluster, comma-separated (nats://h1:4222,nats://h2:4222) "
        "\\[env PRVNG_NATS__URL]. Default: the embedded server's address (127.0.0.1:4223), "
        "which `prvng platform start` runs."
    ),
]


def _serve_alone(
    ctx: typer.Context,
    section: str,
    make: Any,
    *,
    port: int | None,
    host: str | None,
    data_dir: Path | None,
    state_url: str | None,
    nats_url: str | None,
    extra: dict[str, Any] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Settings from every layer plus the flags, then one service under the supervisor."""
    st = state_of(ctx)
    if data_dir is not None:
        st.home = data_dir
    settings = st.settings(
        **{section: {"port": port, "host": host, **(extra or {})}},
        state={"url": state_url},
        nats={"url": nats_url},
        **(sections or {}),
    )
    from provisioning.core.logging import configure_logging
    from provisioning.platform.supervisor import run_services

    configure_logging(settings.log.level, settings.log.format)
    svc = make(settings)
    run(
        run_services(
            [svc],
            on_ready=lambda _s: console.print(f"{svc.name} on http://{svc.host}:{svc.port}"),
        )
    )


@app.command("ops-keeper")
def ops_keeper(
    ctx: typer.Context,
    port: Annotated[
        int | None, typer.Option(help="Port \\[env PRVNG_OPS_KEEPER__PORT], default 8084.")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Bind address \\[env PRVNG_OPS_KEEPER__HOST].")
    ] = None,
    data_dir: DataDir = None,
    state_url: StateUrl = None,
    nats_url: NatsUrl = None,
) -> None:
    """Run the ops-keeper alone: policy decisions, approvals, freezes, signed operation
    tokens published on NATS, and their JWKS at /.well-known/jwks.json (point controllers
    and orchestrators at it with `ops_keeper.url`). Authenticates against the control center
    (`control_center.url`)."""
    from provisioning.ops_keeper.app import OpsKeeperService

    _serve_alone(
        ctx,
        "ops_keeper",
        OpsKeeperService,
        port=port,
        host=host,
        data_dir=data_dir,
        state_url=state_url,
        nats_url=nats_url,
    )


@app.command("ops-controller")
def ops_controller(
    ctx: typer.Context,
    port: Annotated[
        int | None,
        typer.Option(help="Health/metrics port \\[env PRVNG_OPS_CONTROLLER__PORT], default 8085."),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Bind address \\[env PRVNG_OPS_CONTROLLER__HOST].")
    ] = None,
    data_dir: DataDir = None,
    state_url: StateUrl = None,
    nats_url: NatsUrl = None,
    orchestrator_url: Annotated[
        str | None,
        typer.Option(help="Where to dispatch \\[env PRVNG_ORCHESTRATOR__URL]."),
    ] = None,
    idempotency: Annotated[
        str | None,
        typer.Option(
            help="`state` (the SQL store) or `surrealdb` (embedded file store; one controller "
            "per file) \\[env PRVNG_OPS_CONTROLLER__IDEMPOTENCY]."
        ),
    ] = None,
) -> None:
    """Run an ops-controller: consumes signed operations from `ops.pending.>`, verifies each
    against the keeper's keys (`ops_keeper.url`, or the key ring in the data dir), records its
    id once and dispatches it to the orchestrator. Several controllers may share the durable
    consumer when their idempotency store is the same PostgreSQL."""
    from provisioning.ops_controller.app import OpsControllerService

    _serve_alone(
        ctx,
        "ops_controller",
        OpsControllerService,
        port=port,
        host=host,
        data_dir=data_dir,
        state_url=state_url,
        nats_url=nats_url,
        extra={"idempotency": idempotency},
        sections={"orchestrator": {"url": orchestrator_url}},
    )


@app.command("audit-mirror")
def audit_mirror(
    ctx: typer.Context,
    port: Annotated[
        int | None,
        typer.Option(help="Health/metrics port \\[env PRVNG_AUDIT_MIRROR__PORT], default 8086."),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Bind address \\[env PRVNG_AUDIT_MIRROR__HOST].")
    ] = None,
    data_dir: DataDir = None,
    nats_url: NatsUrl = None,
    repo: Annotated[
        str | None,
        typer.Option(
            help="Git repository to commit to \\[env PRVNG_AUDIT_MIRROR__REPO]; default "
            "<data dir>/audit-mirror/repo.git."
        ),
    ] = None,
) -> None:
    """Run the audit-mirror: every event on `ops.audit.>` becomes one SSH-signed commit in a
    git repository (acked only once on disk), pushed to `audit_mirror.remotes` after each
    batch. Check the repository with `prvng audit verify --repo PATH`. Run one per
    repository (a lock in its state dir enforces it)."""
    from provisioning.audit_mirror.app import AuditMirrorService

    _serve_alone(
        ctx,
        "audit_mirror",
        AuditMirrorService,
        port=port,
        host=host,
        data_dir=data_dir,
        state_url=None,
        nats_url=nats_url,
        extra={"repo": repo},
    )
