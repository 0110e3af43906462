"""The Lightning callback on a small LightningModule (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from gradwatch.integrations.lightning import GradWatch  # noqa: E402

import gradwatch  # noqa: E402
from examples import lightning_module as example  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]


class RecordingClassifier(example.Classifier):
    """Keeps every training loss it computes (the check's copy keeps its own list)."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss.detach()))
        return loss


def fit(root: Path, callbacks: list[Any], **options: Any) -> tuple[Any, RecordingClassifier]:
    pl.seed_everything(0, verbose=False)
    module = RecordingClassifier()
    trainer = example.make_trainer(options.pop("max_steps", 6), callbacks, str(root), **options)
    trainer.fit(module, example.synthetic_data())
    return trainer, module


def test_trajectory_is_bit_identical_and_shadow_logs_stay_out(tmp_path: Path) -> None:
    """GradWatch(every=2) changes no weight, no loss and no metric the module logs."""
    reference_trainer, reference = fit(tmp_path / "plain", [])
    watch = GradWatch(every=2)
    trainer, watched = fit(tmp_path / "watched", [watch])
    for (name, a), b in zip(
        reference.state_dict().items(), watched.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert watched.losses == reference.losses and len(watched.losses) == 6
    # train_loss is summed over the epoch: a shadow self.log would have added to it
    assert torch.equal(
        trainer.callback_metrics["train_loss_epoch"],
        reference_trainer.callback_metrics["train_loss_epoch"],
    )
    assert [r.step for r in watch.results] == [0, 2, 4]
    assert all(r.status == "ok" for r in watch.results)
    assert trainer.callback_metrics["gradwatch/status"] == 0.0
    assert float(trainer.callback_metrics["gradwatch/ratio"]) == pytest.approx(
        watch.results[-1].ratio
    )
    assert any("coupled weight decay" in note for note in watch.results[0].notes)
    report = gradwatch.load_report(tmp_path / "watched" / "gradwatch")
    assert [c.step for c in report.checks] == [0, 2, 4]


def test_accumulation_and_user_loss_fn(tmp_path: Path) -> None:
    """With accumulate_grad_batches the report says so; a user loss_fn gives J."""
    calls = []

    def loss_fn(module: Any, batch: Any) -> Any:
        calls.append(1)
        x, y = batch
        return torch.nn.functional.cross_entropy(module(x), y)

    watch = GradWatch(every=1, loss_fn=loss_fn)
    fit(tmp_path, [watch], max_steps=2, accumulate_grad_batches=2)
    assert [r.step for r in watch.results] == [0, 1]
    assert calls and all(r.status == "ok" for r in watch.results)
    notes = " ".join(watch.results[0].notes)
    assert "last micro-batch" in notes and "user loss_fn" in notes


def test_example_with_planted_bug_alerts_on_the_adapter(tmp_path: Path, capsys: Any) -> None:
    """examples/lightning_module.py --bug alerts and names the adapter; without it, no alert."""
    args = ["--steps", "1", "--report-dir"]
    assert example.main(["--bug", *args, str(tmp_path / "bug")]) == 1
    out = capsys.readouterr().out
    assert "ALERT" in out and "adapter.linear.weight" in out
    report = gradwatch.load_report(tmp_path / "bug")
    assert report.checks[0].tensors["adapter.linear.weight"].status == "fail"
    assert report.checks[0].tensors["body.3.weight"].status == "ok"
    assert example.main([*args, str(tmp_path / "ok")]) == 0
    assert "ALERT" not in capsys.readouterr().out


def test_step_link_over_an_accumulation_window(tmp_path: Path) -> None:
    """accumulate_grad_batches=4: the step link covers the 4 micro-batches and passes, the
    report says what Lightning optimizes; a hook scaling one gradient fails it, named."""
    watch = GradWatch(every=1)
    fit(tmp_path / "ok", [watch], max_steps=2, accumulate_grad_batches=4)
    links = [r.step_link for r in watch.results]
    assert all(link is not None and link.micro_batches == 4 for link in links)
    assert [r.status for r in watch.results] == ["ok", "ok"], [link.ratio for link in links if link]
    assert any("Lightning optimizes the sum over 4" in n for n in watch.results[0].notes)

    class Hooked(RecordingClassifier):
        def __init__(self) -> None:
            super().__init__()
            first = next(self.parameters())
            first.register_hook(lambda g: g * 1.1)

    pl.seed_everything(0, verbose=False)
    hooked = GradWatch(every=1)
    trainer = example.make_trainer(1, [hooked], str(tmp_path / "hooked"), accumulate_grad_batches=2)
    module = Hooked()
    trainer.fit(module, example.synthetic_data())
    (result,) = hooked.results
    assert result.step_link is not None and result.step_link.status == "fail"
    assert result.step_link.worst_tensor == next(n for n, _ in module.named_parameters())
