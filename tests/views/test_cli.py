"""The gradwatch command: show/trend/worst/plot, JSON output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch import GradWatch
from tests.reports import result_of_tensors, run_cli


@pytest.fixture
def clean_run(tmp_path: Path) -> Path:
    """A closed report with three passing checks at steps 0, 100 and 200."""
    directory = tmp_path / "clean"
    with GradWatch(every=100, report_dir=directory) as watch:
        for step, ratio in ((0, 2e-9), (100, 4e-9), (200, 3e-9)):
            watch.record(result_of_tensors({"W1": ratio, "b1": ratio / 2}), step)
    return directory


@pytest.fixture
def buggy_run(tmp_path: Path) -> Path:
    """A closed report where b1 goes wrong from step 200 on."""
    directory = tmp_path / "buggy"
    with GradWatch(every=100, report_dir=directory) as watch:
        for step, b1 in ((0, 1e-9), (100, 2e-6), (200, 4e-3), (300, 2e-2)):
            watch.record(result_of_tensors({"W1": 1e-9, "b1": b1}), step)
    return directory


def test_show_clean_report_exits_0(clean_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A clean report shows steps and ratio first/last/max and exits 0."""
    code, out, err = run_cli(capsys, "show", str(clean_run))
    assert code == 0
    assert "steps checked: 3 (0, 100, 200)" in out
    assert "first 2.00e-09 (step 0), last 3.00e-09 (step 200), max 4.00e-09 (step 100)" in out
    assert "alerts: none" in out
    assert err == ""


