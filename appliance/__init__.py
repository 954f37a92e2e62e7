"""Sluice: a transparent HTTP proxy appliance for Linux gateways."""

__version__ = "0.1.0"
