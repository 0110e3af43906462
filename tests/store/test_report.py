"""Reports on disk: checks.jsonl, atomic report.json, load_report, crashes and corruption."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

import gradwatch
from gradwatch import GradWatch, ReportError, load_report
from tests.reports import result_of_ratio


def write_run(directory: Path, ratios: dict[int, float]) -> None:
    """Record one check per step with the given global ratios, then close."""
    with GradWatch(every=1, report_dir=directory) as watch:
        for step, ratio in ratios.items():
            watch.record(result_of_ratio(ratio), step)


def test_round_trip_lists_checks_in_step_order(tmp_path: Path) -> None:
    """Checks recorded out of order load sorted by step with their ratios intact."""
    write_run(tmp_path, {20: 3e-8, 0: 1e-9, 10: 2e-3})
    report = load_report(tmp_path)
    assert report.steps == [0, 10, 20]
    assert [check.ratio for check in report.checks] == [1e-9, 2e-3, 3e-8]
    assert report.closed
    assert [alert.step for alert in report.alerts] == [10]
    assert report.alerts[0].tensor == "W"
    steps, ratios = zip(*report.tensor_series()["b"], strict=True)
    assert steps == (0, 10, 20)
    assert ratios == pytest.approx([1e-10, 2e-4, 3e-9])


def test_non_finite_ratios_survive_both_files(tmp_path: Path) -> None:
    """NaN and infinity come back as NaN and infinity, never as null."""
    write_run(tmp_path, {0: float("nan"), 5: float("inf")})
    assert "null" not in (tmp_path / "checks.jsonl").read_text().split('"step"')[0]
    report = load_report(tmp_path)
    assert math.isnan(report.checks[0].ratio)
    assert report.checks[1].ratio == math.inf
    summary = json.loads((tmp_path / "report.json").read_text())
    assert math.isnan(summary["alerts"][0]["ratio"])
    assert summary["last"]["ratio"] == math.inf


def test_report_json_holds_configuration_environment_and_latest_check(tmp_path: Path) -> None:
    """report.json says how the run was checked, where, by which run, and the latest check."""
    with GradWatch(every=7, sample=0.5, report_dir=tmp_path, threshold=1e-4, warn=1e-6) as watch:
        watch.set_context(framework="numpy")
        watch.note("gradient accumulation: the check covers the last micro-batch")
        watch.record(result_of_ratio(2e-7), 0)
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["schema_version"] == 2
    configuration = summary["configuration"]
    assert configuration["every"] == 7
    assert configuration["sample"] == 0.5
    assert configuration["threshold"] == 1e-4
    assert configuration["dtype"] == "float64"
    assert configuration["regularization"] == ["L2(lambd=0.7)"]
    assert configuration["context"] == {"framework": "numpy"}
    assert configuration["notes"] == [
        "gradient accumulation: the check covers the last micro-batch"
    ]
    environment = summary["environment"]
    assert environment["python"] == ".".join(map(str, sys.version_info[:3]))
    assert environment["gradwatch"] == "0.1.0"
    assert environment["numpy"]
    assert summary["last"]["tensors"] == {"W": 2e-7, "b": 2e-8}
    assert summary["last"]["worst"][0]["name"] == "W[1, 0]"
    assert summary["closed"] is True
    assert summary["checks"] == 1
    [run] = summary["runs"]
    assert (run["pid"], run["first_line"], run["first_step"], run["closed"]) == (
        os.getpid(),
        0,
        0,
        True,
    )


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    """The atomic replace of report.json leaves only the two report files."""
    write_run(tmp_path, {0: 1e-9, 1: 1e-9, 2: 1e-9})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checks.jsonl", "report.json"]


def test_truncated_last_line_loads_with_a_warning(tmp_path: Path) -> None:
    """A line cut short by a crash is dropped with a warning; earlier checks load."""
    write_run(tmp_path, {0: 1e-9, 1: 2e-9, 2: 3e-9})
    checks = tmp_path / "checks.jsonl"
    text = checks.read_text()
    checks.write_text(text[: len(text) - 40])
    with pytest.warns(gradwatch.TruncatedReportWarning, match="line 3 is truncated"):
        report = load_report(tmp_path)
    assert report.steps == [0, 1]
    assert "truncated" in report.warnings[0]


def test_corrupt_middle_line_names_file_and_line(tmp_path: Path) -> None:
    """Corruption that is not a truncated tail is an error naming the file and line."""
    write_run(tmp_path, {0: 1e-9, 1: 2e-9, 2: 3e-9})
    checks = tmp_path / "checks.jsonl"
    lines = checks.read_text().splitlines(keepends=True)
    lines[1] = '{"ratio": "garbage"}\n'
    checks.write_text("".join(lines))
    with pytest.raises(ReportError, match=r"checks\.jsonl, line 2"):
        load_report(tmp_path)


def test_corrupt_report_json_is_an_error(tmp_path: Path) -> None:
    """A broken report.json is an error naming it."""
    write_run(tmp_path, {0: 1e-9})
    (tmp_path / "report.json").write_text('{"schema_version": 1, "configuration": ')
    with pytest.raises(ReportError, match=r"report\.json"):
        load_report(tmp_path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A report written by a newer schema says so rather than misreading it."""
    write_run(tmp_path, {0: 1e-9})
    summary = json.loads((tmp_path / "report.json").read_text())
    summary["schema_version"] = 99
    (tmp_path / "report.json").write_text(json.dumps(summary))
    with pytest.raises(ReportError, match="expected schema_version <= 2, received 99"):
        load_report(tmp_path)


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    """Loading a directory that does not exist names it."""
    with pytest.raises(ReportError, match="does not exist"):
        load_report(tmp_path / "nope")


