"""Runnable examples; also importable (``from examples.lecture_net import ...``) by tests and benchmarks."""