def test_show_alert_exits_1_and_names_the_tensor(
    buggy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A report with alerts exits 1 and names the first failing step and tensor."""
    code, out, _ = run_cli(capsys, "show", str(buggy_run))
    assert code == 1
    assert "alerts: 2, first at step 200" in out
    assert "step 200: ratio 4.00e-03, tensor b1 (4.00e-03), worst b1[0, 0]" in out
    assert "worst check: step 300" in out


def test_show_lists_failing_tensors_and_folds_the_quiet_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model with many tensors lists the failing one first, then the worst, the rest folded."""
    ratios = {f"layer{i}.weight": 1e-9 * (i + 1) for i in range(40)}
    ratios["head.bias"] = 0.5
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.record(result_of_tensors(ratios), 0)
    _, out, _ = run_cli(capsys, "show", str(tmp_path))
    lines = out.splitlines()
    start = next(i for i, text in enumerate(lines) if text.strip().startswith("tensors:"))
    assert lines[start].strip() == "tensors: 41 (1 fail, 40 ok); worst first"
    assert lines[start + 1].split()[:3] == ["head.bias", "5.00e-01", "fail"]
    assert lines[start + 2].split()[0] == "layer39.weight"
    assert lines[start + 7].strip().startswith("... and 35 more (35 ok; ratio at most")


def test_show_json_is_machine_readable(buggy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show --json carries steps, ratio summary, alerts and the exit code."""
    code, out, _ = run_cli(capsys, "show", str(buggy_run), "--json")
    payload = json.loads(out)
    assert code == payload["exit_code"] == 1
    assert payload["steps"] == [0, 100, 200, 300]
    assert payload["ratio"]["max_step"] == 300
    assert [alert["tensor"] for alert in payload["alerts"]] == ["b1", "b1"]
    assert payload["worst"]["components"][0]["name"] == "b1[0, 0]"


def test_show_missing_report_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing directory gives one stderr line, no traceback, exit 2."""
    code, out, err = run_cli(capsys, "show", str(tmp_path / "missing"))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("gradwatch: error: report directory") and "does not exist" in err


def test_show_corrupt_report_exits_2_naming_the_line(
    clean_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Corruption inside checks.jsonl gives exit 2 and names file and line."""
    checks = clean_run / "checks.jsonl"
    lines = checks.read_text().splitlines(keepends=True)
    checks.write_text(lines[0] + "not json\n" + lines[2])
    code, _, err = run_cli(capsys, "show", str(clean_run))
    assert code == 2
    assert "checks.jsonl, line 2" in err


def test_show_truncated_report_warns_and_reads(
    buggy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A killed run's truncated tail is a stderr warning; the finished checks still count."""
    checks = buggy_run / "checks.jsonl"
    checks.write_text(checks.read_text()[:-30])
    code, out, err = run_cli(capsys, "show", str(buggy_run))
    assert code == 1
    assert "steps checked: 3 (0, 100, 200)" in out
    assert err.startswith("gradwatch: warning:") and "truncated" in err


def test_trend_draws_each_tensor_and_when_it_went_wrong(
    buggy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """trend has a row per tensor and says from which step it crossed the threshold."""
    code, out, _ = run_cli(capsys, "trend", str(buggy_run))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"global", "W1", "b1"}
    assert ">= threshold from step 200" in rows["b1"]
    assert "threshold" not in rows["W1"]
    assert len(rows["b1"].split()[1]) == 4  # one character per check


def test_trend_json_has_the_series(buggy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """trend --json gives every tensor's ratio per step."""
    _, out, _ = run_cli(capsys, "trend", str(buggy_run), "--json")
    series = json.loads(out)["series"]
    assert [point["ratio"] for point in series["b1"]] == [1e-9, 2e-6, 4e-3, 2e-2]
    assert [point["step"] for point in series["global"]] == [0, 100, 200, 300]


def test_worst_defaults_to_the_highest_ratio_check(
    buggy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """worst without --step shows the check with the highest ratio, worst component first."""
    code, out, _ = run_cli(capsys, "worst", str(buggy_run), "--top", "1")
    assert code == 0
    assert out.startswith("step 300: ratio 2.00e-02 (fail)")
    component_lines = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(component_lines) == 1
    assert component_lines[0].lstrip().startswith("b1[0, 0] ")


def test_worst_step_json(buggy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """worst --step N --json gives that check's components."""
    code, out, _ = run_cli(capsys, "worst", str(buggy_run), "--step", "100", "--json")
    payload = json.loads(out)
    assert code == 0
    assert payload["step"] == 100
    assert payload["components"][0]["abs_error"] == 2e-6


def test_worst_unknown_step_exits_2_listing_steps(
    buggy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unchecked step is a clear error listing the checked steps."""
    code, out, err = run_cli(capsys, "worst", str(buggy_run), "--step", "150")
    assert code == 2
    assert out == ""
    assert "no check at step 150" in err and "0, 100, 200, 300" in err


def test_plot_writes_a_png(
    buggy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """plot -o writes a PNG image."""
    pytest.importorskip("matplotlib")
    output = tmp_path / "ratio.png"
    code, out, _ = run_cli(capsys, "plot", str(buggy_run), "-o", str(output))
    assert code == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert output.stat().st_size > 10_000
    assert str(output) in out


def test_plot_without_matplotlib_exits_2(
    buggy_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without matplotlib, plot says how to install it and exits 2."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, _, err = run_cli(capsys, "plot", str(buggy_run), "-o", str(tmp_path / "x.png"))
    assert code == 2
    assert "pip install 'gradwatch[plot]'" in err
    assert not (tmp_path / "x.png").exists()


def test_console_script_exit_codes_without_traceback(buggy_run: Path, tmp_path: Path) -> None:
    """The installed command exits 1 on an alert and 2 on a missing report, no traceback."""
    command = Path(sys.executable).with_name("gradwatch")
    alert = subprocess.run([command, "show", str(buggy_run)], capture_output=True, text=True)
    missing = subprocess.run(
        [command, "show", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert alert.returncode == 1
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert missing.stderr.startswith("gradwatch: error:")


def test_example_with_bug_ends_with_an_alert_naming_b2(tmp_path: Path) -> None:
    """examples/numpy_mlp.py --bug passes at step 0 and alerts on b2 later; without it, clean."""
    example = Path(__file__).parents[2] / "examples" / "numpy_mlp.py"
    command = Path(sys.executable).with_name("gradwatch")
    for bug, expected in ((True, 1), (False, 0)):
        directory = tmp_path / ("bug" if bug else "clean")
        arguments = [sys.executable, str(example), "--report-dir", str(directory), "--steps", "300"]
        subprocess.run(arguments + (["--bug"] if bug else []), check=True, capture_output=True)
        shown = subprocess.run(
            [command, "show", str(directory), "--json"], capture_output=True, text=True
        )
        assert shown.returncode == expected
        payload = json.loads(shown.stdout)
        assert payload["ratio"]["first"] < 1e-7
        if bug:
            assert {alert["tensor"] for alert in payload["alerts"]} == {"b2"}
            assert payload["alerts"][0]["step"] > 0
