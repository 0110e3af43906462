"""Reports that survive real runs: restarts continue them, one writer per directory, flat cost."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gradwatch
from gradwatch import GradWatch, load_report
from gradwatch.cli import main
from gradwatch.report import LOCK_FILE, MAX_LISTED, ReportError, ReportInUseError
from tests.reports import result_of_ratio

KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from tests.reports import result_of_ratio
    from gradwatch import GradWatch
    watch = GradWatch(every=1, report_dir={directory!r})
    for step in range({checks}):
        watch.record(result_of_ratio(1e-9), step)
    print("ready", flush=True)
    if {hold}:
        sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


FILES = ("checks.jsonl", "report.json")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def killed_run(directory: Path, checks: int) -> None:
    """A separate process records `checks` checks (steps 0..checks-1), then is SIGKILLed."""
    code = KILLED_RUN.format(
        root=str(Path(__file__).parents[2]), directory=str(directory), checks=checks, hold=False
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert completed.returncode == -signal.SIGKILL, completed.stderr.decode()


def test_restarted_plain_loop_keeps_the_killed_runs_checks(tmp_path: Path) -> None:
    """A run killed after 37 checks keeps all 37 when the restarted loop opens the directory."""
    killed_run(tmp_path, 37)
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        for step in range(37, 40):
            watch.record(result_of_ratio(2e-9), step)
    report = load_report(tmp_path)
    assert report.steps == list(range(40))
    assert report.check_runs == [0] * 37 + [1] * 3
    first, second = report.runs
    assert (first.checks, first.closed, first.last_step) == (37, False, 36)
    assert (second.checks, second.closed, second.first_step) == (3, True, 37)
    assert any("did not close its report" in note for note in second.notes)
    assert report.closed


def test_unfinished_line_of_a_killed_run_is_cut_off_before_appending(tmp_path: Path) -> None:
    """Half a line left by a kill is cut off, so the next run's first check loads cleanly."""
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.record(result_of_ratio(1e-9), 0)
    with (tmp_path / "checks.jsonl").open("a") as handle:
        handle.write('{"ratio": 1e-9, "status": "o')
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.record(result_of_ratio(1e-9), 1)
    report = load_report(tmp_path)
    assert report.steps == [0, 1] and not report.warnings
    assert any("unfinished last line" in note for note in report.runs[1].notes)


def test_resume_from_an_earlier_step_keeps_both_parts_in_step_order(tmp_path: Path) -> None:
    """Resuming at step 5 after checks 0..7 keeps all 11 checks; check_at gives the new one."""
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        for step in range(8):
            watch.record(result_of_ratio(1e-9), step)
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.resume(5, "my loop")
        for step in range(5, 8):
            watch.record(result_of_ratio(3e-9), step)
    report = load_report(tmp_path)
    assert report.steps == [0, 1, 2, 3, 4, 5, 5, 6, 6, 7, 7]
    assert report.check_runs == [0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1]
    assert report.check_at(6).ratio == 3e-9
    assert report.runs[1].resumed == "a checkpoint at step 5 (my loop)"


