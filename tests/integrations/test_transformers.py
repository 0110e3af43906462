"""The Hugging Face Trainer callback on a tiny 2-layer BERT built from a config (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradwatch.integrations.transformers import GradWatch  # noqa: E402
from transformers import Trainer  # noqa: E402

import gradwatch  # noqa: E402
from examples import hf_trainer  # noqa: E402
from tests.integrations.bert import bert_trainer  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def run(
    tmp_path: Path, callback: Any = None, trainer_class: type[Trainer] = Trainer, **args: Any
) -> tuple[Trainer, Any]:
    trainer = bert_trainer(tmp_path, trainer_class=trainer_class, **args)
    if callable(callback) and not isinstance(callback, GradWatch):
        callback = callback(trainer)  # a factory: GradWatch(trainer=trainer, ...)
    if callback is not None:
        trainer.add_callback(callback)
    trainer.train()
    return trainer, callback


def losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trajectory_is_bit_identical_and_metrics_reach_the_logs(tmp_path: Path) -> None:
    """GradWatch(every=2) checks steps 0 and 2, logs its metrics and changes no weight."""
    reference, _ = run(tmp_path / "plain")
    watched, watch = run(tmp_path / "watched", GradWatch(every=2))
    for (name, a), b in zip(
        cast(Any, reference.model).state_dict().items(),
        cast(Any, watched.model).state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
    assert losses(reference) == losses(watched) and len(losses(watched)) == 4
    assert [r.step for r in watch.results] == [0, 2]
    assert all(r.status == "ok" for r in watch.results), [r.ratio for r in watch.results]
    logged = [e for e in watched.state.log_history if "gradwatch/ratio" in e]
    assert [e["step"] for e in logged] == [0, 2]
    assert logged[0]["gradwatch/status"] == 0.0
    report = gradwatch.load_report(tmp_path / "watched" / "gradwatch")
    assert [c.step for c in report.checks] == [0, 2]
    assert not cast(Any, watched.model)._forward_pre_hooks  # hook removed at train end


def test_add_callback_with_the_class(tmp_path: Path) -> None:
    """trainer.add_callback(GradWatch) (the class) checks step 0 with the defaults."""
    trainer = bert_trainer(tmp_path, max_steps=1)
    trainer.add_callback(GradWatch)
    trainer.train()
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, GradWatch)]
    assert [r.step for r in callback.results] == [0]
    assert (tmp_path / "gradwatch" / "checks.jsonl").exists()


def test_gradient_accumulation_checks_the_last_micro_batch(tmp_path: Path) -> None:
    """With accumulation, the report says the check covers the last micro-batch."""
    _, watch = run(tmp_path, GradWatch(every=1), max_steps=1, gradient_accumulation_steps=2)
    (result,) = watch.results
    assert result.status == "ok"
    assert any("last micro-batch" in note for note in result.notes)
    summary = gradwatch.load_report(tmp_path / "gradwatch")
    assert summary.checks[0].notes == result.notes


class SmoothedLossTrainer(Trainer):
    def compute_loss(self, model: Any, inputs: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)


def smoothed_loss(model: Any, inputs: dict[str, Any]) -> Any:
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    logits = model(**inputs).logits
    return torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)


def test_loss_computed_otherwise_is_reported_and_loss_fn_gives_j(tmp_path: Path) -> None:
    """Label smoothing / an overridden compute_loss (of a Trainer passed in) are noted; a user
    loss_fn is J; without one or the trainer, label smoothing at default options is still
    checked (J a fixed projection of the logits, said in the notes), never an error, and a
    planted backward bug under it is still caught."""
    _, watch = run(tmp_path / "smooth", GradWatch(every=1), max_steps=1, label_smoothing_factor=0.1)
    (result,) = watch.results
    assert result.status == "ok", (result.status, result.error)
    assert any("fixed projection of the model's logits" in note for note in result.notes)
    bugged = bert_trainer(
        tmp_path / "smooth-bug", bug=True, max_steps=1, label_smoothing_factor=0.1
    )
    watch = GradWatch(every=1)
    bugged.add_callback(watch)
    bugged.train()
    (result,) = watch.results
    assert result.status == "fail" and result.localization is not None
    assert result.localization.suspects[0].module.startswith("classifier"), result.localization
    _, watch = run(
        tmp_path / "smooth-fn",
        lambda trainer: GradWatch(every=1, loss_fn=smoothed_loss, trainer=trainer),
        max_steps=1,
        label_smoothing_factor=0.1,
    )
    (result,) = watch.results
    assert result.status == "ok"
    notes = " ".join(result.notes)
    assert "label smoothing 0.1" in notes and "J is the user loss_fn" in notes

    _, watch = run(
        tmp_path / "override",
        lambda trainer: GradWatch(every=1, loss_fn=smoothed_loss, trainer=trainer),
        trainer_class=SmoothedLossTrainer,
        max_steps=1,
    )
    (result,) = watch.results
    assert result.status == "ok"
    notes = " ".join(result.notes)
    assert "SmoothedLossTrainer.compute_loss overridden" in notes and "user loss_fn" in notes


class BypassForwardTrainer(Trainer):
    def compute_loss(self, model: Any, inputs: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        labels = inputs.pop("labels")
        pooled = model.bert(**inputs).pooler_output  # model.forward itself never runs
        return torch.nn.functional.cross_entropy(model.classifier(pooled), labels)


def test_missing_batch_is_a_clear_error(tmp_path: Path) -> None:
    """A due step whose model.forward never ran raises MissingBatchError."""
    with pytest.raises(gradwatch.MissingBatchError, match="step 0: expected the inputs"):
        run(tmp_path, GradWatch(every=1), trainer_class=BypassForwardTrainer, max_steps=1)


def test_example_with_planted_bug_alerts_on_the_head(tmp_path: Path, capsys: Any) -> None:
    """examples/hf_trainer.py --bug alerts and names the head (its custom autograd.Function
    drops a bias term) with the wrong side; without it, no alert."""
    assert hf_trainer.main(["--bug", "--steps", "1", "--report-dir", str(tmp_path / "bug")]) == 1
    out = capsys.readouterr().out
    assert "ALERT" in out and "the bug is in the backward of classifier (CustomHead" in out
    report = gradwatch.load_report(tmp_path / "bug")
    assert report.checks[0].status == "fail"
    assert [alert.module for alert in report.alerts] == ["classifier"]
    localization = report.checks[0].localization
    assert localization is not None
    assert [(s.module, s.side) for s in localization.suspects] == [("classifier", "parameter")]
    assert hf_trainer.main(["--steps", "1", "--report-dir", str(tmp_path / "ok")]) == 0
    assert "ALERT" not in capsys.readouterr().out


def bert_batch() -> dict[str, Any]:
    data = hf_trainer.SyntheticTokens(size=8)
    return {key: torch.stack([data[i][key] for i in range(8)]) for key in data[0]}


def bert_loss(model: Any, batch: dict[str, Any]) -> Any:
    return model(**batch).loss


@pytest.mark.parametrize("sample", ["directional", "auto"])
def test_native_float32_directions_judge_errors_against_roundoff(sample: str) -> None:
    """In float32 a direction resolves J only to about eps |J| / h: the correct BERT (dropout
    on) is quiet in native precision, and the planted head bug still fails on its tensor."""
    from gradwatch.integrations.torch import check_module

    clean = check_module(
        hf_trainer.build_model(), bert_loss, bert_batch(), precision="native", sample=sample
    )
    assert clean.status == "ok", {n: t.ratio for n, t in clean.tensors.items() if t.status != "ok"}
    buggy = check_module(
        hf_trainer.build_model(bug=True), bert_loss, bert_batch(), precision="native", sample=sample
    )
    assert buggy.status == "fail"
    assert "classifier.bias" in {n for n, t in buggy.tensors.items() if t.status == "fail"}


def test_failing_tensors_reach_the_trainer_logs(tmp_path: Path) -> None:
    """With the planted head bug, the named module's local ratio is logged next to the global
    one (gradwatch/module/<path>), so a dashboard shows where."""
    trainer = bert_trainer(tmp_path, bug=True, max_steps=1)
    trainer.add_callback(GradWatch(every=1, trainer=trainer))
    trainer.train()
    (logged,) = [e for e in trainer.state.log_history if "gradwatch/ratio" in e]
    assert logged["gradwatch/module/classifier"] > 1e-3
    assert "gradwatch/step_ratio" in logged
