"""Reproducible measurements: ``python -m benchmarks.<name>`` from the repository root."""