def test_show_says_the_report_was_restarted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """gradwatch show lists both processes of the run: the killed one and the one resuming it."""
    killed_run(tmp_path, 3)
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.resume(3, "my loop")
        watch.record(result_of_ratio(1e-9), 3)
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "processes: 2" in out
    assert "process 1: pid" in out and "3 checks (steps 0..2), not closed: killed" in out
    assert "resumed from a checkpoint at step 3 (my loop), 1 check (steps 3..3), closed" in out
    assert main(["show", "--json", str(tmp_path)]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [run["checks"] for run in runs] == [3, 1]


def test_version_1_reports_load_and_continue(tmp_path: Path) -> None:
    """A report.json of schema 1 (with the whole series) loads, and a new run continues it."""
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.record(result_of_ratio(1e-9), 0)
        watch.record(result_of_ratio(2e-2), 1)
    summary = json.loads((tmp_path / "report.json").read_text())
    legacy = {key: summary[key] for key in ("configuration", "environment", "alerts", "skipped")}
    legacy.update(schema_version=1, closed=True, updated="", series=[summary["last"]] * 2)
    (tmp_path / "report.json").write_text(json.dumps(legacy))
    report = load_report(tmp_path)
    assert report.schema_version == 1 and report.steps == [0, 1] and len(report.alerts) == 1
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.record(result_of_ratio(1e-9), 2)
    report = load_report(tmp_path)
    assert report.steps == [0, 1, 2] and report.check_runs == [0, 0, 1]
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["alert_count"] == 1 and "series" not in summary


def test_second_writer_is_refused_naming_the_first(tmp_path: Path) -> None:
    """A second GradWatch on an open report directory fails at construction, naming pid and host."""
    first = GradWatch(every=1, report_dir=tmp_path)
    first.record(result_of_ratio(1e-9), 0)
    with pytest.raises(ReportInUseError, match=rf"held by pid {os.getpid()} on host "):
        GradWatch(every=1, report_dir=tmp_path)
    first.record(result_of_ratio(1e-9), 1)
    first.close()
    assert not (tmp_path / LOCK_FILE).exists()
    with GradWatch(every=1, report_dir=tmp_path) as second:  # free again once closed
        second.record(result_of_ratio(1e-9), 2)
    assert load_report(tmp_path).steps == [0, 1, 2]


def test_writer_in_another_process_blocks_the_directory(tmp_path: Path) -> None:
    """While another process writes the directory, a GradWatch here is refused with its pid."""
    code = KILLED_RUN.format(
        root=str(Path(__file__).parents[2]), directory=str(tmp_path), checks=2, hold=True
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        with pytest.raises(ReportInUseError, match=rf"pid {process.pid} on host"):
            GradWatch(every=1, report_dir=tmp_path)
    finally:
        process.communicate(b"\n", timeout=60)
    with GradWatch(every=1, report_dir=tmp_path) as watch:  # the killed writer let go
        watch.record(result_of_ratio(1e-9), 2)
    assert load_report(tmp_path).steps == [0, 1, 2]


def test_writer_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    """A checks.jsonl symlinked elsewhere is refused at construction; its target is untouched."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "checks.jsonl").symlink_to(target)
    with pytest.raises(ReportError, match=r"expected a regular file .*received a symlink"):
        GradWatch(every=1, report_dir=report_dir)
    assert target.read_text() == "keep me\n"
    assert not (report_dir / LOCK_FILE).exists()


def test_report_json_is_as_readable_as_checks_jsonl(tmp_path: Path) -> None:
    """report.json gets the umask's permissions like checks.jsonl, not tempfile's 0600."""
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.record(result_of_ratio(1e-9), 0)
    checks, summary = (stat.S_IMODE((tmp_path / name).stat().st_mode) for name in FILES)
    assert summary == checks == 0o666 & ~current_umask()


def test_report_json_size_does_not_grow_with_the_checks(tmp_path: Path) -> None:
    """report.json after 300 failing checks is as large as after 150: lists stop at MAX_LISTED."""
    sizes = {}
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        for step in range(300):
            watch.record(result_of_ratio(2e-2), step)
            if step + 1 in (150, 300):
                sizes[step + 1] = (tmp_path / "report.json").stat().st_size
    assert abs(sizes[300] - sizes[150]) < 64  # digits of the counts and steps only
    summary = json.loads((tmp_path / "report.json").read_text())
    assert (len(summary["alerts"]), summary["alert_count"], summary["checks"]) == (
        MAX_LISTED,
        300,
        300,
    )
    assert len(watch.alerts) == 300
    assert len(load_report(tmp_path).alerts) == 300


def test_state_dict_names_the_report(tmp_path: Path) -> None:
    """state_dict carries the report directory and the checks so far, and reads back."""
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.record(result_of_ratio(1e-9), 0)
        watch.record(result_of_ratio(1e-9), 4)
        state = watch.state_dict()
    assert state == {"version": 1, "report_dir": str(tmp_path), "checks": 2, "last_step": 4}
    assert gradwatch.callback.WatchState.read(json.loads(json.dumps(state))).last_step == 4
    with pytest.raises(gradwatch.OptionError, match=r"expected what GradWatch\.state_dict"):
        gradwatch.callback.WatchState.read({"checks": "many"})
