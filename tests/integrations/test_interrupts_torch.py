"""A signal at any moment of ``check_module``: RNGs, ``.grad``, buffers, settings come back.

Issue 27: a real SIGINT (and a SIGTERM handled as SystemExit) is raised at the start of evenly
spaced Python calls of the check (``benchmarks.interrupts``).
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import pytest
import torch
from gradwatch.integrations.torch import check_module

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


def _our_context_exits(frame: FrameType, event: str) -> bool:
    """A ``with`` of one of gradwatch's generator context managers starting to exit."""
    if event != "call" or frame.f_code.co_name != "__exit__":
        return False
    generator = getattr(frame.f_locals.get("self"), "gen", None)
    code = getattr(generator, "gi_code", None)
    return code is not None and "/site-packages/" not in code.co_filename.replace("\\", "/")


def test_an_interrupt_as_any_context_of_the_check_exits_leaves_the_model_as_it_was() -> None:
    """A SIGINT at the exit of each context manager a check opens (the gap before its restore)
    leaves the real model's hooks and requires_grad, and the RNG, as they were."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(5, 3)

    def run() -> object:
        return check_module(model, lambda m, b: m(b).square().mean(), x)

    def state() -> tuple[object, ...]:
        hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]
        grads = [p.requires_grad for p in model.parameters()]
        return hooks, grads, torch.get_rng_state().numpy().tobytes()

    exits = 0

    def count(frame: FrameType, event: str, arg: object) -> None:
        nonlocal exits
        exits += _our_context_exits(frame, event)

    sys.setprofile(count)
    try:
        run()
    finally:
        sys.setprofile(None)
    assert exits > 3
    before = state()
    for k in range(1, exits + 1):
        seen = 0

        def inject(frame: FrameType, event: str, arg: object, k: int = k) -> None:
            nonlocal seen
            if _our_context_exits(frame, event):
                seen += 1
                if seen == k:
                    sys.setprofile(None)
                    signal.raise_signal(signal.SIGINT)

        sys.setprofile(inject)
        try:
            with pytest.raises(KeyboardInterrupt) as caught:
                run()
        finally:
            sys.setprofile(None)
        # Checked while the exception is held (as in `except KeyboardInterrupt: save()`):
        # a restore left to the garbage collector closing a generator comes too late.
        assert state() == before, f"at the exit of context {k} of {exits}"
        del caught
