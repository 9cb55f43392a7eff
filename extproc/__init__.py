"""Tollgate: an AI gateway that runs beside Envoy as an external-processing server."""

__version__ = "0.1.0"
