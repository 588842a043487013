"""Shared kernel: errors, settings, logging, state store. Imports no service."""
