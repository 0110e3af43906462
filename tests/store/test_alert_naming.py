"""Which tensor an alert names when several fail."""

from __future__ import annotations

from gradwatch.report import alert_for
from gradwatch.result import CheckResult, Component, TensorResult


def _result(ratios: dict[str, float], worst_tensor: str) -> CheckResult:
    tensors = {
        name: TensorResult(ratio=r, checked=1, size=4, max_abs_error=r, status="fail")
        for name, r in ratios.items()
    }
    worst = Component(
        tensor=worst_tensor,
        index=[0],
        name=f"{worst_tensor}[0]",
        analytic=0.0,
        numeric=1.0,
        abs_error=1.0,
        rel_error=1.0,
    )
    return CheckResult(
        ratio=0.5,
        status="fail",
        tensors=tensors,
        worst=[worst],
        eps=1e-6,
        eps_policy="given",
        checked=3,
        size=12,
        loss=1.0,
        loss_evals=10,
        seconds=0.1,
        regularization={},
    )


def test_tied_failing_tensors_are_decided_by_the_worst_component() -> None:
    """Two tensors at ratio 1 (a sign disagreement): the alert names the one holding the worst
    measured component, not the first in model order."""
    alert = alert_for(
        _result({"layers.0.v": 1.0, "layers.1.v": 1.0, "layers.1.q": 0.3}, "layers.1.v")
    )
    assert alert is not None and alert.tensor == "layers.1.v"


def test_a_clearly_larger_ratio_wins_over_the_worst_component() -> None:
    """A tensor with a clearly larger ratio is named even when the worst component is elsewhere."""
    alert = alert_for(_result({"a": 1.0, "b": 0.5}, "b"))
    assert alert is not None and alert.tensor == "a"
