"""A workflow's laid-out DAG (``dag_layout``) as the ``<svg>`` its page shows.

``static/dag.js`` and ``static/dag.css`` read the classes and ``data-`` attributes written here;
a click on a node (or Enter on it) loads the task's detail into ``#task-detail`` with htmx.
Built as one string rather than a Jinja loop: over 500 nodes and 1,000 edges the loop was most
of the time of the 500-task page (docs/performance.md). Every value from the workflow is
escaped.
"""

from __future__ import annotations

from markupsafe import Markup, escape

from provisioning.control_center.ui.dag_layout import Layout
from provisioning.control_center.ui.templating import status_class

__all__ = ["render_svg"]


def render_svg(graph: Layout, *, prefix: str, title: str) -> Markup:
    """The whole ``<svg>`` element; ``prefix`` is the UI's mount (``/ui``), ``title`` the
    workflow's name (for the accessible label)."""
    h, w = graph.node_h, graph.node_w
    out = [
        f'<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{graph.width}" '
        f'height="{graph.height}" viewBox="0 0 {graph.width} {graph.height}" role="group" '
        f'aria-label="Tasks of {escape(title)} and their dependencies">',
        '<g class="dag-edges" aria-hidden="true">',
    ]
    for e in graph.edges:
        soft = " soft" if e.soft else ""
        out.append(
            f'<path d="{e.path}" class="dag-edge{soft}" '
            f'data-from="{escape(e.source)}" data-to="{escape(e.target)}"></path>'
        )
    out.append("</g>")
    base = escape(prefix)
    for n in graph.nodes:
        name, status, task_id = escape(n.name), escape(n.status), escape(n.task_id)
        out.append(
            f'<g class="dag-node {status_class(n.status)}" transform="translate({n.x},{n.y})" '
            f'data-task="{name}" data-task-id="{task_id}" data-status="{status}" tabindex="0" '
            f'role="button" aria-label="{name}: {status}" hx-get="{base}/tasks/{task_id}" '
            'hx-target="#task-detail" hx-swap="outerHTML">'
            f"<title>{name} \u2014 {status}</title>"
            f'<rect width="{w}" height="{h}" rx="6"></rect>'
            f'<circle class="dag-dot" cx="14" cy="{h // 2}" r="5"></circle>'
            f'<text x="26" y="{h // 2 + 4}">{escape(n.label)}</text></g>'
        )
    out.append("</svg>")
    return Markup("\n".join(out))
