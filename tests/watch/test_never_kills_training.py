"""A check never kills training (docs/design.md#never-kills): check errors, report trouble."""

from __future__ import annotations

import errno
import json
import logging
import math
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

import gradwatch
from gradwatch import CheckResult, GradientCheckError, GradWatch, OptionError, load_report
from gradwatch.report import ReportWriter
from tests.reports import run_cli

Array = np.ndarray[Any, np.dtype[np.float64]]


class Model:
    """J = sum(w**2) + sum(c * b); `fail_at` makes the n-th loss evaluation raise."""

    def __init__(self) -> None:
        self.params = {"w": np.array([0.5, -1.25, 2.0]), "b": np.array([0.1, -0.3])}
        self.c = np.array([0.3, -0.2])
        self.evaluations = 0
        self.fail_at: int | None = None

    def loss(self) -> float:
        self.evaluations += 1
        if self.evaluations == self.fail_at:
            raise RuntimeError("CUDA out of memory (planted)")
        w, b = self.params["w"], self.params["b"]
        return float(np.sum(w * w) + np.sum(self.c * b) + 0.5 * np.sum(b * b))

    def grads(self, b_error: float = 0.0) -> dict[str, Array]:
        w, b = self.params["w"], self.params["b"]
        return {"w": 2 * w, "b": self.c + b + b_error}


def train(
    watch: GradWatch,
    steps: int,
    *,
    b_error: float = 0.0,
    before_step: Callable[[int, Model], None] = lambda step, model: None,
) -> list[CheckResult]:
    """Gradient descent with the watch after each backward; returns the recorded checks."""
    model = Model()
    results = []
    for step in range(steps):
        before_step(step, model)
        grads = model.grads(b_error)
        result = watch.after_backward(step, loss=model.loss, params=model.params, grads=grads)
        if result is not None:
            results.append(result)
        for name, grad in grads.items():
            model.params[name] -= 0.05 * grad
    return results


def fail_at_step(failing_step: int, evaluation: int = 3) -> Callable[[int, Model], None]:
    """A `before_step` that makes the check at `failing_step` raise at its n-th evaluation."""

    def arm(step: int, model: Model) -> None:
        model.fail_at = model.evaluations + evaluation if step == failing_step else None

    return arm


def fail_every_step(step: int, model: Model) -> None:
    """A `before_step` that makes every check raise at its first evaluation."""
    model.fail_at = model.evaluations + 1


# -- an exception inside a check ---------------------------------------------------------


def test_loss_raising_at_a_due_step_is_recorded_and_the_next_check_runs(tmp_path: Path) -> None:
    """A loss that raises mid-check gives an error result; training and later checks go on."""
    with GradWatch(every=2, sample=None, report_dir=tmp_path) as watch:
        results = train(watch, 6, before_step=fail_at_step(2))
    assert [(r.step, r.status) for r in results] == [(0, "ok"), (2, "error"), (4, "ok")]
    error = results[1]
    assert error.error == "RuntimeError: CUDA out of memory (planted)"
    assert error.error_source == "gradwatch.check"
    assert math.isnan(error.ratio) and error.loss_evals == 0
    assert error.tensors == {} and error.worst == []
    assert results[2].ratio < 1e-7
    assert watch.results == results


def test_error_check_is_logged_at_error_level_with_its_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The error check logs one error-level gradient_check_error event carrying the exception."""
    caplog.set_level(logging.INFO, logger="gradwatch")
    with capture_logs() as events, GradWatch(every=2, report_dir=tmp_path) as watch:
        train(watch, 3, before_step=fail_at_step(2))
    (event,) = [e for e in events if e["event"] == "gradient_check_error"]
    assert event["log_level"] == "error"
    assert event["step"] == 2
    assert event["source"] == "gradwatch.check"
    assert event["error"] == "RuntimeError: CUDA out of memory (planted)"
    assert isinstance(event["exc_info"], RuntimeError)
    assert [e["step"] for e in events if e["event"] == "gradient_check"] == [0]


def test_error_event_reaches_the_stdlib_logger_with_the_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without structlog configuration the error reaches logging with its traceback attached."""
    import structlog

    structlog.reset_defaults()
    caplog.set_level(logging.INFO, logger="gradwatch")
    with GradWatch(every=2, report_dir=tmp_path) as watch:
        train(watch, 3, before_step=fail_at_step(2))
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().startswith("gradient_check_error step=2")
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert "exc_info" not in record.gradwatch  # type: ignore[attr-defined]


