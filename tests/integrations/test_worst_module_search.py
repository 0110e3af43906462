"""`gradwatch worst` on a failing check that a confirmed screen ended: the module search
is what it shows (the oracle: the planted head of examples/hf_trainer.py --bug)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from examples import hf_trainer
from tests.reports import run_cli

pytestmark = pytest.mark.torch


def test_worst_shows_the_module_search_of_a_failing_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No per-tensor ratio was measured: worst names the planted module, its side and ratio."""
    report = tmp_path / "bug"
    assert hf_trainer.main(["--bug", "--steps", "1", "--report-dir", str(report)]) == 1
    capsys.readouterr()
    ran = run_cli(capsys, "worst", str(report), "--step", "0")
    assert ran.code == 0
    assert "tensors: none measured on its own (a confirmed screen" in ran.out
    assert "  the bug is in the backward of classifier (CustomHead" in ran.out
    assert "    classifier (CustomHead): fail, input " in ran.out
    assert "no component listed: a screen below warn" not in ran.out
    payload = json.loads(run_cli(capsys, "worst", str(report), "--step", "0", "--json").out)
    suspects = payload["localization"]["suspects"]
    assert [(s["module"], s["side"]) for s in suspects] == [("classifier", "parameter")]
