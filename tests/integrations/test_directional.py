"""Directional detection on a 100+ tensor torch model: which tensor, then which entry."""

from __future__ import annotations

import pytest
import torch
from gradwatch.integrations.torch import after_backward, check_module

from benchmarks.directional import (
    PLANTED_ENTRY,
    build_model,
    make_batch,
    mse,
    near_zero_tensors,
    planted_tensor,
)
from gradwatch import GradWatch

pytestmark = pytest.mark.torch

TENSORS = 122


def test_model_has_over_a_hundred_tensors_and_near_zero_biases() -> None:
    """The fixture is what the test claims: 122 tensors, biases before BatchNorm ~ 0."""
    model = build_model()
    assert len(list(model.parameters())) == TENSORS
    mse(model, make_batch()).backward()
    grads = dict(model.named_parameters())
    overall = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()  # type: ignore[union-attr]
    for name in near_zero_tensors():
        assert grads[name].grad.norm() < 1e-6 * overall  # type: ignore[union-attr]


@pytest.mark.parametrize("seed", [0, 1])
def test_directional_names_the_wrong_tensor_with_two_evaluations_per_tensor(seed: int) -> None:
    """sample="directional" costs 2 loss evaluations per tensor (+2) and fails only the bug."""
    result = check_module(build_model(bug=True), mse, make_batch(), sample="directional", seed=seed)
    assert result.loss_evals == 2 * TENSORS + 2
    assert result.mode == "directional"
    assert result.status == "fail"
    failed = [name for name, tensor in result.tensors.items() if tensor.status == "fail"]
    assert failed == [planted_tensor()]
    assert result.worst[0].tensor == planted_tensor()


def test_auto_localizes_the_planted_entry_inside_the_flagged_tensor() -> None:
    """sample="auto" with per-tensor ratios asked for detects per tensor, then samples inside
    the flagged one: worst = the entry."""
    model = build_model(bug=True)
    result = check_module(model, mse, make_batch(), sample="auto", per_tensor=True)
    assert result.status == "fail"
    worst = result.worst[0]
    assert (worst.tensor, tuple(worst.index)) == (planted_tensor(), PLANTED_ENTRY)
    assert worst.diagnosis == "bug"
    # detection (2 per tensor) + localization of the 64 entries and the diagnosis, not 2n
    assert result.loss_evals < 2 * result.size / 4


@pytest.mark.parametrize("sample", ["directional", "auto"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_model_never_alarms_including_near_zero_biases(sample: str, seed: int) -> None:
    """No tensor fails on the correct model; the biases before BatchNorm are judged ok."""
    result = check_module(build_model(), mse, make_batch(), sample=sample, seed=seed)
    assert result.status != "fail"
    assert all(result.tensors[name].status == "ok" for name in near_zero_tensors())
    assert not [name for name, tensor in result.tensors.items() if tensor.status == "fail"]


def test_watch_with_budget_reduced_checks_still_find_the_tensor() -> None:
    """A plain loop under a tight budget: checks shrink to directional and still alert."""
    model = build_model(bug=True)
    batch = make_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    watch = GradWatch(every=5, sample=None, report_dir=None, budget=0.05)
    for step in range(10):
        optimizer.zero_grad()
        mse(model, batch).backward()
        after_backward(watch, step, model, mse, batch)
        optimizer.step()
    assert watch.results, "the first check always runs"
    first = watch.results[0]
    assert first.mode == "directional"
    assert watch.alerts[0].tensor == planted_tensor()
