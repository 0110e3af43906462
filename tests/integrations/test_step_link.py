"""The training step's link: the optimizer's gradient against the gradient of the step's J.

Real Trainer runs of a tiny GPT-2 from `benchmarks.hf_models` (right-padded rows of
different lengths, dropout on), with gradient accumulation where it matters.
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any, cast

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gradwatch.integrations.transformers import GradWatch  # noqa: E402
from transformers import Trainer  # noqa: E402

from benchmarks.architectures import training_arguments  # noqa: E402
from benchmarks.hf_models import ARCHITECTURES  # noqa: E402

pytestmark = pytest.mark.torch


class PerMicroBatchMeanTrainer(Trainer):
    """The pre-October-2024 accumulation bug: each micro-batch's token mean divided by the
    accumulation steps, ignoring ``num_items_in_batch`` (the step's token count)."""

    def compute_loss(  # type: ignore[override]
        self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        outputs = model(**inputs)  # no num_items_in_batch: the model averages per micro-batch
        loss = outputs.loss / self.args.gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss


def train(
    watch: GradWatch,
    *,
    trainer_class: type[Trainer] = Trainer,
    accumulation: int = 1,
    steps: int = 2,
    hook: bool = False,
    **arguments: Any,
) -> list[Any]:
    """Train the tiny GPT-2 with `watch` (every step) and return the recorded checks."""
    model, data = ARCHITECTURES["gpt2"].build()
    if hook:  # a gradient hook scaling one tensor's gradient by 1.1
        cast(Any, model).transformer.h[1].mlp.c_proj.weight.register_hook(lambda g: g * 1.1)
    with tempfile.TemporaryDirectory() as output_dir:
        args = training_arguments(output_dir, steps, seed=0)
        args = dataclasses.replace(
            args, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation
        )
        for name, value in arguments.items():
            setattr(args, name, value)
        trainer = trainer_class(model=model, args=args, train_dataset=data)
        trainer.add_callback(watch)
        trainer.train()
    return watch.results


def test_accumulation_normalized_per_micro_batch_is_caught_as_a_step_bug() -> None:
    """A compute_loss that averages each micro-batch and divides by the accumulation steps
    (micro-batches of different token counts) fails the step link, not backprop."""
    (result, *_) = train(GradWatch(every=1), trainer_class=PerMicroBatchMeanTrainer, accumulation=2)
    link = result.step_link
    assert link is not None and link.micro_batches == 2
    assert link.status == "fail", link
    assert result.status == "fail"
    assert result.ratio < 1e-5  # backprop itself is right
    assert "accumulation normalized per micro-batch" in link.explanation


def test_the_current_trainer_with_accumulation_passes_the_step_link() -> None:
    """The Trainer's own loss (num_items_in_batch for the whole step), 2 micro-batches with
    dropout replayed: the optimizer's gradient is the gradient of J."""
    results = train(GradWatch(every=1), accumulation=2)
    assert [r.status for r in results] == ["ok", "ok"]
    assert all(r.step_link is not None and r.step_link.ratio < 1e-5 for r in results)
    assert all(r.step_link.micro_batches == 2 for r in results if r.step_link)


def test_a_hook_scaling_one_gradient_is_named() -> None:
    """A tensor hook scaling one weight's gradient by 1.1: the alert names that tensor."""
    watch = GradWatch(every=1)
    (result, *_) = train(watch, hook=True, steps=1)
    link = result.step_link
    assert link is not None and link.status == "fail"
    assert link.worst_tensor == "transformer.h.1.mlp.c_proj.weight"
    (alert,) = watch.watch.alerts
    assert alert.rule == "step" and alert.tensor == "transformer.h.1.mlp.c_proj.weight"
    assert "backprop is right" in alert.message


def test_clipping_at_every_step_is_undone_not_reported() -> None:
    """max_grad_norm far below the gradient's norm clips every step: no alert, the clip
    factor recorded."""
    results = train(GradWatch(every=1), max_grad_norm=1e-3)
    assert [r.status for r in results] == ["ok", "ok"]
    assert all(r.step_link is not None and r.step_link.clip_factor < 0.1 for r in results)


def test_a_plain_loop_without_zero_grad_fails_the_step_link_from_the_second_check() -> None:
    """Gradients summed across steps (no zero_grad): the first check passes, every later one
    fails the step link, and the explanation points at zero_grad."""
    from gradwatch.integrations.torch import RngState, after_backward

    import gradwatch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(m: Any, batch: Any) -> Any:
        x, y = batch
        return torch.nn.functional.cross_entropy(m(x), y)

    watch = gradwatch.GradWatch(every=1, report_dir=None)
    for step in range(3):
        batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
        rng = RngState.capture()
        loss_fn(model, batch).backward()  # bug: no optimizer.zero_grad()
        after_backward(watch, step, model, loss_fn, batch, step_check=True, rng=rng)
        optimizer.step()
    links = [r.step_link for r in watch.results]
    assert [link.status for link in links if link] == ["ok", "fail", "fail"]
    assert [r.status for r in watch.results] == ["ok", "fail", "fail"]
    assert "zero_grad" in links[1].explanation  # type: ignore[union-attr]


def test_accumulation_example_alerts_only_with_the_bug(tmp_path: Any, capsys: Any) -> None:
    """examples/accumulation_bug.py exits 1 with --bug (a step-link alert), 0 without; on the
    bug's report `gradwatch show` says the step link broke while backprop is right."""
    from examples.accumulation_bug import main
    from gradwatch.cli import main as cli

    assert main(["--bug", "--report-dir", str(tmp_path / "bug")]) == 1
    assert main(["--report-dir", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    assert cli(["show", str(tmp_path / "bug")]) == 1
    shown = capsys.readouterr().out
    assert "rule: fail by the step link" in shown
    assert "next: backprop is right, the training step is not" in shown


def test_bf16_autocast_training_is_judged_at_bf16_tolerances() -> None:
    """A training forward under bf16 autocast is seen by the batch capture, and the step link
    then follows bf16's tolerances: no alert on bf16 roundoff that float32's would flag."""
    from gradwatch.integrations._step import STEP_TOLERANCES, MicroBatch, compare_step
    from gradwatch.integrations.torch import BatchCapture

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))

    def loss_fn(m: Any, batch: Any) -> Any:
        return torch.nn.functional.cross_entropy(m(batch[0]).float(), batch[1])

    capture = BatchCapture(model)
    capture.armed = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(model, (x, y)).backward()
    assert capture.autocast == torch.bfloat16
    as_bf16 = compare_step(model, loss_fn, [MicroBatch((x, y), autocast=capture.autocast)])
    as_float32 = compare_step(model, loss_fn, [MicroBatch((x, y))])
    capture.remove()
    assert as_bf16.status == "ok", as_bf16.ratio
    assert as_bf16.threshold == STEP_TOLERANCES[torch.bfloat16][1]
    assert as_float32.ratio > as_float32.warn  # bf16 roundoff is visible at float32 tolerances


@pytest.mark.parametrize("unscale", [True, False])
def test_a_grad_scaler_loop_passes_only_when_it_unscales(unscale: bool) -> None:
    """A GradScaler loop that unscales before the check passes; one that does not fails the
    step link with the loss scale named."""
    from gradwatch.integrations.torch import after_backward

    import gradwatch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def loss_fn(m: Any, batch: Any) -> Any:
        x, y = batch
        return torch.nn.functional.cross_entropy(m(x), y)

    watch = gradwatch.GradWatch(every=1, report_dir=None)
    batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    optimizer.zero_grad()
    scaler.scale(loss_fn(model, batch)).backward()
    if unscale:
        scaler.unscale_(optimizer)
    result = after_backward(watch, 0, model, loss_fn, batch, step_check=True)
    assert result is not None and result.step_link is not None
    if unscale:
        assert result.status == "ok"
    else:
        assert result.status == "fail" and "AMP loss scale" in result.step_link.explanation
        assert result.step_link.scale == pytest.approx(2.0**10)
