"""Compile a workspace request into a workflow (a DAG of ``prvng extension run`` tasks).

Per server: ``create`` (rollback: ``delete``) → ``ready`` (the provider's ``status`` until the
server runs) → its task services in dependency order (each ``install``, rollback ``remove``;
what a task service ``requires`` is installed first even when the server does not list it). A
cluster adds its members' servers and the task services it requires, then its own ``create``
(rollback ``delete``). A batch turns each operation into such a sub-DAG, its tasks named
``<operation id>/<task>``, and an operation's ``depends_on`` makes all its tasks wait for every
task of the operations it names.

Every task is a command the orchestrator runs like any other, so its logs, retries and rollback
are the orchestrator's. :func:`describe` turns a compiled workflow into the plan shown by
``--check`` (what each task would do), changing nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioning.core.errors import NotFound, ValidationError
from provisioning.workspace.extensions import Catalog
from provisioning.workspace.model import Infra, Workspace

__all__ = ["Planner", "describe", "taskserv_order"]

_RETRY = {"max_attempts": 2, "backoff": "fixed", "initial_delay_s": 2, "max_delay_s": 2}


def taskserv_order(cat: Catalog, names: Sequence[str]) -> list[str]:
    """``names`` and everything they require, each after what it requires (stable: in the
    order given where dependencies allow).

    Raises:
        NotFound: a task service no layer has (named, with who requires it).
        ValidationError: a dependency cycle, named in order (``a -> b -> a``).
    """
    order: list[str] = []
    state: dict[str, str] = {}  # visiting | done

    def visit(name: str, path: list[str], wanted_by: str | None) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = [*path[path.index(name) :], name]
            raise ValidationError(
                f"task service dependency cycle: {' -> '.join(cycle)}", cycle=cycle
            )
        ext = cat.found.get(("taskserv", name))
        if ext is None:
            by = f" (required by {wanted_by})" if wanted_by else ""
            known = ", ".join(sorted(n for (k, n) in cat.found if k == "taskserv")) or "none"
            raise NotFound(f"no task service {name!r}{by}; known: {known}")
        state[name] = "visiting"
        for dep in ext.requires:
            visit(dep, [*path, name], name)
        state[name] = "done"
        order.append(name)

    for n in names:
        visit(n, [], None)
    return order


@dataclass
class _Dag:
    tasks: list[dict[str, Any]] = field(default_factory=list)
    does: dict[str, str] = field(default_factory=dict)

    def add(self, task: dict[str, Any], does: str) -> str:
        if any(t["name"] == task["name"] for t in self.tasks):
            return str(task["name"])  # the same step reached twice (a shared server)
        self.tasks.append(task)
        self.does[task["name"]] = does
        return str(task["name"])


class Planner:
    """Compiles requests of one workspace and infra."""

    def __init__(self, ws: Workspace, infra: str, *, prvng: Sequence[str] | None = None) -> None:
        self.ws = ws
        self.infra: Infra = ws.infra(infra)
        self.cat = ws.catalog(infra)
        self.prvng = list(prvng or [sys.executable, "-m", "provisioning.cli.main"])

    # ------------------------------------------------------------------ building blocks

    def _cmd(self, ref: str, operation: str, target: str) -> list[str]:
        return [
            *self.prvng,
            "extension",
            "run",
            ref,
            operation,
            "--workspace",
            str(self.ws.path),
            "--infra",
            self.infra.name,
            "--target",
            target,
        ]

    def _ext(self, kind: str, name: str) -> Any:
        ext = self.cat.found.get((kind, name))
        if ext is None:
            known = ", ".join(sorted(n for (k, n) in self.cat.found if k == kind)) or "none"
            raise NotFound(f"no {kind} {name!r} in any layer; known: {known}")
        return ext

    def _servers(self, names: Sequence[str] | None) -> list[dict[str, Any]]:
        if not names:
            return self.infra.servers
        return [self.infra.server(n) for n in names]

    def _server_steps(
        self, dag: _Dag, server: dict[str, Any], taskservs: Sequence[str], prefix: str, **kw: Any
    ) -> dict[str, str]:
        """create → ready → task services; answers task service name → its install task
        (and ``""`` → the ready task)."""
        host, provider = server["hostname"], server["provider"]
        ref = f"providers/{provider}"
        self._ext("provider", provider)
        key = f"provider:{provider}"
        create = dag.add(
            {
                "name": f"{prefix}create:{host}",
                "command": self._cmd(ref, "create", host),
                "rollback": self._cmd(ref, "delete", host),
                "concurrency_key": key,
                "retry": _RETRY,
                "timeout_s": 300,
                **kw,
            },
            f"create server {host} with provider {provider}",
        )
        ready = dag.add(
            {
                "name": f"{prefix}ready:{host}",
                "command": [*self._cmd(ref, "status", host), "--wait-running", "120"],
                "depends_on": [create],
                "timeout_s": 180,
                **kw,
            },
            f"wait until {host} runs",
        )
        steps = {"": ready}
        for ts in taskserv_order(self.cat, taskservs):
            ext = self._ext("taskserv", ts)
            deps = [ready, *(steps[r] for r in ext.requires)]
            steps[ts] = dag.add(
                {
                    "name": f"{prefix}install:{ts}@{host}",
                    "command": self._cmd(f"taskservs/{ts}", "install", host),
                    "rollback": self._cmd(f"taskservs/{ts}", "remove", host),
                    "depends_on": deps,
                    "retry": _RETRY,
                    "timeout_s": ext.timeout_s,
                    **kw,
                },
                f"install task service {ts} {ext.version} on {host}",
            )
        return steps

    def _spec(self, kind: str, name: str, dag: _Dag, **extra: Any) -> dict[str, Any]:
        if not dag.tasks:
            raise ValidationError(f"nothing to do: {name} has no tasks")
        return {
            "name": name,
            "kind": kind,
            "labels": {"workspace": self.ws.name, "infra": self.infra.name},
            "tasks": dag.tasks,
            **extra,
            "_does": dag.does,
        }

    # ------------------------------------------------------------------ requests

    def servers_create(self, servers: Sequence[str] | None = None) -> dict[str, Any]:
        dag = _Dag()
        self._servers_create(dag, servers, "")
        return self._spec("servers.create", f"servers.create {self.infra.name}", dag)

    def _servers_create(
        self, dag: _Dag, servers: Sequence[str] | None, prefix: str, **kw: Any
    ) -> None:
        for s in self._servers(servers):
            self._server_steps(dag, s, [t["name"] for t in s["taskservs"]], prefix, **kw)

    def servers_delete(self, servers: Sequence[str] | None = None) -> dict[str, Any]:
        dag = _Dag()
        self._servers_delete(dag, servers, "")
        return self._spec("servers.delete", f"servers.delete {self.infra.name}", dag)

    def _servers_delete(
        self, dag: _Dag, servers: Sequence[str] | None, prefix: str, **kw: Any
    ) -> None:
        for s in self._servers(servers):
            host, provider = s["hostname"], s["provider"]
            self._ext("provider", provider)
            # Task services go first, dependants before what they require: a provider that only
            # forgets a host (ssh) must not leave them running. A server the inventory does
            # not know answers these at once (extension run skips them).
            removes: list[str] = []
            for ts in reversed(taskserv_order(self.cat, [t["name"] for t in s["taskservs"]])):
                ext = self._ext("taskserv", ts)
                removes.append(
                    dag.add(
                        {
                            "name": f"{prefix}remove:{ts}@{host}",
                            "command": self._cmd(f"taskservs/{ts}", "remove", host),
                            "depends_on": removes[-1:],
                            "retry": _RETRY,
                            "timeout_s": ext.timeout_s,
                            "on_failure": "continue",
                            **kw,
                        },
                        f"remove task service {ts} from {host}",
                    )
                )
            dag.add(
                {
                    "name": f"{prefix}delete:{host}",
                    "command": self._cmd(f"providers/{provider}", "delete", host),
                    "depends_on": [{"task": r, "kind": "soft"} for r in removes[-1:]],
                    "concurrency_key": f"provider:{provider}",
                    "retry": _RETRY,
                    "on_failure": "continue",
                    **kw,
                },
                f"delete server {host} (provider {provider}) and everything on it",
            )

    def taskserv_create(
        self, taskserv: str, servers: Sequence[str] | None = None, operation: str = "install"
    ) -> dict[str, Any]:
        dag = _Dag()
        self._taskserv(dag, taskserv, servers, operation, "")
        kind = "taskserv.create" if operation == "install" else "taskserv.remove"
        return self._spec(kind, f"{kind} {taskserv} {self.infra.name}", dag)

    def _taskserv(
        self,
        dag: _Dag,
        taskserv: str,
        servers: Sequence[str] | None,
        operation: str,
        prefix: str,
        **kw: Any,
    ) -> None:
        if operation not in ("install", "remove"):
            raise ValidationError(
                f"taskserv operation must be install or remove, not {operation!r}",
                field="operation",
            )
        ext = self._ext("taskserv", taskserv)
        targets = (
            self._servers(servers)
            if servers
            else [s for s in self.infra.servers if taskserv in {t["name"] for t in s["taskservs"]}]
        )
        if not targets:
            raise ValidationError(
                f"no server of infra {self.infra.name} lists task service {taskserv!r}; "
                "name the servers"
            )
        for s in targets:
            host = s["hostname"]
            if operation == "install":
                self._server_steps(dag, s, [taskserv], prefix, **kw)
            else:
                dag.add(
                    {
                        "name": f"{prefix}remove:{taskserv}@{host}",
                        "command": self._cmd(f"taskservs/{taskserv}", "remove", host),
                        "retry": _RETRY,
                        "timeout_s": ext.timeout_s,
                        **kw,
                    },
                    f"remove task service {taskserv} from {host}",
                )

    def cluster_create(self, cluster: str) -> dict[str, Any]:
        dag = _Dag()
        self._cluster_create(dag, cluster, "")
        return self._spec("cluster.create", f"cluster.create {cluster} {self.infra.name}", dag)

    def _cluster_create(self, dag: _Dag, cluster: str, prefix: str, **kw: Any) -> None:
        c = self.infra.cluster(cluster)
        ext = self._ext("cluster", c["kind"])
        waits: list[str] = []
        for m in c["members"]:
            s = self.infra.server(m["server"])
            own = [t["name"] for t in s["taskservs"]]
            steps = self._server_steps(dag, s, [*own, *ext.requires], prefix, **kw)
            waits += [steps[n] for n in (*own, *ext.requires)] or [steps[""]]
        dag.add(
            {
                "name": f"{prefix}cluster:{c['name']}",
                "command": self._cmd(f"clusters/{c['kind']}", "create", c["name"]),
                "rollback": self._cmd(f"clusters/{c['kind']}", "delete", c["name"]),
                "depends_on": sorted(set(waits)),
                "retry": _RETRY,
                "timeout_s": ext.timeout_s,
                **kw,
            },
            f"form cluster {c['name']} ({c['kind']}) of "
            + ", ".join(f"{m['server']} as {m['role']}" for m in c["members"]),
        )

    def cluster_delete(self, cluster: str) -> dict[str, Any]:
        dag = _Dag()
        self._cluster_delete(dag, cluster, "")
        return self._spec("cluster.delete", f"cluster.delete {cluster} {self.infra.name}", dag)

    def _cluster_delete(self, dag: _Dag, cluster: str, prefix: str, **kw: Any) -> None:
        c = self.infra.cluster(cluster)
        ext = self._ext("cluster", c["kind"])
        dag.add(
            {
                "name": f"{prefix}uncluster:{c['name']}",
                "command": self._cmd(f"clusters/{c['kind']}", "delete", c["name"]),
                "retry": _RETRY,
                "timeout_s": ext.timeout_s,
                **kw,
            },
            f"dissolve cluster {c['name']} ({c['kind']})",
        )

    def batch(self, name_or_path: str) -> dict[str, Any]:
        """The batch workflow ``infra/<infra>/workflows/<name>.ncl`` (or a path)."""
        path = Path(name_or_path)
        if not path.suffix:
            path = self.infra.path / "workflows" / f"{name_or_path}.ncl"
        if not path.is_file():
            known = ", ".join(p.stem for p in self.ws.batch_files(self.infra.name)) or "none"
            raise NotFound(
                f"no batch workflow {name_or_path!r}; in infra {self.infra.name}: {known}"
            )
        b = self.ws.batch(path)
        dag = _Dag()
        op_tasks: dict[str, list[str]] = {}
        ids = [op["id"] for op in b["operations"]]
        for op in b["operations"]:
            unknown = [d for d in op["depends_on"] if d not in ids]
            if unknown:
                raise ValidationError(
                    f"{path}: operation {op['id']} depends on unknown operation(s) {unknown}"
                )
        for op in _ops_in_order(b["operations"], path):
            before = {t["name"] for t in dag.tasks}
            on_failure = op["on_failure"]
            if not b["rollback_enabled"] and on_failure == "rollback":
                on_failure = "fail"
            kw = {"on_failure": on_failure}
            prefix = f"{op['id']}/"
            kind, _, verb = op["type"].partition(".")
            if op["type"] == "server.create":
                self._servers_create(dag, op.get("servers"), prefix, **kw)
            elif op["type"] == "server.delete":
                self._servers_delete(dag, op.get("servers"), prefix, **kw)
            elif kind == "taskserv":
                if not op.get("taskserv"):
                    raise ValidationError(f"{path}: operation {op['id']} needs `taskserv`")
                verb = "install" if verb == "create" else "remove"
                self._taskserv(dag, op["taskserv"], op.get("servers"), verb, prefix, **kw)
            elif kind == "cluster":
                if not op.get("cluster"):
                    raise ValidationError(f"{path}: operation {op['id']} needs `cluster`")
                if verb == "create":
                    self._cluster_create(dag, op["cluster"], prefix, **kw)
                else:
                    self._cluster_delete(dag, op["cluster"], prefix, **kw)
            mine = [t for t in dag.tasks if t["name"] not in before]
            op_tasks[op["id"]] = [t["name"] for t in mine]
            waits = [n for d in op["depends_on"] for n in op_tasks[d]]
            for t in mine:
                t["depends_on"] = [*t.get("depends_on", []), *waits]
        if not b["rollback_enabled"]:
            for t in dag.tasks:
                t.pop("rollback", None)
        extra: dict[str, Any] = {}
        if b.get("parallel_limit"):
            extra["parallel_limit"] = b["parallel_limit"]
        return self._spec("batch", f"batch {b['name']} {self.infra.name}", dag, **extra)


def _ops_in_order(ops: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    by_id = {op["id"]: op for op in ops}
    order: list[dict[str, Any]] = []
    state: dict[str, str] = {}

    def visit(op_id: str, trail: list[str]) -> None:
        if state.get(op_id) == "done":
            return
        if state.get(op_id) == "visiting":
            cycle = [*trail[trail.index(op_id) :], op_id]
            raise ValidationError(f"{path}: operation cycle: {' -> '.join(cycle)}", cycle=cycle)
        state[op_id] = "visiting"
        for d in by_id[op_id]["depends_on"]:
            visit(d, [*trail, op_id])
        state[op_id] = "done"
        order.append(by_id[op_id])

    for op in ops:
        visit(op["id"], [])
    return order


def split(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the workflow to submit, task name → what it does)."""
    body = dict(spec)
    does = body.pop("_does", {})
    return body, dict(does)


def describe(spec: dict[str, Any]) -> dict[str, Any]:
    """The plan ``--check`` shows: the workflow and, per task, what it would do."""
    body, does = split(spec)
    return {
        "name": body["name"],
        "kind": body["kind"],
        "labels": body.get("labels", {}),
        "parallel_limit": body.get("parallel_limit"),
        "tasks": [
            {
                "name": t["name"],
                "does": does.get(t["name"], ""),
                "depends_on": t.get("depends_on", []),
                "command": t["command"],
                "rollback": t.get("rollback"),
                "on_failure": t.get("on_failure", "rollback"),
            }
            for t in body["tasks"]
        ],
        "workflow": body,
    }
