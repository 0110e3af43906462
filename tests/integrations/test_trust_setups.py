"""Checks that hold on the training setups people use: checkpointing, label smoothing, bf16.

Each test trains a tiny model from `benchmarks.hf_setups` with the real Trainer (or
Lightning) and ``GradWatch(every=1)``; before each fix every check was ``error`` or the
step link a false ``warn``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gradwatch.integrations._step import STEP_TOLERANCES  # noqa: E402
from gradwatch.integrations.transformers import GradWatch  # noqa: E402
from transformers import Trainer  # noqa: E402

from benchmarks.architectures import training_arguments  # noqa: E402
from benchmarks.hf_setups import SETUPS  # noqa: E402
from gradwatch.result import CheckResult  # noqa: E402

pytestmark = pytest.mark.torch


def train(
    name: str, *, pass_trainer: bool = False, steps: int = 2, **arguments: Any
) -> list[CheckResult]:
    """Train setup ``name`` with GradWatch(every=1) and return its checks."""
    setup = SETUPS[name]
    model, data = setup.build()
    with tempfile.TemporaryDirectory() as output_dir:
        args = dataclasses.replace(
            training_arguments(output_dir, steps, seed=0), **{**setup.arguments, **arguments}
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        watch = GradWatch(every=1, trainer=trainer if pass_trainer else None)
        trainer.add_callback(watch)
        trainer.train()
    assert len(watch.results) == steps
    return watch.results


def test_gradient_checkpointing_on_llama_is_checked() -> None:
    """Llama with gradient_checkpointing=True: every check ok and its step link too (before:
    CheckpointError, the recompute casting to float32 what the forward saved in float64)."""
    for result in train("llama-checkpointing"):
        assert result.status == "ok", result.notes
        assert result.step_link is not None and result.step_link.status == "ok"


@pytest.mark.parametrize("name", ["llama-label-smoothing", "bert-label-smoothing"])
def test_label_smoothing_checks_the_trainers_loss(name: str) -> None:
    """With label_smoothing_factor=0.1 J is the Trainer's smoothed loss: the check runs and
    the optimizer's gradient is the gradient of that J (step link at roundoff)."""
    for result in train(name, pass_trainer=True):
        assert result.status == "ok", result.notes
        link = result.step_link
        assert link is not None and link.ratio < 1e-5
        assert any("label-smoothed" in note for note in result.notes)


def test_label_smoothing_under_accumulation_weights_micro_batches_as_the_trainer() -> None:
    """GPT-2 with smoothing and 2 micro-batches per step: the step link holds at roundoff."""
    for result in train("gpt2-accumulation-smoothing", pass_trainer=True):
        link = result.step_link
        assert link is not None and link.micro_batches == 2 and link.ratio < 1e-5


def test_bf16_autocast_under_the_trainer_sets_the_step_tolerances() -> None:
    """bf16=True: accelerate's autocast (entered inside the wrapped forward) is seen, the step
    link is judged with bfloat16 tolerances and holds (before: float32 ones, a false warn)."""
    for result in train("llama-bf16"):
        link = result.step_link
        assert link is not None
        assert (link.warn, link.threshold) == STEP_TOLERANCES[torch.bfloat16]
        assert result.status == "ok" and link.status == "ok"
        assert link.ratio > 1e-4  # bf16 roundoff is really there


def test_bf16_mixed_under_lightning_sets_the_step_tolerances(tmp_path: Path) -> None:
    """Lightning precision='bf16-mixed': the step link follows bfloat16 and no check alarms."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatch as LightningWatch

    from examples import lightning_module as example

    pl.seed_everything(0, verbose=False)
    watch = LightningWatch(every=1)
    trainer = example.make_trainer(3, [watch], str(tmp_path), precision="bf16-mixed")
    trainer.fit(example.Classifier(), example.synthetic_data())
    for result in watch.results:
        link = result.step_link
        assert link is not None
        assert (link.warn, link.threshold) == STEP_TOLERANCES[torch.bfloat16]
        assert result.status == "ok", result.notes


def test_a_scale_of_one_is_never_blamed_on_accumulation() -> None:
    """A step link whose optimizer gradient is 0.998x J's (bf16 noise) and one tensor off is
    explained by that tensor, not by a loss divided twice."""
    from gradwatch.integrations._step import LinkSums, judged_link

    optimizer, objective = {"a": [0.998, 0.0], "b": [0.02]}, {"a": [1.0, 0.0], "b": [0.01]}

    def total(f: Any) -> dict[str, float]:
        return {
            k: sum(f(x, y) for x, y in zip(optimizer[k], objective[k], strict=True))
            for k in optimizer
        }

    sums = LinkSums(
        difference=total(lambda x, y: (x - y) ** 2),
        optimizer=total(lambda x, y: x * x),
        objective=total(lambda x, y: y * y),
        dot=total(lambda x, y: x * y),
    )
    warn, threshold = STEP_TOLERANCES[torch.bfloat16]
    link = judged_link(sums, warn, threshold, 1, 1.0)
    assert link.status == "fail"
    assert "divided" not in link.explanation and "accumulation" not in link.explanation
    assert "differs in b only" in link.explanation