def test_directory_without_report_is_an_error(tmp_path: Path) -> None:
    """A directory with no report files is not mistaken for an empty run."""
    with pytest.raises(ReportError, match="found neither"):
        load_report(tmp_path)


def test_unwritable_report_dir_fails_at_construction(tmp_path: Path) -> None:
    """A report dir under a regular file is refused when the watch is built."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ReportError, match="expected a writable directory") as raised:
        GradWatch(every=500, report_dir=blocker / "gradwatch")
    assert str(blocker / "gradwatch") in str(raised.value)


def test_deferred_directory_writes_earlier_checks_when_opened(tmp_path: Path) -> None:
    """With report_dir=None, checks recorded before open() reach the files."""
    watch = GradWatch(every=1, report_dir=None)
    watch.record(result_of_ratio(1e-9), 0)
    assert watch.report_dir is None
    watch.open(tmp_path / "late")
    watch.record(result_of_ratio(5e-3), 1)
    watch.close()
    report = load_report(tmp_path / "late")
    assert report.steps == [0, 1]
    assert [alert.step for alert in report.alerts] == [1]


def test_non_writer_writes_no_files(tmp_path: Path) -> None:
    """write=False (ranks other than 0) creates nothing but still records results."""
    with GradWatch(every=1, report_dir=tmp_path / "rank1", write=False) as watch:
        stamped = watch.record(result_of_ratio(1e-9), 3)
    assert stamped.step == 3
    assert not (tmp_path / "rank1").exists()
    assert not watch.is_writer


_TRAINER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import gradwatch

    w = np.linspace(-1.0, 1.0, 40)
    watch = gradwatch.GradWatch(every=1, sample=None, report_dir=sys.argv[1])
    for step in range(100_000):
        watch.after_backward(
            step, loss=lambda: float(np.sum(w**2)), params={"w": w}, grads={"w": 2 * w}
        )
        print(step, flush=True)
        w -= 0.001 * 2 * w
    """
)


def test_killed_run_leaves_every_finished_check(tmp_path: Path) -> None:
    """A trainer killed with SIGKILL leaves every check it finished loadable."""
    process = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    finished = -1
    deadline = time.monotonic() + 15
    while finished < 20 and time.monotonic() < deadline:
        finished = int(process.stdout.readline())
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert finished >= 20
    with warnings.catch_warnings(record=True) as caught:  # a line cut mid-write may warn
        warnings.simplefilter("always")
        report = load_report(tmp_path)
    assert all(issubclass(w.category, gradwatch.TruncatedReportWarning) for w in caught)
    assert report.steps[: finished + 1] == list(range(finished + 1))
    assert all(check.status == "ok" for check in report.checks)
    assert not report.closed
