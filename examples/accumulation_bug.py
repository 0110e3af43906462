"""The gradient-accumulation bug that shipped in the HF Trainer until October 2024, caught.

A tiny GPT-2 (built from a ``GPT2Config``; nothing downloaded) is trained by the real
``Trainer`` with 4 micro-batches per step, on rows of different lengths. ``--bug``
overrides ``compute_loss`` the way the Trainer computed it before the fix
(transformers PRs #34191/#34198): each micro-batch's mean loss divided by the number of
micro-batches. That is not the gradient of the step's mean loss when micro-batches hold
different numbers of tokens. Backprop is right, so a finite-difference check alone passes;
gradwatch's step link compares the optimizer's gradient with the gradient of the step's
loss and raises an alert that says so. Without ``--bug`` (the current Trainer) there is no
alert.

    python examples/accumulation_bug.py --bug
    gradwatch show runs/accumulation_bug/gradwatch

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
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

VOCAB_SIZE = 100
LENGTH = 16
PAD = 0


class Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Token rows of 3 to 16 tokens, right-padded; labels -100 on the padding."""

    def __init__(self, count: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(count):
            length = int(torch.randint(3, LENGTH + 1, (1,), generator=generator))
            ids = torch.full((LENGTH,), PAD)
            ids[:length] = torch.randint(1, VOCAB_SIZE, (length,), generator=generator)
            labels = torch.where(torch.arange(LENGTH) < length, ids, -100)
            mask = (torch.arange(LENGTH) < length).long()
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


class PerMicroBatchMeanTrainer(Trainer):
    """The pre-fix accumulation: mean over each micro-batch, divided by the micro-batches."""

    def compute_loss(  # type: ignore[override]
        self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        outputs = model(**inputs)  # num_items_in_batch ignored: a per-micro-batch mean
        loss = outputs.loss / self.args.gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bug", action="store_true", help="plant the accumulation bug")
    parser.add_argument(
        "--report-dir",
        default="runs/accumulation_bug/gradwatch",
        help="where the report goes (kept after the run; a rerun continues it)",
    )
    parser.add_argument("--steps", type=int, default=4)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=2, n_positions=LENGTH)
    model = GPT2LMHeadModel(config)
    trainer_class = PerMicroBatchMeanTrainer if options.bug else Trainer
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=options.steps,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            learning_rate=1e-3,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        watch = GradWatch(every=2, report_dir=options.report_dir)
        trainer = trainer_class(model=model, args=args, train_dataset=Rows(64))
        trainer.add_callback(watch)
        trainer.train()
    for result in watch.results:
        link = result.step_link
        print(
            f"step {result.step}: {result.status}; backprop ratio {result.ratio:.2e}; "
            + (f"step link ratio {link.ratio:.2e} ({link.status})" if link else "no step link")
        )
    for alert in watch.watch.alerts:
        print(alert.message)
    return 1 if watch.watch.alerts else 0


if __name__ == "__main__":
    raise SystemExit(main())
