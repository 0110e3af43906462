"""A signal at any moment of ``check_module``: RNGs, ``.grad``, buffers, settings come back.

Issue 27: a real SIGINT (and a SIGTERM handled as SystemExit) is raised at the start of evenly
spaced Python calls of the check (``benchmarks.interrupts``).
"""

from __future__ import annotations

import pytest

from benchmarks.interrupts import Scenario, sweep, torch_scenarios

pytestmark = pytest.mark.torch

POINTS = 40
"""Injection points per scenario here (evenly spaced over about 12,500 calls)."""

SCENARIOS = torch_scenarios()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=["SIGINT", "SIGTERM as SystemExit"])
def test_an_interrupt_at_any_call_restores_every_global(scenario: Scenario) -> None:
    """Each injected signal leaves the model, its .grad, the three RNGs and torch's settings
    bit for bit as they were, and its exception comes out of check_module."""
    outcome = sweep(scenario, POINTS)
    assert outcome.tried >= POINTS * 0.9
    assert outcome.restored == outcome.tried
    assert outcome.raised + outcome.lost == outcome.tried
