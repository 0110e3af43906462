"""check_module's batched evaluation (torch.func.vmap): same numbers, clear fallbacks."""

from __future__ import annotations

import copy
import random
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
import gradwatch.integrations._shadow.batched as batched_evaluation
from gradwatch.integrations.torch import check_module
from torch import nn

import gradwatch
from tests.integrations.planted import VmapWrongSquare, WrongSquare, cross_entropy, make_batch

pytestmark = pytest.mark.torch

BATCHED = "batched evaluation: torch.func.vmap"
UNAVAILABLE = "batched evaluation unavailable: "
ALL = 1000
"""top_k that reports every component of these small models."""


def mlp(*middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), *middle, nn.Tanh(), nn.Linear(16, 3))


class SquareNet(nn.Module):
    """A planted bug: the hidden layer's gradient is half what it should be."""

    def __init__(self, square: type[torch.autograd.Function] = VmapWrongSquare) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(6, 8)
        self.second = nn.Linear(8, 3)
        self.square = square

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.square.apply(self.first(x)))


def roundoff_bound(result: gradwatch.CheckResult) -> float:
    """How far two numeric derivatives may differ when J differs by a few ulps (a matmul order)."""
    return 64 * float(np.finfo(np.float64).eps) * max(abs(result.loss), 1.0) / result.eps


def assert_same_numbers(batched: gradwatch.CheckResult, sequential: gradwatch.CheckResult) -> None:
    """Every reported component has the same analytic value and a numeric one within roundoff."""
    assert batched.checked == sequential.checked and batched.loss_evals == sequential.loss_evals
    numeric = {c.name: (c.numeric, c.analytic) for c in sequential.worst}
    assert {c.name for c in batched.worst} == set(numeric)
    for component in batched.worst:
        assert component.analytic == numeric[component.name][1]
        assert abs(component.numeric - numeric[component.name][0]) <= roundoff_bound(sequential)


def test_batched_check_agrees_with_sequential_and_catches_the_planted_bug() -> None:
    """On a wrong custom backward both paths fail on first.*, with the same worst components."""
    batched = check_module(SquareNet(), cross_entropy, make_batch(features=6), top_k=ALL)
    sequential = check_module(
        SquareNet(), cross_entropy, make_batch(features=6), top_k=ALL, batched=False
    )
    assert [c.name for c in batched.worst[:5]] == [c.name for c in sequential.worst[:5]]
    assert any(BATCHED in note for note in batched.notes)
    assert not any("batched" in note for note in sequential.notes)
    assert batched.status == sequential.status == "fail"
    assert batched.worst[0].tensor.startswith("first.")
    assert {t for t, v in batched.tensors.items() if v.status == "fail"} == {
        "first.weight",
        "first.bias",
    }
    assert batched.ratio == pytest.approx(sequential.ratio, rel=1e-9)
    assert_same_numbers(batched, sequential)


def test_batched_check_of_a_correct_model_is_ok_and_sampled_checks_agree() -> None:
    """A correct MLP passes batched; a sampled check picks the same components either way."""
    full = check_module(mlp(), cross_entropy, make_batch(features=6))
    assert full.status == "ok" and full.ratio < 1e-7 and full.checked == full.size
    options: dict[str, Any] = {"sample": 40, "seed": 3, "top_k": 40}
    batched = check_module(mlp(), cross_entropy, make_batch(features=6), **options)
    sequential = check_module(
        mlp(), cross_entropy, make_batch(features=6), batched=False, **options
    )
    assert batched.checked == 40 and any(BATCHED in note for note in batched.notes)
    assert_same_numbers(batched, sequential)


