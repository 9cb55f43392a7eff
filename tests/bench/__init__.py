"""Benchmarks: what the Python ext_proc hop costs next to plain Envoy (``python -m tests.bench.run``)."""
