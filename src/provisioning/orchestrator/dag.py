"""DAG validation of a submitted workflow: names, references, cycles, size."""

from __future__ import annotations

import heapq

from provisioning.core.errors import DagError, LimitExceeded
from provisioning.orchestrator.api import WorkflowSpec

__all__ = ["topological_order", "validate_dag"]


def validate_dag(spec: WorkflowSpec, max_tasks: int) -> list[int]:
    """Check the workflow's task graph and return the task indexes in topological order.

    Raises:
        LimitExceeded: more tasks than ``max_tasks``.
        DagError: a duplicate task name, a dependency on an unknown task or on itself, a
            repeated dependency, or a cycle (the message lists the cycle's task names in order).
    """
    if len(spec.tasks) > max_tasks:
        raise LimitExceeded(
            f"workflow has {len(spec.tasks)} tasks; the maximum is {max_tasks} "
            "(orchestrator.max_tasks)",
            tasks=len(spec.tasks),
            max_tasks=max_tasks,
        )
    index: dict[str, int] = {}
    for i, task in enumerate(spec.tasks):
        if task.name in index:
            raise DagError(
                f"duplicate task name {task.name!r} (tasks[{index[task.name]}] and tasks[{i}])",
                task=task.name,
            )
        index[task.name] = i
    edges: list[list[int]] = [[] for _ in spec.tasks]
    for i, task in enumerate(spec.tasks):
        seen: set[str] = set()
        for dep in task.dependencies():
            if dep.task not in index:
                raise DagError(
                    f"task {task.name!r} depends on unknown task {dep.task!r}",
                    task=task.name,
                    dependency=dep.task,
                )
            if dep.task == task.name:
                raise DagError(f"task {task.name!r} depends on itself", task=task.name)
            if dep.task in seen:
                raise DagError(
                    f"task {task.name!r} lists dependency {dep.task!r} twice", task=task.name
                )
            seen.add(dep.task)
            edges[i].append(index[dep.task])
    return topological_order(edges, [t.name for t in spec.tasks])


def topological_order(deps: list[list[int]], names: list[str]) -> list[int]:
    """Kahn's algorithm over ``deps[i]`` = indexes task ``i`` depends on; stable by index.

    Raises:
        DagError: the graph has a cycle; the message names one cycle's tasks in order.
    """
    n = len(deps)
    indegree = [len(d) for d in deps]
    dependants: list[list[int]] = [[] for _ in range(n)]
    for i, ds in enumerate(deps):
        for d in ds:
            dependants[d].append(i)
    heap = [i for i in range(n) if indegree[i] == 0]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        i = heapq.heappop(heap)
        order.append(i)
        for j in dependants[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                heapq.heappush(heap, j)
    if len(order) < n:
        cycle = _find_cycle(deps, {i for i in range(n) if indegree[i] > 0})
        path = " -> ".join(names[i] for i in cycle)
        raise DagError(f"the tasks form a cycle: {path}", cycle=[names[i] for i in cycle])
    return order


def _find_cycle(deps: list[list[int]], remaining: set[int]) -> list[int]:
    # Every node left by Kahn's algorithm lies on or leads to a cycle: walk dependencies
    # inside the remaining set until a node repeats.
    start = min(remaining)
    seen: dict[int, int] = {}
    path: list[int] = []
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(d for d in deps[node] if d in remaining)
    cycle = path[seen[node] :]
    # Report in dependency order (a depends on b -> b runs first): reverse, close the loop.
    cycle.reverse()
    return [*cycle, cycle[0]]
