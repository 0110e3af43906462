"""A resumed Hugging Face or Lightning run continues its report (tiny models, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def test_transformers_resume_from_checkpoint_continues_the_report(tmp_path: Path) -> None:
    """train(resume_from_checkpoint=True) after a run checkpointed at step 4 keeps steps 0..7."""
    pytest.importorskip("accelerate")
    from gradwatch.integrations.transformers import GradWatch
    from transformers import Trainer

    from tests.integrations.bert import bert_trainer

    def trainer(max_steps: int, callback: GradWatch) -> Trainer:
        built = bert_trainer(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=4)
        built.add_callback(callback)
        return built

    trainer(4, GradWatch(every=1)).train()
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    state = saved["stateful_callbacks"]["TrainerGradWatch"]["attributes"]["_saved_state"]
    assert state["report_dir"] == str(tmp_path / "gradwatch") and state["checks"] == 4
    trainer(8, GradWatch(every=1)).train(resume_from_checkpoint=True)
    report = gradwatch.load_report(tmp_path / "gradwatch")
    assert report.steps == list(range(8))
    assert report.check_runs == [0] * 4 + [1] * 4
    assert report.runs[1].resumed == "a checkpoint at step 4 (transformers resume_from_checkpoint)"
    assert all(check.status == "ok" for check in report.checks)


def test_lightning_ckpt_path_continues_the_report_of_the_checkpointed_run(tmp_path: Path) -> None:
    """fit(ckpt_path=...) writes to the checkpointed run's report, not a new logger version's."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatch
    from lightning.pytorch.loggers import CSVLogger

    from examples import lightning_module as example

    def fit(max_steps: int, ckpt_path: str | None = None) -> object:
        pl.seed_everything(0, verbose=False)
        trainer = example.make_trainer(
            max_steps, [GradWatch(every=2)], str(tmp_path), logger=CSVLogger(str(tmp_path))
        )
        trainer.fit(example.Classifier(), example.synthetic_data(), ckpt_path=ckpt_path)
        return trainer

    first = fit(4)
    checkpoint = tmp_path / "step4.ckpt"
    first.save_checkpoint(checkpoint)  # type: ignore[attr-defined]
    fit(8, str(checkpoint))
    report_dir = tmp_path / "lightning_logs" / "version_0" / "gradwatch"
    assert not (tmp_path / "lightning_logs" / "version_1" / "gradwatch").exists()
    report = gradwatch.load_report(report_dir)
    assert report.steps == [0, 2, 4, 6]
    assert report.check_runs == [0, 0, 1, 1]
    assert report.runs[1].resumed == "a checkpoint at step 4 (lightning ckpt_path)"
