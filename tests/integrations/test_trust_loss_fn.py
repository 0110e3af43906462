"""A ``loss_fn`` that closes over the real model instead of its argument checks nothing.

``loss_fn=lambda m, b: F.mse_loss(model(b[0]), b[1])`` ignores gradwatch's copy: J on
the copy is flat and its gradient zero, which once read ``ok`` (zeros against zeros)
while every evaluation ran the real model (BatchNorm statistics, ``.grad``). It is an
``error`` naming the cause now, and the real model is untouched.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from gradwatch.integrations.torch import after_backward, check_module  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.errors import LossError  # noqa: E402

pytestmark = pytest.mark.torch

CAUSE = "did not use it"


def batchnorm_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator)


def snapshot(model: nn.Module) -> tuple[dict[str, Tensor], list[Tensor | None]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def same(a: tuple[dict[str, Tensor], list[Tensor | None]], model: nn.Module) -> bool:
    state, grads = snapshot(model)
    return all(torch.equal(a[0][k], v) for k, v in state.items()) and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a[1], grads, strict=True)
    )


def test_check_module_refuses_a_loss_that_runs_the_real_model() -> None:
    """The slip is a LossError naming the cause; weights, .grad and running stats unchanged."""
    model = batchnorm_net()
    x, y = data()
    F.mse_loss(model(x), y).backward()
    before = snapshot(model)
    with pytest.raises(LossError, match=CAUSE):
        check_module(model, lambda m, b: F.mse_loss(model(b[0]), b[1]), (x, y))
    assert same(before, model)
    assert all(p.requires_grad for p in model.parameters())


def test_check_module_refuses_a_loss_that_reads_the_real_weights() -> None:
    """A loss built from the real model's tensors (no module call) is flat on the copy: an
    error too, and the real .grad gets nothing."""
    model = batchnorm_net()
    x, y = data()
    F.mse_loss(model(x), y).backward()
    before = snapshot(model)

    first = model[0]
    assert isinstance(first, nn.Linear)

    def loss_fn(m: nn.Module, batch: Any) -> Tensor:
        return F.linear(batch[0], first.weight).square().mean()

    with pytest.raises(LossError, match=CAUSE):
        check_module(model, loss_fn, (x, y))
    assert same(before, model)


def train_plain_loop(loss_fn: Any, watch: gradwatch.GradWatch | None) -> nn.Module:
    model = batchnorm_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    for step in range(3):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        if watch is not None:
            after_backward(watch, step, model, loss_fn(model), (x, y), optimizer=optimizer)
        optimizer.step()
    return model


def test_plain_loop_slip_is_an_error_and_training_is_bit_identical(tmp_path: Path) -> None:
    """after_backward with the slip records error checks that say why; the run's weights and
    BatchNorm statistics are bit-identical to a run without gradwatch."""

    def closing_over(real: nn.Module) -> Any:
        return lambda m, b: F.mse_loss(real(b[0]), b[1])

    plain = train_plain_loop(closing_over, None)
    watch = gradwatch.GradWatch(every=1, report_dir=tmp_path)
    watched = train_plain_loop(closing_over, watch)
    assert [r.status for r in watch.results] == ["error"] * 3
    assert all(CAUSE in (r.error or "") for r in watch.results)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_trainer_slip_is_an_error_and_training_is_bit_identical() -> None:
    """HF Trainer with GradWatch(loss_fn=...) closing over the model: error checks naming
    the cause, and the same weights as a run without gradwatch."""
    pytest.importorskip("transformers")
    from gradwatch.integrations.transformers import GradWatch
    from transformers import Trainer

    from benchmarks.architectures import training_arguments
    from benchmarks.hf_models import ARCHITECTURES

    def run(watched: bool) -> tuple[nn.Module, list[Any]]:
        model, examples = ARCHITECTURES["bert-cls"].build()
        with tempfile.TemporaryDirectory() as output_dir:
            args = training_arguments(output_dir, 2, seed=0)
            trainer = Trainer(model=model, args=args, train_dataset=examples)
            watch = GradWatch(every=1, loss_fn=lambda m, inputs: model(**inputs).loss)
            if watched:
                trainer.add_callback(watch)
            trainer.train()
        return model, watch.results if watched else []

    plain, _ = run(False)
    watched, results = run(True)
    assert [r.status for r in results] == ["error", "error"]
    assert all(CAUSE in (r.error or "") for r in results)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_lightning_slip_is_an_error(tmp_path: Path) -> None:
    """Lightning with a loss_fn closing over the module: error checks naming the cause, and
    the same weights as a fit without gradwatch."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatch

    from examples import lightning_module as example

    def fit(watched: bool) -> tuple[nn.Module, list[Any]]:
        pl.seed_everything(0, verbose=False)
        module = example.Classifier()
        watch = GradWatch(every=1, loss_fn=lambda m, b: F.cross_entropy(module(b[0]), b[1]))
        trainer = example.make_trainer(2, [watch] if watched else [], str(tmp_path / str(watched)))
        trainer.fit(module, example.synthetic_data())
        return module, watch.results if watched else []

    plain, _ = fit(False)
    watched, results = fit(True)
    assert [r.status for r in results] == ["error", "error"]
    assert all(CAUSE in (r.error or "") for r in results)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_flat_objective_is_never_ok() -> None:
    """J that does not move with the parameters and has a zero gradient (the loss times 0)
    checked nothing: an error saying so, not ok with ratio 0."""
    model = batchnorm_net()
    x, y = data()
    with pytest.raises(LossError, match="nothing was checked"):
        check_module(model, lambda m, b: F.mse_loss(m(b[0]), b[1]) * 0, (x, y))