def test_on_error_raise_reraises_the_original_exception_after_recording(tmp_path: Path) -> None:
    """on_error="raise" raises the loss's own exception, with the error check already on disk."""
    watch = GradWatch(every=2, report_dir=tmp_path, on_error="raise")
    with pytest.raises(RuntimeError, match="CUDA out of memory") as raised:
        train(watch, 6, before_step=fail_at_step(2))
    assert type(raised.value) is RuntimeError
    assert [(r.step, r.status) for r in watch.results] == [(0, "ok"), (2, "error")]
    assert load_report(tmp_path).checks[-1].status == "error"


def test_report_on_disk_holds_the_error_check_with_nan_kept(tmp_path: Path) -> None:
    """checks.jsonl and report.json keep the error check, its message and a NaN ratio (not null)."""
    with GradWatch(every=2, report_dir=tmp_path) as watch:
        train(watch, 4, before_step=fail_at_step(2))
    line = (tmp_path / "checks.jsonl").read_text().splitlines()[1]
    assert '"ratio":NaN' in line
    report = load_report(tmp_path)
    error = report.check_at(2)
    assert error.status == "error"
    assert error.error == "RuntimeError: CUDA out of memory (planted)"
    assert math.isnan(error.ratio) and math.isnan(error.loss)
    assert [check.step for check in report.errors] == [2]
    assert not report.alerts
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["last"]["status"] == "error"
    assert summary["checks"] == 2
    assert summary["configuration"]["on_error"] == "record"


def test_params_restored_bit_for_bit_after_the_loss_raises_mid_check(tmp_path: Path) -> None:
    """After a loss raising at any evaluation of a due check, every parameter has its bits."""
    for evaluation in (1, 2, 5, 9):
        model = Model()
        before = {name: value.copy() for name, value in model.params.items()}
        model.fail_at = evaluation
        with GradWatch(every=1, sample=None, report_dir=None) as watch:
            result = watch.after_backward(
                0, loss=model.loss, params=model.params, grads=model.grads()
            )
        assert result is not None and result.status == "error"
        for name, value in model.params.items():
            assert value.tobytes() == before[name].tobytes(), (evaluation, name)


def test_bad_grads_inside_a_due_check_are_an_error_check_not_a_crash() -> None:
    """A shape mismatch found by a due check is recorded (message kept); with "raise" it raises."""
    w = np.ones(3)
    arguments: dict[str, Any] = {
        "loss": lambda: float(np.sum(w**2)),
        "params": {"w": w},
        "grads": {"w": np.ones(4)},
    }
    result = GradWatch(every=1, report_dir=None).after_backward(0, **arguments)
    assert result is not None and result.status == "error"
    assert result.error is not None
    assert result.error.startswith("ParameterError: grads['w']: expected shape (3,)")
    with pytest.raises(gradwatch.ParameterError, match="expected shape"):
        GradWatch(every=1, report_dir=None, on_error="raise").after_backward(0, **arguments)


def test_keyboard_interrupt_and_gradient_check_error_propagate_unrecorded() -> None:
    """Ctrl-C inside a check and an on_alert="raise" stop training as before."""
    watch = GradWatch(every=1, report_dir=None)

    def interrupted() -> CheckResult:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        watch.run_check(0, interrupted, source="test")
    assert watch.results == []
    raising = GradWatch(every=5, report_dir=None, on_alert="raise")
    with pytest.raises(GradientCheckError, match="wrong tensor: b"):
        train(raising, 6, b_error=0.1)


