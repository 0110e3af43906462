"""The suspect module reaches the user: the alert, the report on disk and ``show``'s next line."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from gradwatch.integrations.torch import after_backward

import gradwatch
from benchmarks.local_bugs import LOCAL_BUGS, model_loss
from gradwatch.views.show import show_lines

pytestmark = pytest.mark.torch


def test_alert_report_and_show_name_the_planted_module(tmp_path: Path) -> None:
    """A Gemma2 with a wrong GELU backward: alert, report and show's next line name act_fn."""
    bug = LOCAL_BUGS["gemma2-gelu"]
    model, batch = bug.build()
    directory = tmp_path / "gradwatch"
    with gradwatch.GradWatch(every=1, report_dir=directory) as watch:
        model_loss(model, batch).backward()
        result = after_backward(watch, 0, model, model_loss, batch)
    assert result is not None and result.status == "fail"
    assert bug.expected in watch.alerts[0].message
    report = gradwatch.load_report(directory)
    localization = report.checks[0].localization
    assert localization is not None
    assert [suspect.module for suspect in localization.suspects] == [bug.expected]
    lines = show_lines(report)
    start = next(i for i, line in enumerate(lines) if line.startswith("next:"))
    advice = " ".join(line.strip() for line in lines[start:])
    assert f"the backward of {bug.expected} (BuggyTanhGELU" in advice
    assert "its input gradient differs" in advice
    # parameter order would point at a sandwich norm registered after the MLP
    assert "pre_feedforward_layernorm" not in advice


def test_html_shows_the_module_tree_with_the_suspect_marked(tmp_path: Path) -> None:
    """gradwatch html lists every module call the search checked, by depth, the planted one
    marked as the suspect and described in words."""
    from gradwatch.views.html import report_html

    bug = LOCAL_BUGS["gemma2-gelu"]
    model, batch = bug.build()
    with gradwatch.GradWatch(every=1, report_dir=tmp_path) as watch:
        model_loss(model, batch).backward()
        after_backward(watch, 0, model, model_loss, batch)
    report = gradwatch.load_report(tmp_path)
    localization = report.checks[0].localization
    assert localization is not None
    page = report_html(report)
    assert "module (checked by the search)" in page
    marked = page.split("<tr class='suspect'>")
    assert len(marked) == 2 and bug.expected in marked[1].split("</tr>")[0]
    assert f"the backward of {bug.expected}" in page
    for verdict in localization.modules:  # every checked call has its row
        assert f">{verdict.module or '(the model)'}" in page
