"""Views of a run where only the all-tensor screen ran: no per-tensor number is made up."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import gradwatch
from gradwatch.cli import main
from gradwatch.views.plot import plot_figure
from tests.engine.test_screen import scalars_next_to_a_large_tensor
from tests.reports import run_cli


@pytest.fixture
def screened_run(tmp_path: Path) -> Path:
    """Three clean checks of a 2,502-entry model under sample="auto": screen only."""
    params, loss, grads = scalars_next_to_a_large_tensor(0.0)
    with gradwatch.GradWatch(every=1, report_dir=tmp_path / "report") as watch:
        for step in range(3):
            result = watch.after_backward(step, loss=loss, params=params, grads=grads)
            assert result is not None and result.mode == "directional"
            assert all(tensor.checked == 0 for tensor in result.tensors.values())
    return tmp_path / "report"


def test_trend_draws_no_tensor_row(screened_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """trend says the tensors were screened together and draws only the global row."""
    code, out, _ = run_cli(capsys, "trend", str(screened_run))
    assert code == 0
    assert "tensors screened together at every check (steps 0, 1, 2)" in out
    assert not re.search(r"^(a|W|b) ", out, re.MULTILINE)
    code, out, _ = run_cli(capsys, "trend", str(screened_run), "--json")
    assert list(json.loads(out)["series"]) == ["global"]


def test_worst_says_what_was_checked_and_why_no_component(
    screened_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """worst names the screen and why no component is listed; --json gives null ratios."""
    code, out, _ = run_cli(capsys, "worst", str(screened_run))
    assert code == 0
    assert "tensors: 3, screened together:" in out and "none checked on its own" in out
    assert "no component listed: a screen below warn" in out
    assert "no components recorded" not in out
    code, out, _ = run_cli(capsys, "worst", str(screened_run), "--json")
    assert {t["ratio"] for t in json.loads(out)["tensors"].values()} == {None}


def test_html_heatmap_and_plot_draw_no_made_up_rows(
    screened_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page says "screened together" and has no heatmap row; the plot draws no tensor."""
    page = tmp_path / "page.html"
    assert main(["html", str(screened_run), "-o", str(page)]) == 0
    text = page.read_text()
    assert "tensors screened together at every check" in text
    assert "<tr data-tensor='W'>" not in text
    figure = plot_figure(gradwatch.load_report(screened_run))
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert not {"a", "W", "b"} & set(labels)
    assert any("screened together" in t.get_text() for t in figure.axes[0].texts)


def test_plot_legend_leaves_out_a_tensor_under_the_global_line(tmp_path: Path) -> None:
    """A one-tensor model's line is the global line: the legend does not list it twice."""
    w = np.array([1.0, -2.0, 0.5])
    with gradwatch.GradWatch(every=1, report_dir=tmp_path) as watch:
        for step in range(2):
            watch.after_backward(
                step, loss=lambda: float(np.sum(w**3)), params={"w": w}, grads={"w": 3 * w**2}
            )
    figure = plot_figure(gradwatch.load_report(tmp_path))
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert "global ratio" in labels and "w" not in labels
