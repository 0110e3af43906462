"""Reading a long or hostile report: streamed, bounded in memory, safe on any terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradwatch import GradWatch, load_report
from gradwatch.cli import main
from gradwatch.store import files, reader
from gradwatch.views.show import show_lines
from tests.reports import result_of_tensors, run_cli


@pytest.fixture
def resumed_run(tmp_path: Path) -> Path:
    """Two runs (the second resumed at step 2), tied worst ratios, two failing checks."""
    directory = tmp_path / "run"
    with GradWatch(every=1, report_dir=directory) as watch:
        for step, bad in ((0, 1e-9), (1, 0.5), (2, 1e-8), (3, 0.5)):
            watch.record(result_of_tensors({"W1": 1e-9 * (step + 1), "b1": bad}), step)
    with GradWatch(every=1, report_dir=directory) as watch:
        for step, bad in ((2, 0.5), (3, 2e-3), (4, float("nan"))):
            watch.record(result_of_tensors({"W1": 3e-9, "b1": bad, f"x{step}": 1e-9}), step)
    return directory


def test_compact_report_reads_as_the_whole_one(resumed_run: Path) -> None:
    """A compact load shows the same text, alerts, runs and per-tensor series as a full one."""
    whole = load_report(resumed_run)
    compact = load_report(resumed_run, compact=True)
    assert show_lines(compact) == show_lines(whole)
    assert compact.alerts == whole.alerts
    assert compact.runs == whole.runs
    assert compact.check_runs == whole.check_runs
    assert compact.tensor_names == whole.tensor_names
    assert repr(compact.tensor_series()) == repr(whole.tensor_series())  # NaN == NaN
    # only step 1 is whole: the worst check (0.5, first in step order) and the first failing
    assert [check.step for check in compact.checks if check.tensors] == [1]


def test_compact_report_keeps_the_steps_asked_for(resumed_run: Path) -> None:
    """`keep_steps` keeps those checks whole (what `gradwatch worst --step` reads)."""
    compact = load_report(resumed_run, compact=True, keep_steps=(0,))
    assert set(compact.check_at(0).tensors) == {"W1", "b1"}


def test_show_reads_a_long_report_in_bounded_memory(tmp_path: Path) -> None:
    """`gradwatch show` on a 2,000-check, 100-tensor report grows memory by less than the file."""
    names = [f"layers.{i}.weight" for i in range(100)]
    line = result_of_tensors(dict.fromkeys(names, 1e-8)).model_dump()
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.record(result_of_tensors({"W": 1e-9}), 0)
    with (tmp_path / "checks.jsonl").open("w") as file:
        for step in range(2_000):
            line["step"] = step
            file.write(json.dumps(line) + "\n")
    size = (tmp_path / "checks.jsonl").stat().st_size
    script = textwrap.dedent(
        f"""
        import resource, sys
        import gradwatch.cli
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sys.stdout = open("/dev/null", "w")
        gradwatch.cli.main(["show", {str(tmp_path)!r}])
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024,
              file=sys.stderr)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    growth = int(done.stderr.split()[-1])
    assert growth < size / 2, (growth, size)


def test_deeply_nested_report_json_exits_2(
    resumed_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A report.json nested 100,000 deep is a one-line error with exit 2, not a RecursionError."""
    (resumed_run / "report.json").write_text("[" * 100_000 + "]" * 100_000)
    code, out, err = run_cli(capsys, "show", str(resumed_run))
    assert code == 2
    assert out == ""
    assert err.startswith("gradwatch: error: ") and err.count("\n") == 1
    assert "nested too deeply" in err


def test_huge_report_json_and_huge_line_are_refused(
    resumed_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A report.json or a checks.jsonl line over the size limit is refused, never read whole."""
    monkeypatch.setattr(files, "MAX_SUMMARY_BYTES", 100)
    code, _, err = run_cli(capsys, "show", str(resumed_run))
    assert code == 2 and "larger than" in err
    monkeypatch.undo()
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 100)
    code, _, err = run_cli(capsys, "show", str(resumed_run))
    assert code == 2 and "line 1" in err and "longer than" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_as_checks_jsonl_exits_2_without_blocking(tmp_path: Path) -> None:
    """A FIFO in place of checks.jsonl is refused at once (nobody writes to it)."""
    os.mkfifo(tmp_path / "checks.jsonl")
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch.cli", "show", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "expected a regular file, received a FIFO" in done.stderr
    assert "Traceback" not in done.stderr


def test_symlinked_checks_jsonl_is_refused_and_not_quoted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checks.jsonl linking to another file is refused; nothing of that file is printed."""
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "checks.jsonl").symlink_to(secret)
    code, out, err = run_cli(capsys, "show", str(report_dir))
    assert code == 2
    assert "symlink" in err
    assert "hunter2" not in out + err


def test_escape_sequences_in_names_never_reach_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Escapes and newlines in tensor names, notes and errors are printed as '?' by every view."""
    hostile = "w\x1b[2J\x1b]0;owned\x07\nalerts: none\r\u202e"
    result = result_of_tensors({hostile: 0.5, "b": 1e-9})
    result.notes = [f"note {hostile}"]
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.record(result, 0)
    for argv in (("show",), ("trend",), ("worst",), ("worst", "--step", "0")):
        _, out, err = run_cli(capsys, *argv, str(tmp_path))
        assert not any(c in out + err for c in "\x1b\x07\r\u202e"), argv
        assert "alerts: none" not in out.splitlines(), argv
    _, out, _ = run_cli(capsys, "show", "--json", str(tmp_path))
    assert "\x1b" not in out and json.loads(out)["exit_code"] == 1


class _ClosedPipe:
    """A stdout whose reader has gone (``| head -1`` after its line)."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        raise BrokenPipeError

    def flush(self) -> None:
        raise BrokenPipeError


def test_show_into_a_closed_pipe_keeps_the_alert_exit_code(
    resumed_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gradwatch show --json DIR | head -1` on a report with alerts still exits 1."""
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["show", "--json", str(resumed_run)]) == 1
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["show", str(resumed_run)]) == 1


@pytest.mark.parametrize(
    ("name", "message"),
    [("out.txt", "expected an image file ending in .png"), ("folder/", "the directory")],
)
def test_plot_refuses_a_path_that_is_not_an_image(
    resumed_run: Path, tmp_path: Path, name: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plot -o out.txt` and `plot -o dir/` exit 2 with a one-line message, nothing written."""
    pytest.importorskip("matplotlib")
    (tmp_path / "folder").mkdir()
    code, _, err = run_cli(capsys, "plot", str(resumed_run), "-o", str(tmp_path / name))
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out.txt").exists() and not (tmp_path / "folder.png").exists()


def test_plot_without_suffix_names_the_file_it_wrote(
    resumed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plot -o noext` writes noext.png and says so."""
    pytest.importorskip("matplotlib")
    code, out, _ = run_cli(capsys, "plot", str(resumed_run), "-o", str(tmp_path / "noext"))
    assert code == 0
    assert out.strip() == f"wrote {tmp_path / 'noext.png'}"
    assert (tmp_path / "noext.png").stat().st_size > 0
