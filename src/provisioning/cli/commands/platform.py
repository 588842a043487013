"""`prvng platform …`: run the whole platform on this machine."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import psutil
import typer

from provisioning import __version__
from provisioning.cli.output import console, err_console, render
from provisioning.cli.state import run, state_of
from provisioning.control_center.client import ControlCenterClient
from provisioning.core.errors import OperationFailed, ProvisioningError, Unreachable
from provisioning.core.settings import Settings
from provisioning.orchestrator.client import OrchestratorClient
from provisioning.platform.pidfile import PidFile

if TYPE_CHECKING:
    from provisioning.platform.supervisor import Service

app = typer.Typer(
    help="Start, stop and inspect the platform on this machine.", no_args_is_help=True
)

Host = Annotated[
    str | None,
    typer.Option(
        "--host", help="Address the orchestrator binds to \\[env PRVNG_ORCHESTRATOR__HOST]."
    ),
]
Port = Annotated[
    int | None,
    typer.Option(
        "--port", help="Orchestrator port, default 8080 \\[env PRVNG_ORCHESTRATOR__PORT]."
    ),
]


def _overrides(host: str | None, port: int | None) -> dict[str, Any]:
    return {"orchestrator": {"host": host, "port": port}}


@app.command()
def start(
    ctx: typer.Context,
    host: Host = None,
    port: Port = None,
    background: Annotated[
        bool,
        typer.Option("--background", "-d", help="Detach, write the pid file, return when healthy."),
    ] = False,
) -> None:
    """Run the platform in the foreground until Ctrl-C / SIGTERM: the control center, the
    orchestrator and a supervised nats-server (unless nats.url names one).

    State lives in the data dir (PRVNG_HOME, default ~/.local/share/provisioning): SQLite store,
    task logs, JetStream store, pid file. Running tasks survive a restart: they are recovered on
    the next start.
    """
    st = state_of(ctx)
    settings = st.settings(**_overrides(host, port))
    if background:
        _start_background(settings, host, port)
        return
    # Imported here: the server stack is heavy and every other command must start fast.
    from provisioning.core.logging import configure_logging
    from provisioning.platform.embedded import build_platform
    from provisioning.platform.supervisor import run_services

    configure_logging(settings.log.level, settings.log.format)
    pidfile = PidFile(settings.run_dir)
    o = settings.orchestrator
    k = settings.ops_keeper
    pidfile.claim(
        f"http://{_client_host(o.host)}:{o.port}",
        settings.control_center_url,
        k.url.rstrip("/") or f"http://{_client_host(k.host)}:{k.port}",
    )
    try:
        cc, services, units = build_platform(settings)

        def ready(started: Sequence[Service]) -> None:
            _print_ready(settings, started)
            if cc.admin_password:
                console.print(
                    f"First run: user [bold]admin[/] created with password "
                    f"[bold]{cc.admin_password}[/] — shown once; log in with `prvng login`.",
                    highlight=False,
                )

        run(run_services(services, on_ready=ready, background=units))
    finally:
        pidfile.release()
    console.print("platform stopped")


def _print_ready(settings: Settings, services: Sequence[Service]) -> None:
    console.print(
        f"[bold green]Provisioning platform {__version__} is running[/]  (data dir {settings.home})"
    )
    for svc in services:
        console.print(f"  {svc.name:<14} http://{svc.host}:{svc.port}   (API docs: /docs)")
    where = "embedded" if not settings.nats.url.strip() else "external"
    console.print(f"  {'nats':<14} {', '.join(settings.nats_servers)}   ({where}, JetStream)")
    console.print("Log in with `prvng login`. Stop with Ctrl-C or `prvng platform stop`.")


def _start_background(settings: Settings, host: str | None, port: int | None) -> None:
    pidfile = PidFile(settings.run_dir)
    if (pid := pidfile.read()) is not None:
        raise OperationFailed(
            f"the platform already runs as pid {pid}; `prvng platform stop` stops it"
        )
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.logs_dir / "platform.log"
    argv = [
        sys.executable,
        "-m",
        "provisioning.cli.main",
        "--data-dir",
        str(settings.home),
        "platform",
        "start",
    ]
    if host:
        argv += ["--host", host]
    if port:
        argv += ["--port", str(port)]
    env = dict(os.environ)
    first_password: str | None = None
    db_file = settings.home / "state" / "platform.db"
    if (
        not settings.state.url
        and not db_file.exists()
        and not settings.control_center.admin_password
    ):
        # First run: choose the admin password here so it is shown on this terminal, not
        # written to the background process's log.
        first_password = secrets.token_urlsafe(18)
        env["PRVNG_ADMIN_PASSWORD"] = first_password
    with log_path.open("ab") as logf:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://{_client_host(settings.orchestrator.host)}:{settings.orchestrator.port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            raise OperationFailed("the platform did not start:\n" + "\n".join(tail))
        if pidfile.read() == proc.pid and _healthy(url):
            console.print(f"platform started in the background (pid {proc.pid})")
            console.print(f"  orchestrator    {url}")
            console.print(f"  control center  {settings.control_center_url}")
            for name, sec in (
                ("ops-keeper", settings.ops_keeper),
                ("ops-controller", settings.ops_controller),
                ("audit-mirror", settings.audit_mirror),
            ):
                console.print(f"  {name:<15} http://{_client_host(sec.host)}:{sec.port}")
            console.print(f"  nats            {', '.join(settings.nats_servers)}")
            console.print(f"  log             {log_path}")
            if first_password:
                console.print(
                    f"First run: user admin created with password {first_password} "
                    "(shown once); log in with `prvng login`.",
                    highlight=False,
                    markup=False,
                )
            return
        time.sleep(0.1)
    raise OperationFailed(f"the platform did not become healthy within 60 s; see {log_path}")


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _healthy(url: str) -> bool:
    async def probe() -> bool:
        async with OrchestratorClient(url, timeout=2) as c:
            try:
                await c.health()
            except ProvisioningError:
                return False
            return True

    return asyncio.run(probe())


@app.command()
def stop(
    ctx: typer.Context,
    timeout: Annotated[float, typer.Option(help="Seconds to wait before SIGKILL.")] = 30.0,
) -> None:
    """Stop a platform started on this data dir (SIGTERM, then SIGKILL after --timeout).

    Running task attempts are not killed: the next start recovers them.
    """
    settings = state_of(ctx).settings()
    pidfile = PidFile(settings.run_dir)
    pid = pidfile.read()
    if pid is None:
        console.print("the platform is not running")
        return
    os.kill(pid, signal.SIGTERM)
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.TimeoutExpired:
        err_console.print(f"pid {pid} did not stop within {timeout:g}s; sending SIGKILL")
        os.kill(pid, signal.SIGKILL)
    except psutil.NoSuchProcess:
        pass
    console.print(f"platform stopped (pid {pid})")


@app.command()
def status(ctx: typer.Context) -> None:
    """Show whether the platform runs, and each service's health, version, uptime and address.

    Exit code 3 when it is not running or not reachable.
    """
    st = state_of(ctx)
    settings = st.settings()
    pid = PidFile(settings.run_dir).read()
    url = st.orchestrator_url()

    async def probe(service: str, base: str) -> dict[str, Any]:
        row: dict[str, Any] = {"service": service, "url": base, "pid": pid}
        async with ControlCenterClient(base, timeout=3) as c:
            try:
                h = await c.get("/health")
            except ProvisioningError as exc:
                return {**row, "status": "down", "error": exc.message}
        return {**row, "status": h["status"], "version": h["version"], "uptime_s": h["uptime_s"]}

    async def probe_all() -> list[dict[str, Any]]:
        return list(
            await asyncio.gather(probe("control-center", st.cc_url()), probe("orchestrator", url))
        )

    rows = run(probe_all())
    render(
        rows,
        st.output,
        columns=[
            ("service", "SERVICE"),
            ("status", "STATUS"),
            ("url", "URL"),
            ("pid", "PID"),
            ("version", "VERSION"),
            ("uptime_s", "UPTIME (s)"),
        ],
    )
    if any(r["status"] != "ok" for r in rows):
        raise Unreachable("the platform is not running or not healthy (`prvng platform start`)")
