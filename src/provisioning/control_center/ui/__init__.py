"""The web UI of the control center: server-rendered Jinja2 pages with htmx, under ``/ui``.

``mount_ui(app, settings, identity, guard)`` mounts it; ``docs/reference/ui.md`` describes the
pages, the sessions (cookie = the login's refresh token, see ``sessions``), CSRF protection and
the security headers (``security``).
"""

from provisioning.control_center.ui.app import PREFIX, WebUI, mount_ui

__all__ = ["PREFIX", "WebUI", "mount_ui"]
