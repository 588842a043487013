"""`prvng system status`: the platform's health as the control center sees it
(``GET /system/status``, docs/reference/monitoring.md)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from provisioning.cli.output import OutputFormat, console, render
from provisioning.cli.state import run, state_of
from provisioning.core.errors import OperationFailed, Unauthorized

__all__ = ["app"]

app = typer.Typer(
    help="Platform health: services, NATS, stores, host, orchestrator (needs system:read).",
    no_args_is_help=True,
)

_LEVELS = {"ok": 0, "degraded": 1, "down": 2}


class FailOn(StrEnum):
    DEGRADED = "degraded"
    DOWN = "down"
    NEVER = "never"


@app.command()
def status(
    ctx: typer.Context,
    fail_on: Annotated[
        FailOn,
        typer.Option(
            "--fail-on",
            help="Exit 1 when the platform is at least this bad: degraded, down, or never.",
        ),
    ] = FailOn.DEGRADED,
) -> None:
    """Show each service's health, NATS streams and consumer lag, the state store, the host's
    load, the orchestrator's queue and the recent failed workflows you may see.

    Exit code: 0 when the platform is ok; 1 when it is degraded or down (after printing
    everything; see --fail-on); 3 when the control center is not reachable or refuses you.
    With --output json the document is the API's `data`, unchanged.
    """
    st = state_of(ctx)

    async def go() -> dict[str, Any]:
        token = await st.credentials().bearer_async()
        if token is None:
            raise Unauthorized("not logged in: run `prvng login` (or set PRVNG_API_KEY)")
        async with st.cc_client(token) as c:
            return await c.system_status()

    doc = run(go())
    if st.output is OutputFormat.TABLE:
        _print(doc)
    else:
        render(doc, st.output)
    level = str(doc.get("status", "down"))
    if fail_on is not FailOn.NEVER and _LEVELS.get(level, 2) >= _LEVELS[fail_on.value]:
        raise OperationFailed(
            f"the platform is {level}: " + "; ".join(doc.get("reasons") or ["no reason given"])
        )


def _print(doc: dict[str, Any]) -> None:
    level = str(doc.get("status", "?"))
    colour = {"ok": "green", "degraded": "yellow"}.get(level, "red")
    console.print(
        f"platform [bold {colour}]{level.upper()}[/]  (checked {str(doc['checked_at'])[:19]}Z "
        f"in {doc['took_ms']:.0f} ms)"
    )
    for reason in doc.get("reasons") or []:
        console.print(f"  - {reason}", markup=False, highlight=False)
    services = [
        {
            **s,
            "status": s["status"] if s["expected"] else f"{s['status']} (optional)",
            "uptime": _duration(s["uptime_s"]),
        }
        for s in doc["services"]
    ]
    render(
        services,
        OutputFormat.TABLE,
        title="services",
        columns=[
            ("name", "SERVICE"),
            ("status", "STATUS"),
            ("version", "VERSION"),
            ("uptime", "UPTIME"),
            ("latency_ms", "LATENCY (ms)"),
            ("url", "URL"),
            ("error", "ERROR"),
        ],
    )
    _print_nats(doc["nats"])
    store = doc["stores"]["state"]
    console.print(
        f"state store: {store['kind']} {store['target']} — {store['status']}"
        + (f" in {store['latency_ms']} ms" if store["latency_ms"] is not None else "")
        + (f" ({store['error']})" if store["error"] else ""),
        markup=False,
        highlight=False,
    )
    _print_host(doc["host"])
    _print_orchestrator(doc["orchestrator"])


def _print_nats(nats: dict[str, Any]) -> None:
    where = nats["connected_url"] or ", ".join(nats["servers"]) or "-"
    line = f"NATS: {nats['status']} ({where})"
    console.print(line + (f": {nats['error']}" if nats["error"] else ""), markup=False)
    if nats["streams"]:
        streams = [{**s, "size": _bytes(s["bytes"])} for s in nats["streams"]]
        render(
            streams,
            OutputFormat.TABLE,
            title="streams",
            columns=[
                ("name", "STREAM"),
                ("messages", "MESSAGES"),
                ("size", "SIZE"),
                ("last_seq", "LAST SEQ"),
                ("consumers", "CONSUMERS"),
            ],
        )
    if nats["consumers"]:
        render(
            nats["consumers"],
            OutputFormat.TABLE,
            title="durable consumers",
            columns=[
                ("stream", "STREAM"),
                ("durable", "CONSUMER"),
                ("num_pending", "LAG"),
                ("num_ack_pending", "UNACKED"),
                ("num_redelivered", "REDELIVERED"),
            ],
        )


def _print_host(host: dict[str, Any]) -> None:
    if "memory" not in host:
        console.print(f"host: {host.get('error', 'unknown')}", markup=False)
        return
    mem, disk = host["memory"], host["disk"]
    load = " ".join(f"{x:g}" for x in host["load_average"])
    console.print(
        f"host: cpu {host['cpu_percent']:.0f}% of {host['cpu_count']}, load {load}, "
        f"memory {_bytes(mem['used'])}/{_bytes(mem['total'])} ({mem['percent']:.0f}%), "
        f"disk {_bytes(disk['used'])}/{_bytes(disk['total'])} ({disk['percent']:.0f}%) "
        f"at {disk['path']}",
        markup=False,
        highlight=False,
    )


def _print_orchestrator(orch: dict[str, Any]) -> None:
    if orch["error"]:
        console.print(f"orchestrator: {orch['error']}", markup=False, highlight=False)
    else:
        states = ", ".join(f"{k} {v}" for k, v in sorted(orch["workflows_by_state"].items()))
        console.print(
            f"orchestrator: {orch['queue_depth']} ready, {orch['running_tasks']} running; "
            f"workflows: {states or 'none'}",
            markup=False,
            highlight=False,
        )
    if orch["recent_failures_error"]:
        console.print(f"recent failures: {orch['recent_failures_error']}", markup=False)
        return
    render(
        orch["recent_failures"],
        OutputFormat.TABLE,
        title="recent failures",
        columns=[
            ("id", "ID"),
            ("name", "NAME"),
            ("status", "STATUS"),
            ("finished_at", "FINISHED"),
            ("error", "ERROR"),
        ],
    )


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
