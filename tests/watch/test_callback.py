"""GradWatch with the real gradwatch.check: schedule, alerts, logging, budget, bad options."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from structlog.testing import capture_logs

import gradwatch
from gradwatch import CheckResult, GradientCheckError, GradWatch, OptionError, load_report

Array = np.ndarray[Any, np.dtype[np.float64]]


class Quadratic:
    """J = 0.5 * sum(w * a * w) + sum(c * b); backward may scale b's gradient by `b_error`."""

    def __init__(self) -> None:
        self.params = {"w": np.array([0.5, -1.0, 2.0]), "b": np.zeros(2)}
        self.a = np.array([1.0, 2.0, 3.0])
        self.c = np.array([0.3, -0.2])
        self.evaluations = 0

    def loss(self) -> float:
        self.evaluations += 1
        w, b = self.params["w"], self.params["b"]
        return float(0.5 * np.sum(self.a * w * w) + np.sum(self.c * b) + 0.5 * np.sum(b * b))

    def grads(self, b_error: float = 0.0) -> dict[str, Array]:
        w, b = self.params["w"], self.params["b"]
        # b_error plants a bug proportional to b: invisible while b == 0.
        return {"w": self.a * w, "b": self.c + b + b_error * b}

    def update(self, grads: dict[str, Array], learning_rate: float = 0.1) -> None:
        for name, grad in grads.items():
            self.params[name] -= learning_rate * grad


def train(
    watch: GradWatch, steps: int, *, b_error: float = 0.0
) -> tuple[Quadratic, list[CheckResult]]:
    """Gradient descent on the quadratic, with the watch called after each backward."""
    model = Quadratic()
    results = []
    for step in range(steps):
        grads = model.grads(b_error)
        result = watch.after_backward(step, loss=model.loss, params=model.params, grads=grads)
        if result is not None:
            results.append(result)
        model.update(grads)
    return model, results


def test_checks_run_on_schedule_including_the_first_update(tmp_path: Path) -> None:
    """every=4 over 10 steps checks steps 0, 4 and 8, and J is not evaluated otherwise."""
    watch = GradWatch(every=4, sample=None, report_dir=tmp_path)
    model = Quadratic()
    checked = []
    for step in range(10):
        before = model.evaluations
        result = watch.after_backward(
            step, loss=model.loss, params=model.params, grads=model.grads()
        )
        if result is None:
            assert model.evaluations == before
        else:
            checked.append(result.step)
    watch.close()
    assert checked == [0, 4, 8]
    assert [bool(watch.due(step)) for step in range(6)] == [True, False, False, False, True, False]
    assert load_report(tmp_path).steps == [0, 4, 8]


def test_correct_gradient_passes_without_alert(tmp_path: Path) -> None:
    """A correct backward gives textbook ratios and no alert event."""
    with capture_logs() as events, GradWatch(every=5, report_dir=tmp_path) as watch:
        _, results = train(watch, 20)
    assert [result.status for result in results] == ["ok"] * 4
    assert max(result.ratio for result in results) < 1e-7
    assert not [event for event in events if event["event"] == "gradient_alert"]
    assert not load_report(tmp_path).alerts


def test_late_bug_is_caught_after_training_moves_the_weights(tmp_path: Path) -> None:
    """A bug proportional to b passes at step 0 (b = 0) and alerts later, naming b."""
    with capture_logs() as events, GradWatch(every=5, report_dir=tmp_path) as watch:
        _, results = train(watch, 30, b_error=0.05)
    assert results[0].status == "ok"
    assert results[-1].status == "fail"
    alerts = [event for event in events if event["event"] == "gradient_alert"]
    assert alerts
    assert alerts[0]["log_level"] == "error"
    assert {event["tensor"] for event in alerts} == {"b"}
    report = load_report(tmp_path)
    assert report.alerts[0].step == alerts[0]["step"] > 0
    assert report.alerts[-1].tensor == "b"


def test_check_event_carries_the_run_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each check logs step, ratio, status, components checked, seconds and worst component."""
    caplog.set_level(logging.INFO, logger="gradwatch")
    with capture_logs() as events, GradWatch(every=1, sample=None, report_dir=tmp_path) as watch:
        train(watch, 1)
    (event,) = [event for event in events if event["event"] == "gradient_check"]
    assert event["step"] == 0
    assert event["status"] == "ok"
    assert event["checked"] == event["size"] == 5
    assert event["ratio"] < 1e-7
    assert event["seconds"] > 0
    assert event["worst"].startswith(("w[", "b["))


def test_events_reach_the_stdlib_logger_without_configuration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With structlog unconfigured, events reach logging.getLogger("gradwatch") with fields."""
    structlog.reset_defaults()
    assert not structlog.is_configured()
    caplog.set_level(logging.INFO, logger="gradwatch")
    with GradWatch(every=5, report_dir=tmp_path) as watch:
        train(watch, 30, b_error=0.05)
    records = [record for record in caplog.records if record.name == "gradwatch"]
    alerts = [record for record in records if record.levelno == logging.ERROR]
    assert alerts
    assert alerts[0].getMessage().startswith("gradient_alert step=")
    assert alerts[0].gradwatch["tensor"] == "b"  # type: ignore[attr-defined]
    assert records[0].gradwatch["event"] == "gradient_check"  # type: ignore[attr-defined]
    assert logging.getLogger("gradwatch").handlers == []
    assert not structlog.is_configured()


