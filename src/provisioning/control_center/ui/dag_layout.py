"""A workflow's DAG laid out for an SVG: layers left to right by depth, edges as curves.

A task's layer is the length of the longest dependency chain leading to it (Kahn's topological
order, O(tasks + edges)). Within a layer tasks are ordered by the mean position of their
dependencies (one barycentre pass, which keeps most edges short), and a layer taller than
``max_rows`` wraps into several sub-columns, so a 500-task fan-out stays a wide, scrollable
picture rather than one 20,000-pixel column. Every step is linear in tasks + edges plus a sort
per layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Edge", "Layout", "Node", "dependencies_of", "layout"]

NODE_W = 168
NODE_H = 34
COL_GAP = 56  # between the columns of two layers (room for the edges)
SUB_GAP = 16  # between the sub-columns of one wrapped layer
ROW_GAP = 14
PAD = 12


@dataclass(frozen=True)
class Node:
    name: str
    task_id: str
    status: str
    layer: int
    x: int
    y: int
    label: str  # the name, shortened to fit the box

    @property
    def cx(self) -> int:
        return self.x + NODE_W // 2


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: str  # SVG path data
    soft: bool = False  # a dependency that does not need the task to succeed


@dataclass
class Layout:
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    width: int = 0
    height: int = 0
    layers: int = 0
    node_w: int = NODE_W
    node_h: int = NODE_H


def dependencies_of(task: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """``(task name, soft)`` of each dependency, as the orchestrator returns them (a name or a
    ``{"task": name, "condition": …}``)."""
    out: list[tuple[str, bool]] = []
    for dep in task.get("depends_on") or ():
        if isinstance(dep, Mapping):
            name = str(dep.get("task", ""))
            out.append((name, str(dep.get("kind") or "hard") != "hard"))
        else:
            out.append((str(dep), False))
    return out


def _label(name: str, limit: int = 21) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def layout(tasks: Iterable[Mapping[str, Any]], *, max_rows: int | None = None) -> Layout:
    """Positions for the tasks (dicts with ``name``, ``id``, ``status``, ``depends_on``).

    A dependency on a task that is not in the list is ignored; a cycle (the orchestrator
    refuses them) puts its tasks in the last layer rather than looping. ``max_rows``: the
    tallest a column gets before it wraps (default: 12, or about the square root of the widest
    layer, so a big fan-out wraps into a roughly square block).
    """
    items = list(tasks)
    names = [str(t.get("name", "")) for t in items]
    index = {n: i for i, n in enumerate(names)}
    deps: list[list[tuple[int, bool]]] = []
    children: list[list[int]] = [[] for _ in items]
    indegree = [0] * len(items)
    for i, t in enumerate(items):
        mine = [(index[d], soft) for d, soft in dependencies_of(t) if d in index and d != names[i]]
        deps.append(mine)
        for d, _soft in mine:
            children[d].append(i)
            indegree[i] += 1

    # Longest-path layering in topological order.
    layer = [0] * len(items)
    ready = [i for i, n in enumerate(indegree) if n == 0]
    seen = 0
    while ready:
        i = ready.pop()
        seen += 1
        for c in children[i]:
            layer[c] = max(layer[c], layer[i] + 1)
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    if seen < len(items):  # a cycle: park what is left after everything else
        last = max(layer, default=0) + 1
        for i, n in enumerate(indegree):
            if n > 0:
                layer[i] = last

    by_layer: dict[int, list[int]] = {}
    for i in range(len(items)):
        by_layer.setdefault(layer[i], []).append(i)

    if max_rows is None:
        widest = max((len(m) for m in by_layer.values()), default=1)
        max_rows = max(12, math.isqrt(widest - 1) + 1)

    # Order each layer by the mean slot of its dependencies; place the columns.
    slot = [0.0] * len(items)
    x = PAD
    out = Layout(layers=len(by_layer))
    xs: dict[int, int] = {}
    ys: dict[int, int] = {}
    height = 0
    for depth in sorted(by_layer):
        members = by_layer[depth]
        if depth:
            members.sort(
                key=lambda i: (
                    sum(slot[d] for d, _ in deps[i]) / len(deps[i]) if deps[i] else 0.0,
                    i,
                )
            )
        rows = min(len(members), max_rows)
        for pos, i in enumerate(members):
            sub, row = divmod(pos, max_rows)
            slot[i] = float(row)
            xs[i] = x + sub * (NODE_W + SUB_GAP)
            ys[i] = PAD + row * (NODE_H + ROW_GAP)
        subs = (len(members) + max_rows - 1) // max_rows
        x += subs * NODE_W + (subs - 1) * SUB_GAP + COL_GAP
        height = max(height, rows)

    for i, t in enumerate(items):
        out.nodes.append(
            Node(
                name=names[i],
                task_id=str(t.get("id", "")),
                status=str(t.get("status", "")),
                layer=layer[i],
                x=xs[i],
                y=ys[i],
                label=_label(names[i]),
            )
        )
    half = NODE_H // 2
    for i in range(len(items)):
        for d, soft in deps[i]:
            x1, y1 = xs[d] + NODE_W, ys[d] + half
            x2, y2 = xs[i], ys[i] + half
            if x2 <= x1:  # same column (a wrapped layer never depends on itself; be safe)
                x2 = x1 + 1
            bend = max(24, (x2 - x1) // 2)
            path = f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
            out.edges.append(Edge(names[d], names[i], path, soft))
    out.width = max(x - COL_GAP + PAD, NODE_W + 2 * PAD)
    out.height = PAD * 2 + max(height, 1) * (NODE_H + ROW_GAP) - ROW_GAP
    return out
