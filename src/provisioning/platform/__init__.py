"""The platform supervisor: runs services in one process, start/stop/status, serve one service."""