def test_run_check_records_notes_and_source_of_an_integration() -> None:
    """run_check keeps the exception's notes and the caller's source, and times the failure."""
    clock = iter([0.0, 10.0, 12.5, 13.0, 13.0, 13.0])
    watch = GradWatch(every=1, report_dir=None, clock=lambda: next(clock))

    def shadow_forward() -> CheckResult:
        error = RuntimeError("mixed dtype (CPU)")
        error.add_note("raised in gradwatch's float64 copy of the model")
        raise error

    assert watch.due(0)
    result = watch.run_check(0, shadow_forward, source="gradwatch.integrations.torch")
    assert result.error == (
        "RuntimeError: mixed dtype (CPU); raised in gradwatch's float64 copy of the model"
    )
    assert result.error_source == "gradwatch.integrations.torch"
    assert result.seconds == 2.5
    assert result.step == 0


def test_on_error_option_is_validated_at_construction(tmp_path: Path) -> None:
    """An unknown on_error is an OptionError at construction, naming both choices."""
    with pytest.raises(OptionError, match='on_error: expected "record" or "raise"'):
        GradWatch(report_dir=tmp_path / "never", on_error="ignore")  # type: ignore[arg-type]


def test_show_prints_the_error_check_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """gradwatch show names the step, source and message of an error check and exits 1."""
    with GradWatch(every=2, report_dir=tmp_path) as watch:
        train(watch, 6, before_step=fail_at_step(2))
    code, out, _ = run_cli(capsys, "show", str(tmp_path))
    assert code == 1
    assert "errors: 1 check could not run, first at step 2" in out
    assert "step 2: error in gradwatch.check: RuntimeError: CUDA out of memory (planted)" in out
    assert "max " in out and "nan" not in out.lower()
    code, out, _ = run_cli(capsys, "show", str(tmp_path), "--json")
    payload = json.loads(out)
    assert code == payload["exit_code"] == 1
    assert payload["errors"] == [
        {
            "step": 2,
            "error": "RuntimeError: CUDA out of memory (planted)",
            "source": "gradwatch.check",
        }
    ]


def test_trend_worst_and_show_cope_with_a_report_of_errors_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """trend, worst and show read a report whose every check is an error, without crashing."""
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        train(watch, 2, before_step=fail_every_step)
    assert [check.status for check in load_report(tmp_path).checks] == ["error", "error"]
    code, out, _ = run_cli(capsys, "trend", str(tmp_path))
    assert code == 0 and "steps 0, 1" in out and "no check ran to completion" in out
    code, out, _ = run_cli(capsys, "worst", str(tmp_path), "--step", "1")
    assert code == 0 and out.startswith("step 1: error in gradwatch.check: RuntimeError")
    code, out, _ = run_cli(capsys, "show", str(tmp_path))
    assert code == 1 and "ratio: - (no check ran to completion)" in out


def test_trend_draws_completed_checks_around_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """trend leaves the error check out of the ratio rows and lists its step instead."""
    with GradWatch(every=2, report_dir=tmp_path) as watch:
        train(watch, 6, before_step=fail_at_step(2))
    code, out, _ = run_cli(capsys, "trend", str(tmp_path))
    assert code == 0
    assert "could not run (error), not drawn: steps 2" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("global", "w"))}
    assert len(rows["global"].split()[1]) == 2  # steps 0 and 4
    assert "threshold from" not in rows["global"]
    code, out, _ = run_cli(capsys, "worst", str(tmp_path))
    assert code == 0 and out.startswith(("step 0:", "step 4:"))


# -- reporting trouble -------------------------------------------------------------------


