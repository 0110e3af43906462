"""check_module and the plain-loop hook on real torch modules (CPU)."""

from __future__ import annotations

import copy
import json
import random
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
from gradwatch.integrations.torch import (
    after_backward,
    check_module,
    trainable_parameters,
    weight_decay_notes,
)
from torch import nn

import gradwatch
from tests.integrations.planted import WrongSquare, cross_entropy, make_batch

pytestmark = pytest.mark.torch


def mlp(activation: nn.Module, *extra: nn.Module, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), *extra, activation, nn.Linear(12, 3))


def first_weight(m: nn.Module) -> torch.Tensor:
    """The weight of an ``mlp``'s first layer, a Linear."""
    return cast(nn.Linear, cast(nn.Sequential, m)[0]).weight


def failing_tensors(result: gradwatch.CheckResult) -> set[str]:
    return {name for name, verdict in result.tensors.items() if verdict.status == "fail"}


# -- bugs are caught --------------------------------------------------------------------


class SquareNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(5, 8)
        self.second = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(WrongSquare.apply(self.first(x)))


def test_wrong_custom_backward_fails_and_names_the_tensor() -> None:
    """A custom autograd.Function with a wrong backward fails on the layer before it."""
    result = check_module(SquareNet(), cross_entropy, make_batch())
    assert result.status == "fail"
    assert failing_tensors(result) == {"first.weight", "first.bias"}
    assert result.worst[0].tensor.startswith("first.")


class DetachedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate = nn.Linear(5, 3)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) * torch.sigmoid(self.gate(x)).detach()


def test_detach_cutting_a_path_fails_and_is_noted() -> None:
    """`.detach()` leaves the gate without .grad: compared as zeros, noted, and failed."""
    result = check_module(DetachedNet(), cross_entropy, make_batch())
    assert result.status == "fail"
    assert failing_tensors(result) == {"gate.weight", "gate.bias"}
    assert any("gate.weight, gate.bias" in note for note in result.notes)


class WrongPenaltyGrad(torch.autograd.Function):
    """0.5 * lambda * ||W||^2 whose backward returns 2 * lambda * W (should be lambda * W)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.lambd = lambd
        return 0.5 * lambd * weight.square().sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad * 2 * ctx.lambd * weight, None


def test_wrong_hand_written_penalty_gradient_fails() -> None:
    """A penalty is part of J on both sides, so its wrong gradient is caught."""
    model = mlp(nn.Tanh())

    def weight_penalty(m: nn.Module) -> torch.Tensor:
        return WrongPenaltyGrad.apply(first_weight(m), 0.5)

    result = check_module(model, cross_entropy, make_batch(), regularization=[weight_penalty])
    assert result.status == "fail"
    assert failing_tensors(result) == {"0.weight"}
    assert set(result.regularization) == {"weight_penalty"}

    def correct_penalty(m: nn.Module) -> torch.Tensor:
        return 0.25 * first_weight(m).square().sum()

    fixed = check_module(model, cross_entropy, make_batch(), regularization={"l2": correct_penalty})
    assert fixed.status == "ok"
    expected = 0.25 * float(first_weight(model).detach().double().square().sum())
    assert fixed.regularization["l2"] == pytest.approx(expected, rel=1e-12)


class CorruptedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(5, 8)
        self.second = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.first(x))
        out = self.second(hidden)
        hidden.data.mul_(0.5)  # in place behind autograd's back: tanh and matmul saved it
        return out


def test_in_place_op_corrupting_a_saved_tensor_fails() -> None:
    """An in-place change of a tensor saved for backward gives wrong gradients: caught."""
    result = check_module(CorruptedNet(), cross_entropy, make_batch())
    assert result.status == "fail"
    assert "second.weight" in failing_tensors(result)


# -- no false alarms with default settings --------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(mlp(nn.Tanh()), id="float32-tanh"),
        pytest.param(mlp(nn.ReLU()), id="relu"),
        pytest.param(mlp(nn.ReLU(), nn.Dropout(0.3)).train(), id="dropout"),
        pytest.param(mlp(nn.ReLU(), nn.BatchNorm1d(12)).train(), id="batchnorm-train"),
        pytest.param(mlp(nn.ReLU(), nn.BatchNorm1d(12)).eval(), id="batchnorm-eval"),
    ],
)
def test_correct_models_pass_with_default_settings(model: nn.Module) -> None:
    """float32 models, dropout, BatchNorm and ReLU do not raise a false alarm."""
    result = check_module(model, cross_entropy, make_batch())
    assert result.status == "ok", (result.ratio, result.notes)
    assert result.ratio < 1e-6
    assert result.checked == result.size == sum(p.numel() for p in model.parameters())


def test_dropout_sees_the_same_mask_in_every_evaluation() -> None:
    """Dropout draws are replayed: J(theta) twice is equal, so no 'nondeterministic'."""
    model = mlp(nn.ReLU(), nn.Dropout(0.5)).train()
    result = check_module(model, cross_entropy, make_batch(), sample=20)
    assert result.status == "ok"
    assert not any("nondeterministic" in note for note in result.notes)


def test_native_float32_scales_thresholds_says_so_and_still_catches_bugs() -> None:
    """precision='native' checks in float32 with scaled thresholds, noted in the result."""
    ok = check_module(mlp(nn.Tanh()), cross_entropy, make_batch(), precision="native")
    assert ok.dtype == "float32"
    assert ok.status == "ok", ok.ratio
    assert ok.threshold == pytest.approx(0.1) and ok.warn == pytest.approx(1e-3)
    assert any("native precision float32" in note for note in ok.notes)
    bad = check_module(SquareNet(), cross_entropy, make_batch(), precision="native")
    assert bad.status == "fail"


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(nn.Tanh())
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_frozen_parameters_are_not_checked_and_unused_ones_are_noted() -> None:
    """requires_grad=False tensors are left out; a parameter without .grad is reported."""
    model = WithUnused()
    model.net[0].weight.requires_grad_(False)
    result = check_module(model, cross_entropy, make_batch())
    assert "net.0.weight" not in result.tensors
    assert "unused.weight" in result.tensors
    assert result.status == "ok"
    assert any("unused.weight, unused.bias" in note for note in result.notes)
    assert list(trainable_parameters(model)) == [
        "net.0.bias",
        "net.2.weight",
        "net.2.bias",
        "unused.weight",
        "unused.bias",
    ]


def test_padding_row_of_an_embedding_is_held_constant() -> None:
    """nn.Embedding's padding_idx row gets no gradient from torch; it is not a false alarm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.Flatten(), nn.Linear(12, 3))
    tokens = torch.tensor([[0, 1, 2], [3, 0, 4], [5, 6, 0]])
    labels = torch.tensor([0, 1, 2])
    result = check_module(model, cross_entropy, (tokens, labels))
    assert result.status == "ok", result.tensors
    assert any("0.weight[0]" in note for note in result.notes)


