"""GradWatch in a Hugging Face Trainer run: a tiny BERT classifier with a custom head.

The model is a 2-layer ``BertConfig`` sequence classifier built in code (nothing is
downloaded), trained for a few steps on synthetic tokens. Its classification head
is a small linear layer with a hand-written ``autograd.Function``. ``--bug`` plants
a classic mistake in that backward (the bias gradient averaged over the batch
instead of summed): the check raises an alert naming ``classifier.bias``. Without
``--bug`` there is no alert.

    python examples/hf_trainer.py --report-dir /tmp/gw-hf
    python examples/hf_trainer.py --bug --report-dir /tmp/gw-hf-bug
    gradwatch show /tmp/gw-hf-bug

Exit status: 0 without alert, 1 when a check alerted (like ``gradwatch show``).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from gradwatch.integrations.transformers import GradWatch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import gradwatch

VOCAB_SIZE = 100
SEQUENCE_LENGTH = 12


class LinearFunction(torch.autograd.Function):
    """y = x W^T + b with a hand-written backward; ``buggy`` averages the bias gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, buggy: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.buggy = buggy
        return x @ weight.t() + bias

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_bias = grad_output.mean(0) if ctx.buggy else grad_output.sum(0)
        return grad_output @ weight, grad_output.t() @ x, grad_bias, None


class CustomHead(nn.Module):
    """The classifier head: a linear layer through `LinearFunction`."""

    def __init__(self, in_features: int, out_features: int, buggy: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * 0.2)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)
        self.buggy = buggy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LinearFunction.apply(x, self.weight, self.bias, self.buggy)  # type: ignore[no-untyped-call,no-any-return]


def build_model(bug: bool = False, seed: int = 0) -> BertForSequenceClassification:
    """A 2-layer BERT classifier (~20k parameters) with the custom head."""
    torch.manual_seed(seed)
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=SEQUENCE_LENGTH,
        type_vocab_size=1,
        num_labels=3,
    )
    model = BertForSequenceClassification(config)
    model.classifier = CustomHead(config.hidden_size, config.num_labels, buggy=bug)  # type: ignore[assignment,arg-type]
    return model


class SyntheticTokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences; the label is which third of the vocabulary dominates."""

    def __init__(self, size: int = 64, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, VOCAB_SIZE, (size, SEQUENCE_LENGTH), generator=generator)
        self.labels = (self.input_ids.float().mean(1) * 3 / VOCAB_SIZE).long().clamp(0, 2)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": torch.ones(SEQUENCE_LENGTH, dtype=torch.long),
            "labels": self.labels[index],
        }


def training_arguments(output_dir: str, max_steps: int = 4, **overrides: Any) -> TrainingArguments:
    """Arguments for a short CPU run with no checkpoints and no external loggers."""
    options: dict[str, Any] = {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    options.update(overrides)
    return TrainingArguments(**options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bug", action="store_true", help="plant a wrong backward in the head")
    parser.add_argument(
        "--report-dir",
        default="runs/hf_trainer/gradwatch",
        help="where the report goes (kept after the run; a rerun continues it)",
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--every", type=int, default=2)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give

    with tempfile.TemporaryDirectory() as output_dir:
        watch = GradWatch(every=options.every, report_dir=options.report_dir)
        trainer = Trainer(
            model=build_model(bug=options.bug),
            args=training_arguments(output_dir, max_steps=options.steps),
            train_dataset=SyntheticTokens(),
        )
        trainer.add_callback(watch)
        trainer.train()
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
