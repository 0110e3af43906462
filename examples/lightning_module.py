"""GradWatch in a Lightning run: a small classifier with a hand-written tanh adapter.

The LightningModule is an MLP (a few hundred parameters, dropout, ReLU) on
synthetic data; its first layer is an *adapter* whose tanh is a custom
``autograd.Function``. ``--bug`` plants a classic mistake in that backward (the
derivative of tanh written as ``1 - y`` instead of ``1 - y**2``): the check raises
an alert naming the adapter's tensors
(``adapter.linear.weight``, ``adapter.linear.bias``). Without ``--bug`` there is no alert.

    python examples/lightning_module.py --report-dir /tmp/gw-pl
    python examples/lightning_module.py --bug --report-dir /tmp/gw-pl-bug
    gradwatch show /tmp/gw-pl-bug

Exit status: 0 without alert, 1 when a check alerted (like ``gradwatch show``).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from gradwatch.integrations.lightning import GradWatch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch

IN_FEATURES, HIDDEN, CLASSES = 8, 16, 3


class TanhFunction(torch.autograd.Function):
    """tanh with a hand-written backward; ``buggy`` uses 1 - y instead of 1 - y**2."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, buggy: bool) -> torch.Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        ctx.buggy = buggy
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (y,) = ctx.saved_tensors
        slope = 1 - y if ctx.buggy else 1 - y * y
        return grad_output * slope, None


class Adapter(nn.Module):
    """tanh(x W^T + b) through `TanhFunction`."""

    def __init__(self, in_features: int, out_features: int, buggy: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.buggy = buggy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TanhFunction.apply(self.linear(x), self.buggy)  # type: ignore[no-untyped-call,no-any-return]


class Classifier(pl.LightningModule):
    """adapter -> Linear -> ReLU -> Dropout -> Linear, trained with cross-entropy and SGD."""

    def __init__(self, bug: bool = False, lr: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__()
        self.adapter = Adapter(IN_FEATURES, HIDDEN, buggy=bug)
        self.body = nn.Sequential(
            nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Dropout(dropout), nn.Linear(HIDDEN, CLASSES)
        )
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.adapter(x))  # type: ignore[no-any-return]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, reduce_fx="sum")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


def synthetic_data(size: int = 128, seed: int = 0) -> DataLoader[tuple[torch.Tensor, ...]]:
    """Gaussian points labelled by which of three random directions they lean to."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, IN_FEATURES, generator=generator)
    directions = torch.randn(IN_FEATURES, CLASSES, generator=generator)
    y = (x @ directions).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=generator)


def make_trainer(
    max_steps: int, callbacks: Sequence[pl.Callback], root: str, **options: Any
) -> pl.Trainer:
    """A quiet CPU trainer: no checkpoints, no progress bar, no logger files."""
    settings: dict[str, Any] = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
        "callbacks": list(callbacks),
    }
    settings.update(options)
    return pl.Trainer(**settings)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bug", action="store_true", help="plant a wrong backward in the adapter")
    parser.add_argument(
        "--report-dir",
        default="runs/lightning_module/gradwatch",
        help="where the report goes (kept after the run; a rerun continues it)",
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give

    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as root:
        watch = GradWatch(every=options.every, report_dir=options.report_dir)
        trainer = make_trainer(options.steps, [watch], root)
        trainer.fit(Classifier(bug=options.bug), synthetic_data())
        report_dir = watch.watch.report_dir
        report = gradwatch.load_report(report_dir) if report_dir else None

    for result in watch.results:
        worst = result.worst[0].name if result.worst else "-"
        print(
            f"step {result.step}: {result.status} ratio={result.ratio:.2e} "
            f"checked={result.checked}/{result.size} worst={worst}"
        )
    for alert in watch.watch.alerts:
        print(f"ALERT {alert.message}")
    if report is not None:
        print(f"report: {report_dir} ({len(report.checks)} checks)")
    return 1 if watch.watch.alerts else 0


if __name__ == "__main__":
    raise SystemExit(main())
