"""Provisioning: platform services of an infrastructure-automation system."""

__version__ = "0.1.0"