# -- side effects ------------------------------------------------------------------------


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "modes": [m.training for m in model.modules()],
        "dtype": torch.get_default_dtype(),
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    assert before["grads"].keys() == after["grads"].keys()
    for key, value in before["grads"].items():
        assert torch.equal(value, after["grads"][key]), key
    assert json.dumps(before["optimizer"]["param_groups"]) == json.dumps(
        after["optimizer"]["param_groups"]
    )
    for index, state in before["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, after["optimizer"]["state"][index][key]), (index, key)
    assert before["modes"] == after["modes"]
    assert before["dtype"] == after["dtype"]


def trained_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = mlp(nn.ReLU(), nn.BatchNorm1d(12), nn.Dropout(0.2)).train()
    model[1].eval()  # a mixed-mode model: modes must survive exactly
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        cross_entropy(model, make_batch()).backward()
        optimizer.step()
    cross_entropy(model, make_batch(seed=1)).backward()
    return model, optimizer


def test_analytic_gradient_is_handed_over_one_tensor_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shadow's backward gives each gradient to the check and drops it at once, so a
    float64 copy of the whole gradient is never held (the memory target of a check)."""
    from gradwatch.integrations._shadow import loss as integration

    visit = integration.ShadowGradients.visit
    held: list[int] = []

    def counting_visit(self: Any, names: Any, consume: Any) -> None:
        shadow_params = self.objective.shadow.params.values()

        def count(name: str, gradient: np.ndarray) -> None:
            held.append(sum(p.grad is not None for p in shadow_params))
            consume(name, gradient)

        visit(self, names, count)

    monkeypatch.setattr(integration.ShadowGradients, "visit", counting_visit)
    model = mlp(nn.Tanh())
    result = check_module(model, cross_entropy, make_batch())
    assert result.status == "ok"
    assert len(held) == len(list(model.parameters()))
    assert max(held) == 1


class CachesOnFirstForward(nn.Module):
    """Builds a scale table on its first forward and keeps it, as rotary embeddings do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(5, 3)
        self.table: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            self.table = torch.linspace(0.5, 1.5, 3)
        return self.linear(x) * self.table


@pytest.mark.parametrize("sample", [None, "auto", "directional"])
def test_a_tensor_cached_on_the_first_forward_works_in_the_autograd_pass(sample: Any) -> None:
    """Evaluations run under inference_mode, but not the shadow's first forward: a cached
    tensor built there is used by the backward passes that follow without an error."""
    result = check_module(CachesOnFirstForward(), cross_entropy, make_batch(), sample=sample)
    assert result.status == "ok"


@pytest.mark.parametrize("analytic", ["recompute", "live"])
def test_sparse_embedding_gradients_are_compared_like_dense_ones(analytic: str) -> None:
    """nn.Embedding(sparse=True) gives sparse .grad tensors; they are densified, not an error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    tokens = torch.randint(0, 10, (5, 3))

    def loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x).square().mean()

    loss(model, tokens).backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.is_sparse
    result = check_module(model, loss, tokens, analytic=analytic)  # type: ignore[arg-type]
    assert result.status == "ok"
    # live compares with the model's float32 .grad: float32 roundoff, not float64's
    assert result.ratio < (1e-8 if analytic == "recompute" else 1e-6)


class SharedLayerCheckpointed(nn.Module):
    """One layer applied twice, each time in its own reentrant checkpoint (ALBERT-like):
    autograd accumulates the layer's gradient once per segment."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = torch.utils.checkpoint.checkpoint(
                lambda t: torch.tanh(self.layer(t)), x, use_reentrant=True
            )
        return self.head(x)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("sample", [None, "directional"])
