"""The time budget sizes each due check to the allowance; deterministic (injected clock)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

import gradwatch
from gradwatch import CheckResult, GradWatch, load_report
from gradwatch.callback import Sample
from gradwatch.check import checked_components, planned_evaluations


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fake_result(
    sample: Sample, *, size: int = 100_000, tensors: int = 50, seconds_per_eval: float = 0.01
) -> tuple[CheckResult, float]:
    """What a check with `sample` on a clean model of `size` components would return.

    Evaluations are what gradwatch.check spends on a correct model (planned_evaluations).
    """
    evaluations = planned_evaluations(sample, size, tensors)
    checked = checked_components(sample, size, tensors)
    mode = (
        "directional"
        if sample == "directional" or (sample == "auto" and size > 2000)
        else "sampled"
    )
    seconds = evaluations * seconds_per_eval
    per_tensor = {
        f"t{i}": {"ratio": 1e-9, "checked": 1, "size": 1, "max_abs_error": 0.0, "status": "ok"}
        for i in range(tensors)
    }
    result = CheckResult.model_validate(
        {
            "ratio": 1e-9,
            "status": "ok",
            "tensors": per_tensor,
            "worst": [],
            "eps": 1e-6,
            "eps_policy": "given",
            "checked": checked,
            "size": size,
            "loss": 1.0,
            "loss_evals": evaluations,
            "seconds": seconds,
            "regularization": {},
            "mode": mode,
        }
    )
    return result, seconds


def run(
    watch: GradWatch,
    clock: FakeClock,
    steps: int,
    step_seconds: float,
    **model: Any,
) -> list[tuple[int, Sample]]:
    """Train `steps` steps of `step_seconds`; due checks take their fake cost on the clock."""
    ran = []
    for step in range(steps):
        due = watch.due(step)
        if due:
            sample = due.sample
            result, seconds = fake_result(sample, **model)
            clock.advance(seconds)
            watch.record(result, due, seconds=seconds)
            ran.append((step, sample))
        clock.advance(step_seconds)
    return ran


def test_no_budget_runs_every_due_check_as_configured() -> None:
    """Without a budget the configured sample runs at every due step, however costly."""
    clock = FakeClock()
    watch = GradWatch(every=10, report_dir=None, clock=clock)
    assert run(watch, clock, 30, 0.001) == [(0, "auto"), (10, "auto"), (20, "auto")]
    assert watch.skipped == []


def test_first_budgeted_check_is_directional() -> None:
    """With no cost estimate yet, the first check is the cheapest covering every tensor."""
    clock = FakeClock()
    watch = GradWatch(every=10, sample=None, report_dir=None, budget=0.05, clock=clock)
    due = watch.due(0)
    assert due is not None and due.sample == "directional"
    result, seconds = fake_result("directional")
    stamped = watch.record(result, due, seconds=seconds)
    assert any(note.startswith("budget: ran sample='directional'") for note in stamped.notes)
    assert watch.plans[0].action == "reduced"


def test_budget_runs_the_auto_screen_on_a_large_model() -> None:
    """A large model: auto's joint screen (6 evaluations) fits where 2 per tensor would not."""
    clock = FakeClock()
    # 50 tensors: directional = 102 evaluations = 1.02 s, the auto screen 6 = 0.06 s; every
    # 100 steps of 0.01 s = 1 s of training; budget 20% accrues 0.2 s per interval.
    watch = GradWatch(every=100, report_dir=None, budget=0.2, clock=clock)
    ran = run(watch, clock, 400, 0.01)
    assert ran == [(0, "auto"), (100, "auto"), (200, "auto"), (300, "auto")]
    assert [plan.action for plan in watch.plans] == ["run", "run", "run", "run"]


def test_budget_sizes_a_component_sample_to_the_allowance() -> None:
    """A small model checked in full: the budget picks the k components it can afford."""
    clock = FakeClock()
    # 1000 components, 2 tensors, 10 ms per evaluation: full = 2022 evals = 20 s.
    # Training 100 steps x 0.5 s = 50 s per interval; budget 20% = 10 s -> about 480 comps.
    watch = GradWatch(every=100, sample=None, report_dir=None, budget=0.2, clock=clock)
    ran = run(watch, clock, 300, 0.5, size=1000, tensors=2)
    assert ran[0] == (0, "directional")
    k = ran[1][1]
    assert isinstance(k, int) and 250 <= k < 1000
    cost = (2 * k + 22) * 0.01
    assert cost <= 0.2 * 50 - 0.06  # fits the allowance (minus the first check's cost)
    assert (2 * (k + 10) + 22) * 0.01 > 0.2 * 50 - 0.06 - 0.2  # and is about the largest that does
    assert watch.results[1].step == 100
    assert any("instead of None (full)" in note for note in watch.results[1].notes)


def test_budget_skips_at_most_two_due_checks_in_a_row(tmp_path: Path) -> None:
    """Checks that cost more than budget x training are skipped with the reason, but never
    more than two due checks in a row: the third runs the cheapest check (no starvation)."""
    clock = FakeClock()
    # directional = 1.02 s, the auto screen 0.06 s; 100 steps x 0.01 s = 1 s of training
    # per interval; budget 1%: 0.01 s accrues per interval, so even the screen is over it.
    watch = GradWatch(
        every=100, sample="directional", report_dir=tmp_path, budget=0.01, clock=clock
    )
    ran = run(watch, clock, 3000, 0.01)
    watch.close()
    steps = [step for step, _ in ran]
    assert steps[0] == 0
    assert all(later - earlier <= 300 for earlier, later in itertools.pairwise(steps))
    assert [sample for _, sample in ran[1:]] == ["auto"] * (len(ran) - 1)  # the cheapest
    total_check = sum(result.seconds for result in watch.results)
    assert total_check <= 1.02 + 0.06 * 10  # the first check, then one screen per 3 intervals
    report = load_report(tmp_path)
    assert report.skipped and report.skipped[0].step == 100
    assert "even the cheapest check ('auto'" in report.skipped[0].reason
    assert "exceeds the allowance" in report.skipped[0].reason
    assert any("run anyway: 2 due check(s) in a row were skipped" in n for n in ran_notes(watch))


