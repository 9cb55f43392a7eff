"""Kubernetes: sidecar injection and the in-pod probes and lifecycle hooks."""