def test_gradient_accumulated_in_parts_is_compared_whole(sample: Any) -> None:
    """A gradient arriving in two accumulations is not streamed half-done: the check runs
    again holding the whole gradient, says so, and agrees with autograd to roundoff."""
    x, y = make_batch()
    result = check_module(
        SharedLayerCheckpointed(), cross_entropy, (x.requires_grad_(), y), sample=sample
    )
    assert result.status == "ok"
    assert result.ratio < 1e-7
    assert any("arrived in parts" in note for note in result.notes)


def test_check_leaves_model_optimizer_and_every_rng_untouched() -> None:
    """Params, grads, BN buffers, optimizer state, modes and python/numpy/torch RNGs."""
    model, optimizer = trained_model()
    before = snapshot(model, optimizer)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    rng_before = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    result = check_module(model, cross_entropy, make_batch(), optimizer=optimizer)
    assert result.status == "ok"
    assert_same(before, snapshot(model, optimizer))
    assert random.getstate() == rng_before[0]
    numpy_after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(rng_before[1], numpy_after, strict=True))
    assert torch.equal(torch.get_rng_state(), rng_before[2])


def test_state_is_restored_when_the_loss_raises() -> None:
    """A loss_fn that fails mid-check (in float64, then in the float32 retry) still leaves
    every RNG and the default dtype alone."""
    model, optimizer = trained_model()
    before = snapshot(model, optimizer)
    torch_rng = torch.get_rng_state()
    calls = 0

    def flaky(m: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        torch.set_default_dtype(torch.float64)
        torch.rand(3)
        if calls >= 5:
            raise RuntimeError("boom")
        return cross_entropy(m, batch)

    with pytest.raises(RuntimeError, match="boom") as raised:
        check_module(model, flaky, make_batch())
    assert "float64 copy first: J on the float64 copy raised RuntimeError: boom" in str(
        raised.value.__notes__
    )
    assert_same(before, snapshot(model, optimizer))
    assert torch.equal(torch.get_rng_state(), torch_rng)


def test_weight_decay_is_described_as_coupled_or_decoupled() -> None:
    """SGD/Adam weight_decay is coupled (in the update), AdamW decoupled; neither in J."""
    params = [nn.Parameter(torch.zeros(2))]
    assert (
        "coupled weight decay (0.01)"
        in weight_decay_notes(torch.optim.SGD(params, lr=0.1, weight_decay=0.01))[0]
    )
    assert (
        "decoupled weight decay (0.01)"
        in weight_decay_notes(torch.optim.AdamW(params, weight_decay=0.01))[0]
    )
    assert "no weight decay" in weight_decay_notes(torch.optim.Adam(params))[0]
    result = check_module(
        mlp(nn.Tanh()),
        cross_entropy,
        make_batch(),
        optimizer=torch.optim.SGD(params, lr=0.1, weight_decay=0.01),
    )
    assert any("coupled weight decay" in note for note in result.notes)


def test_live_mode_compares_the_models_own_grad() -> None:
    """analytic='live' finds a missing zero_grad (gradients accumulated twice)."""
    model = mlp(nn.Tanh())
    batch = make_batch()
    cross_entropy(model, batch).backward()
    assert check_module(model, cross_entropy, batch, analytic="live").status == "ok"
    cross_entropy(model, batch).backward()  # forgot zero_grad
    assert check_module(model, cross_entropy, batch, analytic="live").status == "fail"


# -- plain loop ----------------------------------------------------------------------------


def train_loop(watch: gradwatch.GradWatch | None, steps: int = 5) -> tuple[nn.Module, list[Any]]:
    torch.manual_seed(0)
    model = mlp(nn.ReLU(), nn.Dropout(0.2)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    returned = []
    for step in range(steps):
        batch = make_batch(seed=step)
        optimizer.zero_grad()
        cross_entropy(model, batch).backward()
        if watch is not None:
            returned.append(
                after_backward(watch, step, model, cross_entropy, batch, optimizer=optimizer)
            )
        optimizer.step()
    return model, returned


def test_plain_loop_after_backward_checks_due_steps_and_changes_nothing(tmp_path: Any) -> None:
    """after_backward checks steps 0, 2, 4, writes the report, and training is bit-identical."""
    reference, _ = train_loop(None)
    with gradwatch.GradWatch(every=2, report_dir=tmp_path / "gw") as watch:
        watched, returned = train_loop(watch)
    assert [r is None for r in returned] == [False, True, False, True, False]
    report = gradwatch.load_report(tmp_path / "gw")
    assert [c.step for c in report.checks] == [0, 2, 4]
    assert all(c.status == "ok" for c in report.checks)
    for (name, a), b in zip(
        reference.state_dict().items(), watched.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
