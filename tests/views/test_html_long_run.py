"""`gradwatch html` reads a long run compact and still draws the page of the whole report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import gradwatch
from gradwatch.cli import main
from gradwatch.result import CheckResult
from gradwatch.views.html import DETAILED_CHECKS, report_html


def _record(directory: Path, checks: int, tensors: int) -> None:
    rng = np.random.default_rng(0)
    with gradwatch.GradWatch(every=1, report_dir=directory) as watch:
        for step in range(checks):
            ratio = 2e-3 if step % 37 == 0 else float(rng.uniform(1e-9, 1e-7))
            per_tensor = {
                f"t{i}": {
                    "ratio": float(rng.uniform(1e-10, 1e-6)) if i != 3 or step % 37 else 0.5,
                    "checked": 4,
                    "size": 4,
                    "max_abs_error": 1e-9,
                    "status": "ok" if i != 3 or step % 37 else "fail",
                }
                for i in range(tensors)
            }
            result = CheckResult.model_validate(
                {
                    "ratio": ratio,
                    "status": "fail" if ratio >= 1e-3 else "ok",
                    "tensors": per_tensor,
                    "worst": [],
                    "eps": 1e-6,
                    "eps_policy": "given",
                    "checked": 4 * tensors,
                    "size": 4 * tensors,
                    "loss": 1.0,
                    "loss_evals": 6,
                    "seconds": 0.01,
                    "regularization": {},
                }
            )
            watch.record(result, step)


def test_html_of_a_compact_read_is_the_page_of_the_whole_report(tmp_path: Path) -> None:
    """More checks than the page lists in full: the CLI (compact read, only the listed checks
    kept whole) writes byte for byte the page rendered from the fully loaded report."""
    _record(tmp_path / "run", DETAILED_CHECKS + 60, tensors=12)
    assert main(["html", str(tmp_path / "run"), "-o", str(tmp_path / "page.html")]) == 0
    written = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert written == report_html(gradwatch.load_report(tmp_path / "run"))
    assert "t3" in written and "ALERT" in written
