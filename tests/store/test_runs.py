"""Runs of a report: a fresh start is a new run, a resume continues one, views read the latest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import gradwatch
from gradwatch import GradWatch, load_report
from gradwatch.report import ReportError
from tests.reports import result_of_tensors, run_cli


def bug_then_fix(directory: Path) -> None:
    """A run whose b1 is wrong (alerts at steps 0 and 10), then a fresh run after the fix."""
    with GradWatch(every=10, report_dir=directory) as buggy:
        for step in (0, 10):
            buggy.record(result_of_tensors({"W1": 1e-9, "b1": 3e-2}), step)
    with GradWatch(every=10, report_dir=directory) as fixed:
        for step in (0, 10, 20):
            fixed.record(result_of_tensors({"W1": 1e-9, "b1": 2e-9}), step)


def test_rerun_after_the_fix_is_judged_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """show judges the latest run (exit 0) and counts the fixed run's alerts in one line."""
    bug_then_fix(tmp_path)
    code, out, _ = run_cli(capsys, "show", str(tmp_path))
    assert code == 0
    assert "alerts: none" in out
    assert "run 2 of 2 (the latest); other runs: run 1 (2 checks, 2 alerts, steps 0..10)" in out
    assert "steps checked: 3 (0, 10, 20)" in out


def test_run_option_reads_the_earlier_run_or_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--run 1 and --run all see the buggy run's alerts (exit 1); --run 3 is exit 2."""
    bug_then_fix(tmp_path)
    code, out, _ = run_cli(capsys, "show", str(tmp_path), "--run", "1")
    assert code == 1 and "alerts: 2, first at step 0" in out
    assert f"gradwatch worst {tmp_path} --step 0 --run 1" in " ".join(out.split())
    code, out, _ = run_cli(capsys, "show", str(tmp_path), "--run", "all")
    assert code == 1 and "all 2 runs (--run all): runs 1 have alerts or errors" in out
    code, _, err = run_cli(capsys, "show", str(tmp_path), "--run", "3")
    assert code == 2 and "a run number from 1 to 2" in err


def test_worst_step_looks_in_the_chosen_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """worst --step 0 opens the latest run's step 0; with --run 1 the buggy one's."""
    bug_then_fix(tmp_path)
    code, out, _ = run_cli(capsys, "worst", str(tmp_path), "--step", "0", "--json")
    assert code == 0 and json.loads(out)["status"] == "ok"
    code, out, _ = run_cli(capsys, "worst", str(tmp_path), "--step", "0", "--run", "1", "--json")
    assert code == 0 and json.loads(out)["status"] == "fail"


def test_trend_plot_and_html_read_the_chosen_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """trend --json draws the latest run's 3 checks; --run all all 5; html takes --run 1."""
    bug_then_fix(tmp_path)
    code, out, _ = run_cli(capsys, "trend", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["steps"] == [0, 10, 20]
    code, out, _ = run_cli(capsys, "trend", str(tmp_path), "--json", "--run", "all")
    assert code == 0 and json.loads(out)["steps"] == [0, 0, 10, 10, 20]
    page = tmp_path / "page.html"
    code, out, _ = run_cli(capsys, "html", str(tmp_path), "-o", str(page), "--run", "1", "--json")
    assert code == 0 and json.loads(out)["checks"] == 2
    assert "3.00e-02" in page.read_text()


def test_resume_continues_the_run(tmp_path: Path) -> None:
    """A watch that says it resumed adds its checks to the last run, not a new one."""
    with GradWatch(every=10, report_dir=tmp_path) as first:
        first.record(result_of_tensors({"W1": 1e-9}), 0)
    with GradWatch(every=10, report_dir=tmp_path) as resumed:
        resumed.resume(10, "my loop's checkpoint")
        resumed.record(result_of_tensors({"W1": 1e-9}), 10)
    with GradWatch(every=10, report_dir=tmp_path) as fresh:
        fresh.record(result_of_tensors({"W1": 1e-9}), 0)
    report = load_report(tmp_path, run=1)
    assert report.steps == [0, 10] and report.check_runs == [0, 1]
    assert [summary.segments for summary in report.run_summaries] == [[0, 1], [2]]
    assert load_report(tmp_path, run="latest").steps == [0]
    assert load_report(tmp_path).steps == [0, 0, 10]
    with pytest.raises(ReportError, match=r"received 0"):
        load_report(tmp_path, run=0)


def test_show_finds_the_report_under_the_trainers_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """show <output_dir> reads <output_dir>/gradwatch and says so on stderr."""
    bug_then_fix(tmp_path / "out" / "gradwatch")
    (tmp_path / "out" / "checkpoint-10").mkdir()
    code, out, err = run_cli(capsys, "show", str(tmp_path / "out"))
    assert code == 0 and "alerts: none" in out
    assert f"reading the report in {tmp_path / 'out' / 'gradwatch'}" in err
    deep = tmp_path / "lightning" / "lightning_logs" / "version_0" / "gradwatch"
    bug_then_fix(deep)
    code, _, _ = run_cli(capsys, "show", str(tmp_path / "lightning"))
    assert code == 0


def test_several_reports_below_are_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two reports below the directory: exit 2 naming both, none read."""
    for version in ("version_0", "version_1"):
        bug_then_fix(tmp_path / "lightning_logs" / version / "gradwatch")
    code, out, err = run_cli(capsys, "show", str(tmp_path))
    assert code == 2 and not out
    assert "holds 2 gradwatch reports, expected one" in err
    assert "version_0/gradwatch" in err and "version_1/gradwatch" in err


def test_unreadable_directory_says_permission_denied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory this user may not list is 'Permission denied', not 'found neither'."""
    bug_then_fix(tmp_path)
    listing = os.scandir

    def denied(path: str | os.PathLike[str] = ".") -> Any:
        if Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", denied)
    code, _, err = run_cli(capsys, "show", str(tmp_path))
    assert code == 2 and "Permission denied" in err and "found neither" not in err


def test_version_and_python_m(tmp_path: Path) -> None:
    """gradwatch --version prints the package version; python -m gradwatch is the same CLI."""
    completed = subprocess.run(
        [sys.executable, "-m", "gradwatch", "--version"], capture_output=True, text=True
    )
    assert completed.returncode == 0
    assert completed.stdout.strip() == f"gradwatch {gradwatch.__version__}"
    bug_then_fix(tmp_path)
    shown = subprocess.run(
        [sys.executable, "-m", "gradwatch", "show", str(tmp_path), "--run", "1"],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 1 and "alerts: 2" in shown.stdout


def test_worst_step_missing_from_the_run_names_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """worst --step 20 of a run that never checked step 20 says which run it looked in."""
    bug_then_fix(tmp_path)
    code, _, err = run_cli(capsys, "worst", str(tmp_path), "--step", "20", "--run", "1")
    assert code == 2
    assert "no check at step 20" in err and "(run 1; --run all reads every run)" in err
