"""An honest budget never starves: a bug that appears after the first check is alerted on
within three due checks at budget=0.01, and a check's seconds are all of its cost."""

from __future__ import annotations

import time
from typing import Any

import pytest

pytest.importorskip("torch")

import torch
from gradwatch.integrations.torch import after_backward

import gradwatch

pytestmark = pytest.mark.torch

BUG = {"on": False}


class Tanh(torch.autograd.Function):
    """tanh whose backward drops the derivative's square once `BUG["on"]` is set."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return g * (1 - y) if BUG["on"] else g * (1 - y * y)


class Act(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Tanh.apply(x)


def train(mode: str, steps: int = 31, every: int = 5) -> gradwatch.GradWatch:
    """Train a small MLP with budget=0.01; the bug switches on after step 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), Act(), torch.nn.Linear(16, 16), Act(), torch.nn.Linear(16, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    watch = gradwatch.GradWatch(every=every, report_dir=None, budget=0.01)
    BUG["on"] = False
    try:
        for step in range(steps):
            BUG["on"] = step >= 1
            optimizer.zero_grad()
            loss_fn(model, (x, y)).backward()
            after_backward(watch, step, model, loss_fn, (x, y), mode=mode)  # type: ignore[arg-type]
            optimizer.step()
    finally:
        BUG["on"] = False
    return watch


@pytest.mark.parametrize("mode", ["whole", "local"])
def test_a_bug_after_step_0_is_alerted_within_three_due_checks(mode: str) -> None:
    """At budget=0.01 every check costs far more than 1% of this tiny training, yet the bug
    that appears at step 1 is alerted on by the third due check after it (step 15)."""
    watch = train(mode)
    assert watch.results[0].step == 0 and watch.results[0].status == "ok"
    assert watch.alerts, [p.action for p in watch.plans]
    assert watch.alerts[0].step is not None and watch.alerts[0].step <= 15
    assert len(watch.skipped) >= 1  # the budget still skips what it cannot afford
    ran = [plan for plan in watch.plans if plan.action != "skipped"]
    assert any("run anyway" in plan.reason for plan in ran)


def test_seconds_are_the_whole_check_with_its_copies_and_step_link() -> None:
    """A due check's recorded seconds cover the wall time around all of it: the shadow
    copy and the step link included (more than the core's own evaluations)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
    x, y = torch.randn(16, 64), torch.randn(16, 1)

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    loss_fn(model, (x, y)).backward()
    watch = gradwatch.GradWatch(every=1, report_dir=None)
    started = time.perf_counter()
    result = after_backward(watch, 0, model, loss_fn, (x, y), step_check=True, mode="whole")
    elapsed = time.perf_counter() - started
    assert result is not None and result.step_link is not None
    assert 0.9 * elapsed <= result.seconds <= elapsed
