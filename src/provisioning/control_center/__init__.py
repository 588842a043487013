"""The control center: identity, access control (Cedar), audit log, and later the web UI."""