def ran_notes(watch: GradWatch) -> list[str]:
    """Every note of every recorded check."""
    return [note for result in watch.results for note in result.notes]


@pytest.mark.parametrize("budget", [0.01, 0.03, 0.1])
def test_share_of_training_time_stays_within_budget(budget: float) -> None:
    """Over a long run the checks take at most the budget share, up to the first check."""
    clock = FakeClock()
    watch = GradWatch(every=50, report_dir=None, budget=budget, clock=clock)
    steps, step_seconds = 5000, 0.02
    ran = run(watch, clock, steps, step_seconds, tensors=40, seconds_per_eval=0.005)
    first = fake_result("auto", tensors=40, seconds_per_eval=0.005)[1]
    training = steps * step_seconds
    check_seconds = sum(result.seconds for result in watch.results)
    assert check_seconds <= budget * training + first
    affordable = min(steps // 50, int(budget * training / first))
    assert len(ran) >= affordable - 3  # the allowance is used, not wasted


def test_cost_model_separates_fixed_and_per_evaluation_cost() -> None:
    """After checks of two sizes, a fixed cost per check is learned, not charged per evaluation."""
    clock = FakeClock()
    watch = GradWatch(every=1, sample=None, report_dir=None, budget=1.0, clock=clock)
    for step, (evaluations, seconds) in enumerate([(100, 1.5), (300, 2.5)]):
        clock.advance(100.0)
        assert watch.due(step)
        result, _ = fake_result(None, size=10)
        watch.record(result.model_copy(update={"loss_evals": evaluations}), step, seconds=seconds)
    fixed, per_evaluation = watch._cost_model()  # type: ignore[misc]
    assert fixed == pytest.approx(1.0)
    assert per_evaluation == pytest.approx(0.005)


def test_real_checks_with_a_budget_still_catch_a_bug(tmp_path: Path) -> None:
    """End to end with gradwatch.check: budget-reduced checks still name the wrong tensor."""
    clock = FakeClock()
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((30, 30)), "b": rng.standard_normal(30)}

    def loss() -> float:
        clock.advance(0.001)  # each evaluation of J costs 1 ms
        return float(np.sum(np.tanh(params["w"] @ params["b"])))

    def grads() -> dict[str, np.ndarray]:
        d = 1 - np.tanh(params["w"] @ params["b"]) ** 2
        return {"w": np.outer(d, params["b"]), "b": params["w"].T @ d * 1.01}  # 1% bug in b

    watch = GradWatch(every=10, sample=None, report_dir=tmp_path, budget=0.05, clock=clock)
    for step in range(40):
        watch.after_backward(step, loss=loss, params=params, grads=grads())
        clock.advance(0.5)
    watch.close()
    report = load_report(tmp_path)
    assert report.alerts
    assert {alert.tensor for alert in report.alerts} == {"b"}
    assert watch.plans[0].sample == "directional"
    assert any(isinstance(plan.sample, int) for plan in watch.plans)


def test_budget_leaves_localization_only_what_the_allowance_affords() -> None:
    """After the first check, the watch passes the evaluations the allowance leaves for
    localizing a failing check, and that shrinks when the allowance does."""
    clock = FakeClock()
    watch = GradWatch(every=100, report_dir=None, budget=0.2, clock=clock)
    given = []
    for step in range(400):
        due = watch.due(step)
        if due:
            given.append(due.options.get("localize_evaluations"))
            result, seconds = fake_result(due.sample)
            clock.advance(seconds)
            watch.record(result, due, seconds=seconds)
        clock.advance(0.01)
    assert given[0] == 0  # the first check localizes nothing in the core (bounded)
    # The allowance (20% of training, unused allowance carried over) minus the 0.06 s
    # screen, at 0.01 s an evaluation: 8 at step 100, then 14 more per 100 steps.
    expected = [
        round((cast(float, p.allowance) - cast(float, p.estimate)) / 0.01) for p in watch.plans[1:]
    ]
    assert given[1:] == expected and expected[0] == 8 and expected[1] - expected[0] == 14


def test_a_failing_check_stays_within_its_localization_evaluations() -> None:
    """`localize_evaluations` caps what a failing auto check spends localizing, and the
    tensors it could not afford are named in a note."""
    rng = np.random.default_rng(0)
    params = {f"t{i}": rng.standard_normal(300) for i in range(10)}
    targets = {name: rng.standard_normal(300) for name in params}

    def loss() -> float:
        return float(sum(0.5 * np.sum((params[n] - targets[n]) ** 2) for n in params))

    grads = {n: 1.1 * (params[n] - targets[n]) for n in params}  # every tensor 10% off
    full = gradwatch.check(loss, params, grads, sample="auto")
    capped = gradwatch.check(loss, params, grads, sample="auto", localize_evaluations=40)
    assert full.status == capped.status == "fail"
    assert capped.loss_evals < full.loss_evals
    assert capped.loss_evals <= full.loss_evals - (240 - 40) + 2 * 10 + 40
    assert any("not localized (the localization budget of 40" in n for n in capped.notes)