def test_chunk_boundaries_do_not_change_the_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 7 perturbations give the numbers of one big chunk (no index shifted)."""
    whole = check_module(SquareNet(), cross_entropy, make_batch(features=6), top_k=ALL)
    monkeypatch.setattr(batched_evaluation, "MAX_CHUNK", 7)
    chunked = check_module(SquareNet(), cross_entropy, make_batch(features=6), top_k=ALL)
    assert any("up to 7 perturbations" in note for note in chunked.notes)
    assert_same_numbers(chunked, whole)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        pytest.param(
            mlp(nn.Dropout(0.3)).train(), "stochastic modules in train mode (1)", id="dropout"
        ),
        pytest.param(mlp(nn.BatchNorm1d(16)).train(), "BatchNorm in train mode (1)", id="bn"),
    ],
)
def test_models_vmap_cannot_replay_fall_back_to_sequential(model: nn.Module, reason: str) -> None:
    """Dropout and BatchNorm in train mode are checked one by one, and the notes say why."""
    result = check_module(model, cross_entropy, make_batch(features=6))
    assert result.status == "ok", (result.ratio, result.notes)
    notes = [note for note in result.notes if note.startswith(UNAVAILABLE)]
    assert len(notes) == 1 and reason in notes[0] and notes[0].endswith("; sequential")


def test_eval_mode_dropout_and_batchnorm_are_batched() -> None:
    """In eval mode neither draws nor updates statistics: the batched path runs."""
    result = check_module(
        mlp(nn.BatchNorm1d(16), nn.Dropout(0.3)).eval(), cross_entropy, make_batch(features=6)
    )
    assert result.status == "ok" and any(BATCHED in note for note in result.notes)


def test_randomness_in_the_loss_and_vmap_errors_fall_back() -> None:
    """A loss drawing numpy numbers, or calling .item(), is evaluated one by one."""

    def noisy(model: nn.Module, batch: Any) -> torch.Tensor:
        np.random.random()  # drawn at every evaluation, replayed
        return cross_entropy(model, batch)

    def with_item(model: nn.Module, batch: Any) -> torch.Tensor:
        loss = cross_entropy(model, batch)
        return loss if loss.item() < 1e9 else loss * 0

    drawn = check_module(mlp(), noisy, make_batch(features=6))
    assert any(
        note == f"{UNAVAILABLE}J draws from the numpy RNG; sequential" for note in drawn.notes
    )
    raised = check_module(mlp(), with_item, make_batch(features=6))
    assert raised.status == "ok"
    assert any(note.startswith(f"{UNAVAILABLE}vmap raised RuntimeError") for note in raised.notes)


def test_an_autograd_function_without_setup_context_falls_back_and_fails() -> None:
    """vmap refuses an old-style autograd.Function: checked one by one, the bug still found."""
    result = check_module(SquareNet(WrongSquare), cross_entropy, make_batch(features=6))
    assert result.status == "fail" and result.worst[0].tensor.startswith("first.")
    assert any(note.startswith(f"{UNAVAILABLE}an autograd.Function") for note in result.notes)


class CachedWeight(nn.Module):
    """Reads its weight through a list, around functional_call: vmap would not see a swap."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(6, 3)
        self.cached = [self.inner.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.cached[0], self.inner.bias)


def test_a_tensor_whose_batched_value_disagrees_is_evaluated_one_by_one() -> None:
    """The probe finds the parameter read around functional_call; the numbers stay right."""
    batched = check_module(CachedWeight(), cross_entropy, make_batch(features=6), top_k=ALL)
    sequential = check_module(
        CachedWeight(), cross_entropy, make_batch(features=6), top_k=ALL, batched=False
    )
    assert batched.status == "ok"
    assert any("disagreed" in note and "inner.weight" in note for note in batched.notes)
    assert_same_numbers(batched, sequential)


def test_batched_check_leaves_model_and_every_rng_untouched() -> None:
    """Parameters, .grad, modes and the python/numpy/torch RNGs are as before the check."""
    model = SquareNet()
    cross_entropy(model, make_batch(features=6)).backward()
    before = (
        copy.deepcopy(model.state_dict()),
        [cast(torch.Tensor, p.grad).clone() for p in model.parameters()],
    )
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    check_module(model, cross_entropy, make_batch(features=6))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[0][name])
    assert all(
        torch.equal(cast(torch.Tensor, p.grad), g)
        for p, g in zip(model.parameters(), before[1], strict=True)
    )
    assert random.getstate() == states[0]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), states[1], strict=True))
    assert torch.equal(torch.get_rng_state(), states[2])


def test_a_generator_drawn_only_later_triggers_a_full_replay() -> None:
    """J that draws python numbers only after its first evaluation is rechecked with replay."""
    calls = 0

    def late_draws(model: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        noise = random.random() * 1e-3 if calls > 3 else 0.0
        return cross_entropy(model, batch) + noise

    result = check_module(mlp(), late_draws, make_batch(features=6), batched=False, sample=10)
    assert any("checked again replaying every generator" in note for note in result.notes)


def test_batched_must_be_a_bool() -> None:
    """batched='yes' is an OptionError naming the argument."""
    with pytest.raises(gradwatch.OptionError, match="batched: expected True or False"):
        check_module(mlp(), cross_entropy, make_batch(features=6), batched="yes")  # type: ignore[arg-type]
