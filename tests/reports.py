"""What the tests of the report and its views share: hand-built results and the CLI in-process."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest

from gradwatch import CheckResult, Component, TensorResult
from gradwatch.cli import main


def result_of_ratio(ratio: float, *, tensor_ratios: dict[str, float] | None = None) -> CheckResult:
    """A CheckResult as `gradwatch.check` would return it (no step yet)."""
    tensor_ratios = tensor_ratios or {"W": ratio, "b": ratio / 10}
    status = "fail" if ratio >= 1e-3 or math.isnan(ratio) else "ok"
    tensors = {
        name: TensorResult(
            ratio=value,
            checked=4,
            size=4,
            max_abs_error=value,
            status="fail" if value >= 1e-3 or math.isnan(value) else "ok",
        )
        for name, value in tensor_ratios.items()
    }
    worst_tensor = max(tensor_ratios, key=lambda name: tensor_ratios[name])
    worst = [
        Component(
            tensor=worst_tensor,
            index=[1, 0],
            name=f"{worst_tensor}[1, 0]",
            analytic=0.5,
            numeric=0.5 + ratio,
            abs_error=ratio,
            rel_error=ratio,
            diagnosis="bug" if status == "fail" else None,
        )
    ]
    return CheckResult(
        ratio=ratio,
        status=status,
        tensors=tensors,
        worst=worst,
        eps=1e-7,
        eps_policy="given",
        checked=8,
        size=8,
        loss=0.25,
        loss_evals=18,
        seconds=0.001,
        regularization={"L2(lambd=0.7)": 0.01},
    )


def result_of_tensors(ratios: dict[str, float]) -> CheckResult:
    """A two-tensor check whose global ratio is the largest per-tensor ratio."""
    tensors = {
        name: TensorResult(
            ratio=ratio,
            checked=6,
            size=6,
            max_abs_error=ratio,
            status="fail" if ratio >= 1e-3 else "ok",
        )
        for name, ratio in ratios.items()
    }
    worst = sorted(ratios, key=lambda name: -ratios[name])
    components = [
        Component(
            tensor=name,
            index=[position, 0],
            name=f"{name}[{position}, 0]",
            analytic=1.0 + ratios[name],
            numeric=1.0,
            abs_error=ratios[name],
            rel_error=ratios[name] / 2,
            diagnosis="bug" if ratios[name] >= 1e-3 else None,
        )
        for position, name in enumerate(worst)
    ]
    ratio = max(ratios.values())
    return CheckResult(
        ratio=ratio,
        status="fail" if ratio >= 1e-3 else "ok",
        tensors=tensors,
        worst=components,
        eps=1e-7,
        eps_policy="given",
        checked=12,
        size=12,
        loss=0.5,
        loss_evals=26,
        seconds=0.01,
        regularization={},
    )


class Ran(NamedTuple):
    """What one `gradwatch` command did: its exit code and what it printed."""

    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Ran:
    """Runs `gradwatch ARGV...` in this process, as a user would type it."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return Ran(code, captured.out, captured.err)
