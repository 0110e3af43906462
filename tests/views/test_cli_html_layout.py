"""The HTML page's layout: the alerts table wraps within the page, heatmap columns are labelled."""

from __future__ import annotations

import re
from pathlib import Path

from gradwatch import GradWatch
from gradwatch.cli import main
from tests.reports import result_of_tensors


def test_alerts_wrap_and_heatmap_columns_name_their_steps(tmp_path: Path) -> None:
    """A 300-character tensor name sits in a fixed-layout table; each column head says a step."""
    long_name = "encoder.layer." + "deep." * 57 + "bias"
    with GradWatch(every=10, report_dir=tmp_path / "report") as watch:
        for step in range(0, 50, 10):
            watch.record(result_of_tensors({"W1": 1e-9, long_name: 3e-2}), step)
    page = tmp_path / "page.html"
    assert main(["html", str(tmp_path / "report"), "-o", str(page)]) == 0
    text = page.read_text()
    assert "table.wrap{table-layout:fixed;width:100%}" in text
    assert "table.wrap td{overflow-wrap:anywhere}" in text
    assert re.search(r"<table class='wrap alerts'><tr><th>step</th>", text)
    heads = re.findall(r"<th class='s' title='steps (\d+)\.\.\d+'>(\d*)</th>", text)
    assert [label for _, label in heads] == ["0", "10", "20", "30", "40"]
    assert all(step == label for step, label in heads)