def no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_delivers_every_alert_and_keeps_every_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every report write failing ENOSPC, alerts all reach on_alert and nothing raises."""
    received: list[CheckResult] = []
    watch = GradWatch(every=1, report_dir=tmp_path, on_alert=received.append)
    watch.open()  # the disk fills up after the report opened (it opens at the first write)
    monkeypatch.setattr(ReportWriter, "append_line", no_space)
    monkeypatch.setattr(ReportWriter, "write_summary", no_space)
    with capture_logs() as events:
        results = train(watch, 12, b_error=0.1)
        watch.close()
    assert len(results) == len(received) == 12
    assert all(result.status == "fail" for result in results)
    assert watch.results == results
    failures = [e for e in events if e["event"] == "report_write_failed"]
    assert sorted(Path(e["path"]).name for e in failures) == ["checks.jsonl", "report.json"]
    assert all(e["error"] == "ENOSPC: No space left on device" for e in failures)
    assert all(e["log_level"] == "error" for e in failures)
    (incomplete,) = [e for e in events if e["event"] == "report_incomplete"]
    assert incomplete["unwritten_checks"] == 12 and not incomplete["summary_written"]
    assert len([e for e in events if e["event"] == "gradient_alert"]) == 12


def test_full_disk_with_on_alert_raise_still_raises_the_alert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """on_alert="raise" delivers its GradientCheckError even when the report cannot be written."""
    watch = GradWatch(every=1, report_dir=tmp_path, on_alert="raise")
    monkeypatch.setattr(ReportWriter, "append_line", no_space)
    with pytest.raises(GradientCheckError) as raised:
        train(watch, 3, b_error=0.1)
    assert raised.value.result.step == 0
    assert watch.results == [raised.value.result]
    watch.close()


def test_checks_missed_while_the_disk_was_full_are_written_once_it_frees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After ENOSPC clears, the checks kept in memory reach checks.jsonl, in step order."""
    real_append = ReportWriter.append_line
    disk_full = True

    def append_line(writer: ReportWriter, result: CheckResult) -> None:
        if disk_full:
            no_space()
        real_append(writer, result)

    def free_space_at_step_5(step: int, model: Model) -> None:
        nonlocal disk_full
        disk_full = step < 5

    monkeypatch.setattr(ReportWriter, "append_line", append_line)
    with capture_logs() as events, GradWatch(every=1, report_dir=tmp_path) as watch:
        train(watch, 8, before_step=free_space_at_step_5)
    report = load_report(tmp_path)
    assert report.steps == list(range(8))
    assert report.closed
    logged = [e["event"] for e in events if e["event"].startswith("report_")]
    assert logged == ["report_write_failed"]  # once, and nothing incomplete at close


def test_close_never_raises_when_report_json_cannot_be_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PermissionError from tempfile at close is logged; checks.jsonl keeps every check."""

    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied")

    watch = GradWatch(every=1, report_dir=tmp_path)
    train(watch, 3)
    monkeypatch.setattr("gradwatch.store.writer.tempfile.mkstemp", refuse)
    with capture_logs() as events:
        watch.close()
        watch.close()
    (failure,) = [e for e in events if e["event"] == "report_write_failed"]
    assert failure["path"] == str(tmp_path.absolute() / "report.json")
    assert failure["error"] == "EACCES: Permission denied"
    assert load_report(tmp_path).steps == [0, 1, 2]


_SIZE_LIMITED_TRAINER = textwrap.dedent(
    """
    import resource, signal, sys
    import numpy as np
    import gradwatch

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    w = np.linspace(-1.0, 1.0, 8)
    watch = gradwatch.GradWatch(every=1, sample=None, report_dir=sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    for step in range(60):
        watch.after_backward(
            step, loss=lambda: float(np.sum(w**2)), params={"w": w}, grads={"w": 2 * w}
        )
        w -= 0.01 * 2 * w
    watch.close()
    print("trained", len(watch.results))
    """
)


def test_file_size_limit_leaves_training_running_and_the_report_loadable(tmp_path: Path) -> None:
    """Under a 20 kB file-size limit (EFBIG), training ends and checks.jsonl has no cut line."""
    finished = subprocess.run(
        [sys.executable, "-c", _SIZE_LIMITED_TRAINER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split() == ["trained", "60"]
    assert "report_write_failed" in finished.stderr and "EFBIG" in finished.stderr
    assert (tmp_path / "checks.jsonl").read_bytes().endswith(b"}\n")
    report = load_report(tmp_path)  # a cut line would warn or fail here
    assert not report.warnings
    assert 0 < len(report.checks) < 60
    assert report.steps == list(range(len(report.checks)))
