"""Runnable examples, also importable by tests and benchmarks (``examples.lecture_net``)."""
