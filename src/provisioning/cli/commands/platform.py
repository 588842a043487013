"""`prvng platform …`: run the whole platform on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import psutil
import typer

from provisioning import __version__
from provisioning.cli.output import console, err_console, render
from provisioning.cli.state import CliState, run, state_of
from provisioning.control_center.client import ControlCenterClient
from provisioning.core.errors import OperationFailed, ProvisioningError, Unreachable
from provisioning.core.settings import Settings, default_home, service_url
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
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data dir of the platform (as the global --data-dir) \\[env PRVNG_HOME].",
    ),
]


def _state(ctx: typer.Context, data_dir: Path | None) -> CliState:
    """The CLI state, with this command's --data-dir (if given) over the global one."""
    st = state_of(ctx)
    if data_dir is not None:
        st.home = data_dir
    return st


def _overrides(host: str | None, port: int | None) -> dict[str, Any]:
    return {"orchestrator": {"host": host, "port": port}}


@app.command()
def init(
    ctx: typer.Context,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing platform.ncl.")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Write <data dir>/config/platform.ncl with every setting, its default and what it does.

    Secrets (admin password, API keys) are left commented out: set them in the environment.
    Refuses to overwrite an existing file without --force.
    """
    from provisioning.platform.init_file import write_platform_ncl

    st = _state(ctx, data_dir)
    # Not st.settings(): the file being replaced may be the broken one.
    home = (st.home or Path(os.environ.get("PRVNG_HOME") or default_home())).expanduser()
    path = write_platform_ncl(home / "config" / "platform.ncl", force=force)
    console.print(f"wrote {path}", highlight=False)


def _ports(settings: Settings) -> list[tuple[str, str, int]]:
    """(service, host, port) of everything `platform start` binds, as build_platform wires it."""
    found = [
        ("orchestrator", settings.orchestrator.host, settings.orchestrator.port),
        ("control-center", settings.control_center.host, settings.control_center.port),
        ("ops-keeper", settings.ops_keeper.host, settings.ops_keeper.port),
    ]
    if settings.ops_controller.embedded:
        found.append(("ops-controller", settings.ops_controller.host, settings.ops_controller.port))
    if settings.audit_mirror.embedded:
        found.append(("audit-mirror", settings.audit_mirror.host, settings.audit_mirror.port))
    if not settings.nats.url.strip():
        found.append(("nats", settings.nats.host, settings.nats.port))
    return found


def _service_urls(settings: Settings) -> dict[str, str]:
    """Where clients reach each service of the platform, name → URL (recorded in the pid file)."""
    urls = {
        name: service_url(host, port) for name, host, port in _ports(settings) if name != "nats"
    }
    urls["control-center"] = settings.control_center_url
    if settings.ops_keeper.url.strip():
        urls["ops-keeper"] = settings.ops_keeper.url.rstrip("/")
    urls["nats"] = ", ".join(settings.nats_servers)
    return {k: v.replace(" ", "") for k, v in urls.items()}


def _check_ports(settings: Settings) -> None:
    from provisioning.platform.supervisor import check_port

    for name, host, port in _ports(settings):
        check_port(host, port, name)


@app.command()
def start(
    ctx: typer.Context,
    host: Host = None,
    port: Port = None,
    background: Annotated[
        bool,
        typer.Option("--background", "-d", help="Detach, write the pid file, return when healthy."),
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Run the platform in the foreground until Ctrl-C / SIGTERM: the control center, the
    orchestrator, the ops-keeper, ops-controller and audit-mirror, and a supervised nats-server
    (unless nats.url names one).

    Every port is checked first: a busy one is an error naming its setting and the process
    holding it, and nothing starts. A service that crashes is logged and restarted with
    backoff; the others keep serving.

    State lives in the data dir (PRVNG_HOME, default ~/.local/share/provisioning): SQLite store,
    task logs, JetStream store, pid file. Running tasks survive a restart: they are recovered on
    the next start.
    """
    st = _state(ctx, data_dir)
    settings = st.settings(**_overrides(host, port))
    if PidFile(settings.run_dir).read() is None:
        # Every port before anything starts (in --background mode: a usage error here rather
        # than a failed child's log tail). A running platform is reported by what follows.
        _check_ports(settings)
    if background:
        _start_background(settings, host, port)
        return
    # Imported here: the server stack is heavy and every other command must start fast.
    from provisioning.core.logging import configure_logging
    from provisioning.platform.embedded import build_platform
    from provisioning.platform.supervisor import run_services

    configure_logging(settings.log.level, settings.log.format)
    pidfile = PidFile(settings.run_dir)
    urls = _service_urls(settings)
    pidfile.claim(urls["orchestrator"], urls["control-center"], urls["ops-keeper"], services=urls)
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
    console.print(f"  {'web UI':<14} {settings.control_center_url}/ui/")
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
    url = service_url(settings.orchestrator.host, settings.orchestrator.port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            raise OperationFailed("the platform did not start:\n" + "\n".join(tail))
        if pidfile.read() == proc.pid and _healthy(url):
            console.print(f"platform started in the background (pid {proc.pid})")
            console.print(f"  orchestrator    {url}")
            console.print(f"  control center  {settings.control_center_url}")
            console.print(f"  web UI          {settings.control_center_url}/ui/")
            for name, sec in (
                ("ops-keeper", settings.ops_keeper),
                ("ops-controller", settings.ops_controller),
                ("audit-mirror", settings.audit_mirror),
            ):
                console.print(f"  {name:<15} {service_url(sec.host, sec.port)}")
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
    data_dir: DataDir = None,
) -> None:
    """Stop a platform started on this data dir (SIGTERM, then SIGKILL after --timeout).

    Running task attempts are not killed: the next start recovers them.
    """
    settings = _state(ctx, data_dir).settings()
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
def status(ctx: typer.Context, data_dir: DataDir = None) -> None:
    """Show whether the platform runs, and each service's health, version, uptime and address.

    The addresses are those the running platform recorded in its pid file (else the settings).
    Exit code 3 when it is not running or a service is not healthy.
    """
    st = _state(ctx, data_dir)
    settings = st.settings()
    pidfile = PidFile(settings.run_dir)
    pid = pidfile.read()
    urls = pidfile.services() or _service_urls(settings)
    # --url / --cc-url / ops_keeper.url win over what was recorded, as for every command.
    urls["orchestrator"] = st.orchestrator_url()
    urls["control-center"] = st.cc_url()
    urls["ops-keeper"] = st.keeper_url()

    async def probe(service: str, base: str) -> dict[str, Any]:
        row: dict[str, Any] = {
            "service": service,
            "url": base,
            "pid": pid,
            "version": None,
            "uptime_s": None,
        }
        if service == "nats":
            return {**row, **await _probe_nats(base)}
        async with ControlCenterClient(base, timeout=3) as c:
            try:
                h = await c.get("/health")
            except ProvisioningError as exc:
                return {**row, "status": "down", "error": exc.message}
        return {
            **row,
            "status": h.get("status", "ok"),
            "version": h.get("version"),
            "uptime_s": h.get("uptime_s"),
        }

    async def probe_all() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(probe(name, url) for name, url in urls.items())))

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


async def _probe_nats(urls: str) -> dict[str, Any]:
    """nats-server has no HTTP health here: ok when one of its URLs accepts a connection."""
    from urllib.parse import urlsplit

    for url in urls.split(","):
        parts = urlsplit(url.strip())
        try:
            _r, w = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222), 3
            )
        except (OSError, TimeoutError):
            continue
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
        return {"status": "ok"}
    return {"status": "down", "error": f"no NATS server accepts connections at {urls}"}
