"""Runs with the HF Trainer and Lightning: a rerun after the fix is clean, a resume is one run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402
from gradwatch.cli import main  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]


@contextmanager
def lines_of(logger_name: str) -> Iterator[list[str]]:
    """The messages `logger_name` emits at INFO and above while the block runs."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler, level = Keep(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def hf_train(output_dir: Path, *, bug: bool, resume: bool = False, max_steps: int = 2) -> Any:
    pytest.importorskip("accelerate")
    from gradwatch.integrations.transformers import GradWatch

    from tests.integrations.bert import bert_trainer

    trainer = bert_trainer(
        output_dir, bug=bug, max_steps=max_steps, save_strategy="steps", save_steps=2
    )
    trainer.add_callback(GradWatch(every=1))
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer


def test_hf_rerun_after_the_fix_is_clean_in_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug run then fixed run into one output_dir: show on it and on its report exits 0."""
    hf_train(tmp_path, bug=True)
    with lines_of("transformers.integrations.gradwatch") as said:
        hf_train(tmp_path, bug=False)
    report_dir = tmp_path / "gradwatch"
    assert said[0] == (
        f"gradwatch: checking the gradient every 1 step; report in {report_dir} "
        "(run 2 there; gradwatch show reads the latest run)"
    )
    worst = max(check.ratio for check in gradwatch.load_report(report_dir, run=2).checks)
    assert said[-1] == (
        f"gradwatch: 2 checks, no alert (ratio at most {worst:.1e}); gradwatch show {report_dir}"
    )
    for typed in (tmp_path, report_dir):
        assert main(["show", str(typed)]) == 0
        out = capsys.readouterr().out
        assert "alerts: none" in out and "run 2 of 2 (the latest)" in out
    assert main(["show", str(tmp_path), "--run", "1"]) == 1


def test_hf_resume_continues_the_run(tmp_path: Path) -> None:
    """resume_from_checkpoint adds its checks to the run it resumes: one run of 4 checks."""
    hf_train(tmp_path, bug=False)
    hf_train(tmp_path, bug=False, resume=True, max_steps=4)
    report = gradwatch.load_report(tmp_path / "gradwatch", run="latest")
    assert report.steps == [0, 1, 2, 3] and len(report.run_summaries) == 1


def test_lightning_says_where_the_report_is_and_the_verdict(tmp_path: Path) -> None:
    """fit() logs the report's place at train start and a one-line verdict at the end."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatch

    from examples import lightning_module as example

    pl.seed_everything(0, verbose=False)
    trainer = example.make_trainer(2, [GradWatch(every=1)], str(tmp_path))
    with lines_of("lightning.pytorch.utilities.rank_zero") as said:
        trainer.fit(example.Classifier(), example.synthetic_data())
    ours = [line for line in said if line.startswith("gradwatch:")]
    report_dir = Path(trainer.log_dir or tmp_path) / "gradwatch"
    assert ours[0] == f"gradwatch: checking the gradient every 1 step; report in {report_dir}"
    assert ours[-1].startswith("gradwatch: 2 checks, no alert (ratio at most ")
    assert ours[-1].endswith(f"; gradwatch show {report_dir}")
