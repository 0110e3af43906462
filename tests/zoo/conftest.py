"""The zoo's models are tiny: one thread is faster and steadier on shared CI cores."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _one_thread_quiet_alerts() -> Iterator[None]:
    """One torch thread; gradwatch's alert events (expected here) are not printed."""
    logger = logging.getLogger("gradwatch")
    disabled = logger.disabled
    logger.disabled = True
    try:
        import torch
    except ImportError:
        yield
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
    logger.disabled = disabled
