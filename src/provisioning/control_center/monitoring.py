"""Monitoring of the platform: the document of ``GET /system/status`` and the live events of
``GET /system/events`` (shape and rules: docs/reference/monitoring.md).

One *sample* is shared by every caller: each service's health (``GET /health`` over HTTP, all
at once, each within ``probe_timeout_s``), NATS (connection, streams, durable consumers through
the control center's bus), the state store (``SELECT 1``), the host (psutil) and the
orchestrator's counts (its open ``/metrics``). A sample younger than ``max_age_s`` is reused and
concurrent callers share the one being taken, so the document costs the same for one caller or
fifty, and is never later than about ``probe_timeout_s``. Only the recent failures belong to the
caller: they are asked of the orchestrator with the caller's own credentials, so everyone sees
exactly the workflows the orchestrator would show them.

Level: ``down`` when the state store or the orchestrator does not answer (nothing can run);
``degraded`` when an expected service is down, NATS is configured but not connected or not
answering, a durable consumer lags by :data:`LAG_DEGRADED` messages or more, or the data dir's
filesystem is :data:`DISK_DEGRADED` % full; ``ok`` otherwise. ``reasons`` names each finding.

Events: a change of a service's state (``service``) is found by every sample and kept in an
:class:`~provisioning.core.sse.EventRing`; while at least one live stream is open, a watcher
takes a sample at least every ``watch_interval_s``. A new failed workflow (``failure``) is found
by the live streams, each comparing its caller's recent failures with what it saw before, and
kept in the same ring, marked with the workflow's owner: a stream forwards it only when its
caller may read that workflow.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError

from provisioning.core.bus import Bus
from provisioning.core.bus.link import bus_connected
from provisioning.core.errors import ProvisioningError, Unreachable
from provisioning.core.logging import get_logger
from provisioning.core.settings import Settings, service_url
from provisioning.core.sse import EventRing, RingEvent, Subscription, comment, format_event
from provisioning.core.store import Database

__all__ = ["DISK_DEGRADED", "LAG_DEGRADED", "StreamOptions", "SystemMonitor", "Target"]

log = get_logger("monitoring")

LAG_DEGRADED = 1000  # messages a durable consumer may lag before the platform is degraded
DISK_DEGRADED = 95.0  # % used of the data dir's filesystem
FAILED_STATES = ("Failed", "RolledBack")  # a workflow whose task failed ends in one of these


@dataclass(frozen=True)
class Target:
    """A service to probe; ``expected``: its being down degrades the platform."""

    name: str
    url: str
    expected: bool = True


@dataclass
class StreamOptions:
    """What a live stream needs from its request (see :meth:`SystemMonitor.events`)."""

    credentials: Mapping[str, str]  # forwarded to the orchestrator for the recent failures
    interval_s: float = 5.0
    last_event_id: str | None = None
    follow: bool = True  # False: what was missed and one status, then the stream ends
    may_see: Callable[[RingEvent], bool] = lambda _ev: True
    still_allowed: Callable[[], Awaitable[None]] | None = None  # raises when no longer
    disconnected: Callable[[], Awaitable[bool]] | None = None


@dataclass
class _Cursor:
    last: int  # ring seq this stream has dealt with
    baseline: set[str] = field(default_factory=set)  # failures already in its first status
    known: set[str] = field(default_factory=set)  # failures it has seen


class SystemMonitor:
    """Samples the platform and streams its changes (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database,
        bus: Bus | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        probe_timeout_s: float = 1.0,
        failures_limit: int = 10,
        ring_size: int = 256,
        max_streams: int = 32,
        queue_size: int = 64,
        watch_interval_s: float = 2.0,
        heartbeat_s: float = 15.0,
    ) -> None:
        self.settings, self.db, self.bus, self.transport = settings, db, bus, transport
        self.probe_timeout_s = probe_timeout_s
        self.failures_limit = failures_limit
        self.watch_interval_s, self.heartbeat_s = watch_interval_s, heartbeat_s
        self.ring = EventRing(ring_size, max_subscribers=max_streams, queue_size=queue_size)
        self._last: tuple[float, dict[str, Any]] | None = None
        self._inflight: asyncio.Task[dict[str, Any]] | None = None
        self._states: dict[str, str] = {}
        self._failures_seen: OrderedDict[str, None] = OrderedDict()
        self._intervals: dict[Subscription, float] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._secrets = _secrets_of(settings)
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement

    # ------------------------------------------------------------------ the document

    def targets(self) -> list[Target]:
        """The services to probe. The ops services live on NATS: without a bus they are
        probed but not expected."""
        s, ops = self.settings, self.bus is not None
        keeper = s.ops_keeper.url.rstrip("/") or _http(s.ops_keeper.host, s.ops_keeper.port)
        return [
            Target("control-center", s.control_center_url),
            Target("orchestrator", s.orchestrator_url),
            Target("ops-keeper", keeper, ops),
            Target("ops-controller", _http(s.ops_controller.host, s.ops_controller.port), ops),
            Target("audit-mirror", _http(s.audit_mirror.host, s.audit_mirror.port), ops),
        ]

    async def status(
        self, credentials: Mapping[str, str], *, max_age_s: float = 1.0
    ) -> dict[str, Any]:
        """The whole document, with the recent failures ``credentials`` may see."""
        shared, (failures, error) = await asyncio.gather(
            self.sample(max_age_s), self.failures(credentials)
        )
        orch = {**shared["orchestrator"], "recent_failures": failures}
        orch["recent_failures_error"] = error
        return {**shared, "orchestrator": orch}

    async def sample(self, max_age_s: float = 1.0) -> dict[str, Any]:
        """The shared part of the document, taken now or reused (see the module docstring)."""
        if self._last is not None and time.monotonic() - self._last[0] <= max_age_s:
            return self._last[1]
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._take(), name="system-monitor-sample")
        return await asyncio.shield(self._inflight)

    async def _take(self) -> dict[str, Any]:
        started = time.perf_counter()
        checked_at = datetime.now(UTC).isoformat()
        async with httpx.AsyncClient(
            transport=self.transport, timeout=self.probe_timeout_s, trust_env=False
        ) as client:
            services, nats, store, host, orch = await asyncio.gather(
                asyncio.gather(*(self._probe(client, t) for t in self.targets())),
                self._nats(),
                self._store(),
                self._host(),
                self._orchestrator(client),
            )
        doc: dict[str, Any] = {
            "status": "ok",
            "reasons": [],
            "checked_at": checked_at,
            "took_ms": _ms(started),
            "services": list(services),
            "nats": nats,
            "stores": {"state": store},
            "host": host,
            "orchestrator": orch,
        }
        doc["status"], doc["reasons"] = assess(doc)
        self._transitions(doc["services"], checked_at)
        self._last = (time.monotonic(), doc)
        return doc

    async def _probe(self, client: httpx.AsyncClient, target: Target) -> dict[str, Any]:
        row: dict[str, Any] = {
            "name": target.name,
            "url": _safe_url(target.url),
            "expected": target.expected,
            "status": "down",
            "version": None,
            "uptime_s": None,
            "latency_ms": None,
            "error": None,
        }
        started = time.perf_counter()
        try:
            resp = await asyncio.wait_for(client.get(f"{target.url}/health"), self.probe_timeout_s)
            row["latency_ms"] = _ms(started)
            body = resp.json() if resp.is_success else None
        except TimeoutError:
            row["error"] = f"no answer within {self.probe_timeout_s:g} s"
            return row
        except (httpx.HTTPError, ValueError) as exc:
            row["error"] = self._describe(exc)
            return row
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or data.get("status") != "ok":
            row["error"] = f"/health answered HTTP {resp.status_code} without status ok"
            return row
        row.update(status="up", version=data.get("version"), uptime_s=data.get("uptime_s"))
        return row

    async def _nats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": "not configured",
            "servers": [],
            "connected_url": None,
            "streams": [],
            "consumers": [],
            "error": None,
        }
        if self.bus is None:
            return out
        target = getattr(self.bus, "bus", self.bus)  # a BusLink holds the bus once connected
        nc = getattr(target, "nc", None)
        connected = bus_connected(self.bus)
        servers = getattr(target, "servers", None) or self.settings.nats_servers
        url = getattr(nc, "connected_url", None) if connected else None
        out.update(
            status="connected" if connected else "disconnected",
            servers=[_safe_url(str(u)) for u in servers],
            connected_url=_safe_url(url.geturl()) if url is not None else None,
        )
        if not connected:
            return out
        try:
            streams, consumers = await asyncio.wait_for(
                asyncio.gather(self.bus.stream_info(), self.bus.consumer_info()),
                self.probe_timeout_s,
            )
        except TimeoutError:
            out["error"] = f"no answer within {self.probe_timeout_s:g} s"
            return out
        except ProvisioningError as exc:
            out["error"] = self._describe(exc)
            return out
        out["streams"] = [{**asdict(s), "subjects": list(s.subjects)} for s in streams]
        out["consumers"] = [asdict(c) for c in consumers]
        return out

    async def _store(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.db.dialect,
            "target": _db_target(self.settings.state_url),
            "status": "down",
            "latency_ms": None,
            "error": None,
        }
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self.db.run_read(_ping), self.probe_timeout_s)
        except TimeoutError:
            out["error"] = f"no answer within {self.probe_timeout_s:g} s"
        except (SQLAlchemyError, OSError, ProvisioningError) as exc:
            out["error"] = self._describe(exc)
        else:
            out.update(status="up", latency_ms=_ms(started))
        return out

    async def _host(self) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(_host_now, self.settings.home), self.probe_timeout_s
            )
        except TimeoutError:
            return {"error": f"no answer within {self.probe_timeout_s:g} s"}
        except (OSError, psutil.Error) as exc:
            return {"error": self._describe(exc)}

    async def _orchestrator(self, client: httpx.AsyncClient) -> dict[str, Any]:
        out: dict[str, Any] = {
            "queue_depth": None,
            "running_tasks": None,
            "tasks_by_state": {},
            "workflows_by_state": {},
            "scheduler_errors": None,
            "error": None,
        }
        url = f"{self.settings.orchestrator_url}/metrics"
        try:
            resp = await asyncio.wait_for(client.get(url), self.probe_timeout_s)
            resp.raise_for_status()
            families = list(text_string_to_metric_families(resp.text))
        except TimeoutError:
            out["error"] = f"no answer within {self.probe_timeout_s:g} s"
            return out
        except (httpx.HTTPError, ValueError) as exc:
            out["error"] = self._describe(exc)
            return out
        for family in families:
            for s in family.samples:
                if s.name == "prvng_queue_depth":
                    out["queue_depth"] = int(s.value)
                elif s.name == "prvng_scheduler_errors":
                    out["scheduler_errors"] = int(s.value)
                elif s.name == "prvng_tasks" and "status" in s.labels:
                    out["tasks_by_state"][s.labels["status"]] = int(s.value)
                elif s.name == "prvng_workflows" and "status" in s.labels:
                    out["workflows_by_state"][s.labels["status"]] = int(s.value)
        out["running_tasks"] = out["tasks_by_state"].get("Running", 0)
        return out

    async def failures(
        self, credentials: Mapping[str, str]
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The newest failed workflows the credentials may see, or why there are none."""
        if not credentials:
            return [], "no credentials to ask the orchestrator with"
        async with httpx.AsyncClient(
            base_url=self.settings.orchestrator_url,
            headers=dict(credentials),
            transport=self.transport,
            timeout=self.probe_timeout_s,
            trust_env=False,
        ) as client:
            try:
                pages = await asyncio.wait_for(
                    asyncio.gather(
                        *(
                            client.get(
                                "/workflows", params={"status": s, "limit": self.failures_limit}
                            )
                            for s in FAILED_STATES
                        )
                    ),
                    self.probe_timeout_s,
                )
            except TimeoutError:
                return [], f"the orchestrator did not answer within {self.probe_timeout_s:g} s"
            except httpx.HTTPError as exc:
                return [], self._describe(exc)
        rows: list[dict[str, Any]] = []
        for resp in pages:
            try:
                doc = resp.json()
            except ValueError:
                return [], f"the orchestrator answered HTTP {resp.status_code}"
            data = doc.get("data") if isinstance(doc, dict) else None
            if not resp.is_success or not isinstance(data, list):
                error = doc.get("error") if isinstance(doc, dict) else None
                message = error.get("message", "") if isinstance(error, dict) else ""
                return [], f"the orchestrator answered HTTP {resp.status_code}: {message}"[:300]
            rows.extend(w for w in data if isinstance(w, dict) and w.get("id"))
        rows.sort(key=lambda w: str(w.get("finished_at") or w.get("updated_at") or ""))
        return [_failure(w) for w in reversed(rows[-self.failures_limit :])], None

    def _describe(self, exc: BaseException) -> str:
        message = exc.message if isinstance(exc, ProvisioningError) else str(exc)
        text_ = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        for secret in self._secrets:
            text_ = text_.replace(secret, "***")
        return text_[:300]

    # ------------------------------------------------------------------ events

    def _transitions(self, services: list[dict[str, Any]], at: str) -> None:
        for s in services:
            before = self._states.get(s["name"])
            self._states[s["name"]] = s["status"]
            if before is None or before == s["status"]:
                continue
            if s["status"] != "up":
                log.warning("service down", extra={"service": s["name"], "error": s["error"]})
            data = {
                "service": s["name"],
                "status": s["status"],
                "previous": before,
                "error": s["error"],
                "url": s["url"],
                "at": at,
            }
            self.ring.publish("service", data)

    def _publish_failure(self, workflow: dict[str, Any]) -> None:
        wf_id = str(workflow["id"])
        if wf_id in self._failures_seen:
            return
        self._failures_seen[wf_id] = None
        while len(self._failures_seen) > 4 * self.ring.size:
            self._failures_seen.popitem(last=False)
        scope = {"workflow_id": wf_id, "owner": workflow.get("owner")}
        self.ring.publish("failure", {"workflow": workflow}, scope)

    async def events(self, opts: StreamOptions) -> AsyncIterator[str]:
        """The event stream: what was missed since ``opts.last_event_id`` (or, when that is no
        longer known, nothing), a ``status`` at once and every ``interval_s``, ``service`` and
        ``failure`` events as they happen, ``: ping`` after ``heartbeat_s`` of silence. Ends
        when the client disconnects or its credentials no longer allow it (``end``)."""
        sub: Subscription | None = None
        if opts.follow:
            try:
                sub = self.ring.subscribe()
            except Unreachable as exc:
                yield format_event({"reason": exc.message}, event="end")
                return
            self._intervals[sub] = opts.interval_s
            if self._watcher is None or self._watcher.done():
                self._watcher = asyncio.create_task(self._watch(), name="system-monitor-watch")
        try:
            async for chunk in self._stream(opts, sub):
                yield chunk
        finally:
            if sub is not None:
                self.ring.unsubscribe(sub)
                self._intervals.pop(sub, None)
                if not self._intervals and self._watcher is not None:
                    self._watcher.cancel()
                    self._watcher = None

    async def _watch(self) -> None:
        while self._intervals:
            period = min(self.watch_interval_s, *self._intervals.values())
            try:
                await self.sample(max_age_s=period / 2)
            except Exception:  # the top of a task: keep watching
                log.exception("monitoring sample failed")
            await asyncio.sleep(period)

    async def _stream(self, opts: StreamOptions, sub: Subscription | None) -> AsyncIterator[str]:
        resume = self.ring.parse_id(opts.last_event_id)
        missed = self.ring.since(resume) if resume is not None else None
        cur = _Cursor(last=resume if missed is not None and resume is not None else self.ring.head)
        for ev in missed or []:
            if chunk := self._deliver(ev, cur, opts):
                yield chunk
        doc = await self.status(opts.credentials, max_age_s=min(1.0, opts.interval_s))
        cur.known = {f["id"] for f in doc["orchestrator"]["recent_failures"]}
        cur.baseline = set(cur.known)
        for chunk in self._flush(sub, cur, opts, doc):
            yield chunk
        if sub is None:
            return
        loop = asyncio.get_running_loop()
        next_status = last_sent = loop.time()
        next_status += opts.interval_s
        while True:
            if opts.disconnected is not None and await opts.disconnected():
                return
            now = loop.time()
            if sub.overflowed or now >= next_status:
                if opts.still_allowed is not None:
                    try:
                        await opts.still_allowed()
                    except ProvisioningError as exc:
                        yield format_event({"reason": exc.message}, event="end")
                        return
                if sub.overflowed:  # too slow a reader: start again from a fresh status
                    sub.drain()
                    sub.overflowed, cur.last = False, self.ring.head
                doc = await self.status(opts.credentials, max_age_s=min(1.0, opts.interval_s))
                for f in doc["orchestrator"]["recent_failures"]:
                    if f["id"] not in cur.known:
                        cur.known.add(f["id"])
                        self._publish_failure(f)
                for chunk in self._flush(sub, cur, opts, doc):
                    yield chunk
                last_sent, next_status = loop.time(), loop.time() + opts.interval_s
                continue
            wait = min(next_status, last_sent + self.heartbeat_s, now + 1.0) - now
            try:
                ev = await asyncio.wait_for(sub.queue.get(), max(wait, 0.01))
            except TimeoutError:
                if loop.time() - last_sent >= self.heartbeat_s:
                    last_sent = loop.time()
                    yield comment("ping")
                continue
            if chunk := self._deliver(ev, cur, opts):
                last_sent = loop.time()
                yield chunk

    def _flush(
        self, sub: Subscription | None, cur: _Cursor, opts: StreamOptions, doc: dict[str, Any]
    ) -> list[str]:
        """The queued events, then the status (its id: the last event dealt with)."""
        chunks = [c for ev in (sub.drain() if sub else []) if (c := self._deliver(ev, cur, opts))]
        chunks.append(format_event(doc, event="status", id=self.ring.id_of(cur.last)))
        return chunks

    def _deliver(self, ev: RingEvent, cur: _Cursor, opts: StreamOptions) -> str | None:
        if ev.seq <= cur.last:
            return None
        cur.last = ev.seq
        if not opts.may_see(ev):
            return None
        if ev.event == "failure":
            wf_id = str((ev.scope or {}).get("workflow_id"))
            cur.known.add(wf_id)
            if wf_id in cur.baseline:
                return None
        return format_event(ev.data, event=ev.event, id=self.ring.id_of(ev.seq))


def assess(doc: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The level of a document and the reasons for it (see the module docstring)."""
    reasons: list[str] = []
    down = False
    up = {s["name"] for s in doc["services"] if s["status"] == "up"}
    for s in doc["services"]:
        if s["status"] != "up" and s["expected"]:
            reasons.append(f"{s['name']} is down: {s['error']} ({s['url']})")
            down = down or s["name"] == "orchestrator"
    store = doc["stores"]["state"]
    if store["status"] != "up":
        reasons.append(f"the state store ({store['kind']}) does not answer: {store['error']}")
        down = True
    nats = doc["nats"]
    if nats["status"] == "disconnected":
        reasons.append(f"NATS is not connected ({', '.join(nats['servers'])})")
    elif nats["error"]:
        reasons.append(f"NATS does not answer: {nats['error']}")
    for c in nats["consumers"]:
        if c["num_pending"] >= LAG_DEGRADED:
            reasons.append(
                f"consumer {c['durable']} of {c['stream']} is {c['num_pending']} messages behind"
            )
    orch = doc["orchestrator"]
    if orch["error"] and "orchestrator" in up:
        reasons.append(f"the orchestrator's metrics are unavailable: {orch['error']}")
    disk = doc["host"].get("disk")
    if disk and disk["percent"] >= DISK_DEGRADED:
        reasons.append(f"the data dir's filesystem is {disk['percent']:.0f} % full")
    return ("down" if down else "degraded" if reasons else "ok"), reasons


def _ping(conn: Connection) -> None:
    conn.execute(text("SELECT 1")).scalar_one()


def _host_now(home: Path) -> dict[str, Any]:
    path = home
    while not path.exists() and path != path.parent:
        path = path.parent
    mem, disk = psutil.virtual_memory(), psutil.disk_usage(str(path))
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": psutil.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "memory": {"used": mem.total - mem.available, "total": mem.total, "percent": mem.percent},
        "disk": {
            "path": str(path),
            "used": disk.used,
            "total": disk.total,
            "percent": disk.percent,
        },
    }


def _failure(w: Mapping[str, Any]) -> dict[str, Any]:
    error = w.get("error")
    return {
        "id": w.get("id"),
        "name": w.get("name"),
        "kind": w.get("kind"),
        "status": w.get("status"),
        "owner": w.get("owner"),
        "error": str(error)[:500] if error else None,
        "finished_at": w.get("finished_at") or w.get("updated_at"),
    }


def _http(host: str, port: int) -> str:
    return service_url(host, port)


def _safe_url(url: str) -> str:
    """The URL without credentials, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _db_target(url: str) -> str:
    """What a store URL names, without user, password or options."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return u.database or ":memory:"
    return f"{u.host or 'localhost'}:{u.port or 5432}/{u.database or ''}"


def _secrets_of(settings: Settings) -> list[str]:
    """Passwords in configured URLs, scrubbed from any error text that might repeat them."""
    found = []
    for url in (settings.state.url, *settings.nats_servers):
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            found.append(password)
    return found


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