def test_on_alert_raise_stops_training_after_writing_the_check(tmp_path: Path) -> None:
    """on_alert="raise" raises GradientCheckError carrying the stamped failing result."""
    watch = GradWatch(every=5, report_dir=tmp_path, on_alert="raise")
    with pytest.raises(GradientCheckError, match="wrong tensor: b") as raised:
        train(watch, 30, b_error=0.05)
    failing_step = raised.value.result.step
    assert failing_step is not None and failing_step > 0
    assert load_report(tmp_path).steps[-1] == failing_step


def test_on_alert_callable_receives_each_failing_result(tmp_path: Path) -> None:
    """A callable on_alert is called once per failing check with its result."""
    received: list[CheckResult] = []
    with GradWatch(every=5, report_dir=tmp_path, on_alert=received.append) as watch:
        _, results = train(watch, 30, b_error=0.05)
    assert received == [result for result in results if result.status == "fail"]
    assert received


def test_regularization_is_part_of_j(tmp_path: Path) -> None:
    """An L2 term passed to after_backward makes a backward that adds its gradient pass."""
    w = np.array([0.4, -0.7])
    l2 = gradwatch.L2(0.5, m=2)
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        result = watch.after_backward(
            0,
            loss=lambda: float(np.sum(w**3)),
            params={"w": w},
            grads={"w": 3 * w**2 + 0.5 / 2 * w},
            regularization=[l2],
        )
    assert result is not None and result.status == "ok"
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["configuration"]["regularization"] == list(result.regularization)


def test_budget_skips_due_checks_while_checks_dominate(tmp_path: Path) -> None:
    """With a 50% budget and near-instant steps, due checks are skipped, never more than
    two in a row (the third runs the cheapest check: no starvation)."""
    w = np.ones(3)

    def slow_loss() -> float:
        time.sleep(0.002)
        return float(np.sum(w**2))

    with GradWatch(every=1, sample=None, report_dir=tmp_path, budget=0.5) as watch:
        checked = [
            step
            for step in range(8)
            if watch.after_backward(step, loss=slow_loss, params={"w": w}, grads={"w": 2 * w})
        ]
    assert checked == [0, 3, 6]
    report = load_report(tmp_path)
    assert [skip.step for skip in report.skipped] == [1, 2, 4, 5, 7]
    assert report.skipped[0].share > 0.5


def test_budget_lets_checks_resume_once_training_time_catches_up(tmp_path: Path) -> None:
    """Once training time dilutes the check time below the budget, checks run again."""
    w = np.ones(2)

    def slow_loss() -> float:
        time.sleep(0.001)
        return float(np.sum(w**2))

    checked = []
    with GradWatch(every=1, sample=None, report_dir=tmp_path, budget=0.5) as watch:
        for step in range(6):
            if watch.after_backward(step, loss=slow_loss, params={"w": w}, grads={"w": 2 * w}):
                checked.append(step)
            time.sleep(0.2)  # a training step much slower than a check
    assert checked == list(range(6))


def test_due_check_options_and_record_compose_like_after_backward(tmp_path: Path) -> None:
    """An integration's due/record sequence (the plan's options) gives the same report."""
    model = Quadratic()
    with GradWatch(every=2, sample=None, report_dir=tmp_path, top_k=3) as watch:
        for step in range(5):
            due = watch.due(step)
            if due:
                result = gradwatch.check(model.loss, model.params, model.grads(), **due.options)
                watch.record(result, due)
    assert watch.check_options() == {
        "eps": None,
        "sample": None,
        "seed": 0,
        "top_k": 3,
        "warn": 1e-5,
        "threshold": 1e-3,
    }
    assert load_report(tmp_path).steps == [0, 2, 4]


def test_close_marks_the_report_closed_and_refuses_more_checks(tmp_path: Path) -> None:
    """After close (or leaving the with block) report.json is closed and record is refused."""
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        train(watch, 2)
        assert not load_report(tmp_path).closed
    assert load_report(tmp_path).closed
    with pytest.raises(gradwatch.ReportError, match="closed"):
        train(watch, 1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every": 0}, "every: expected an int >= 1 .* received 0"),
        ({"every": 2.5}, "every: expected an int >= 1 .* received 2.5"),
        ({"every": True}, "every: expected an int >= 1 .* received True"),
        ({"on_alert": "email"}, 'on_alert: expected "log", "raise" or a callable.*\'email\''),
        ({"budget": 1.5}, r"budget: expected None or a share of training time in \(0, 1\]"),
        ({"sample": 1.5}, r"sample: expected a fraction in \(0, 1\], received 1.5"),
        ({"sample": "half"}, "sample: expected None, \"auto\".*received 'half'"),
        ({"eps": -1e-7}, "eps: expected None or a finite float > 0, received -1e-07"),
        ({"warn": 1e-2}, "warn: expected warn <= threshold"),
    ],
)
def test_bad_options_fail_at_construction(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    """Out-of-range options raise OptionError naming expected and received values."""
    with pytest.raises(OptionError, match=message):
        GradWatch(report_dir=tmp_path / "never", **options)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("step", [-1, 1.0, "3"])
def test_bad_step_is_refused(step: object) -> None:
    """A step that is not an int >= 0 is an OptionError, not a silent skip."""
    watch = GradWatch(every=1, report_dir=None)
    bad: Callable[..., object] = watch.due
    with pytest.raises(OptionError, match="step: expected an int >= 0"):
        bad(step)


def test_set_context_refuses_values_json_cannot_hold() -> None:
    """set_context values must be JSON-serializable, and the error says which key."""
    watch = GradWatch(every=1, report_dir=None)
    with pytest.raises(OptionError, match="set_context model: expected a JSON-serializable"):
        watch.set_context(model=object())
