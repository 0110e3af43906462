"""`GradWatch.due` returns the plan of a due check, which the caller hands to `run_check`."""

from __future__ import annotations

import numpy as np
import pytest

import gradwatch
from gradwatch import GradWatch
from gradwatch.watch.due import DueCheck


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _problem() -> tuple[dict[str, np.ndarray], float]:
    w = np.linspace(-1.0, 1.0, 40)
    return {"w": w}, float(np.sum(w**2))


def test_due_is_none_off_schedule_and_a_plan_on_it() -> None:
    """Off-schedule steps give None; a due step gives its step and the configured options."""
    watch = GradWatch(every=3, sample=None, top_k=4, report_dir=None)
    assert watch.due(1) is None and watch.due(2) is None
    due = watch.due(3)
    assert isinstance(due, DueCheck) and due
    assert due.step == 3 and due.note is None  # runs as configured: no budget note
    assert dict(due.options) == watch.check_options()
    assert watch.due(3) is due  # asked twice, the same plan (no second budget decision)
    with pytest.raises(TypeError):
        due.options["sample"] = 5  # type: ignore[index]


def test_the_budgets_choice_travels_in_the_plan_not_in_the_watch() -> None:
    """Under a budget the plan holds the reduced sample; the watch's own options stay as set."""
    clock = Clock()
    watch = GradWatch(every=1, sample=None, budget=0.05, report_dir=None, clock=clock)
    due = watch.due(0)
    assert due is not None and due.sample == "directional"  # the first budgeted check
    assert due.budget is not None and due.budget.action == "reduced"
    assert watch.check_options()["sample"] is None  # nothing hidden changed in the watch
    params, _ = _problem()
    w = params["w"]
    result = watch.run_check(
        due,
        lambda: gradwatch.check(lambda: float(np.sum(w**2)), params, {"w": 2 * w}, **due.options),
        source="test",
    )
    assert result.mode == "directional" and result.step == 0
    assert result.notes[-1] == due.note and (due.note or "").startswith("budget: ran sample=")


def test_after_backward_runs_the_plan_it_was_given() -> None:
    """The plain-loop hook checks with the plan's sample (the first budgeted one: directional)."""
    clock = Clock()
    params, _ = _problem()
    w = params["w"]
    with GradWatch(every=1, sample=None, budget=0.05, report_dir=None, clock=clock) as watch:
        result = watch.after_backward(
            0, loss=lambda: float(np.sum(w**2)), params=params, grads={"w": 2 * w}
        )
    assert result is not None and result.mode == "directional"
    assert any(note.startswith("budget: ran sample='directional'") for note in result.notes)


def test_a_bare_step_runs_the_configured_options_without_a_budget_note() -> None:
    """``run_check(step, ...)`` (no plan) still works: the configured options, no budget note."""
    clock = Clock()
    watch = GradWatch(every=1, sample=None, budget=0.05, report_dir=None, clock=clock)
    assert watch.due(0)  # the budget planned a reduced check ...
    params, _ = _problem()
    w = params["w"]
    result = watch.run_check(
        0,  # ... but this caller passes no plan: nothing reduced leaks into its result
        lambda: gradwatch.check(
            lambda: float(np.sum(w**2)), params, {"w": 2 * w}, **watch.check_options()
        ),
        source="test",
    )
    assert result.mode == "full" and result.step == 0
    assert not any(note.startswith("budget:") for note in result.notes)
