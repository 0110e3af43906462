"""One check in progress, and what its comparisons found before the verdict.

`gradwatch.check` starts a `CheckRun` (the step, the tolerances, J(theta) probed) and
hands it to each part of its pipeline: the component-wise comparison here, the
``"auto"`` screen and its follow-ups in `gradwatch.engine.auto`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwatch.engine.comparison import Comparison
from gradwatch.engine.diagnosis import label_worst
from gradwatch.engine.differences import componentwise
from gradwatch.engine.objective import Evaluator
from gradwatch.engine.sampling import Plan
from gradwatch.params import NamedTensors
from gradwatch.result import Component, Mode, TensorResult

__all__ = ["CheckRun", "Measured", "components"]


@dataclass(kw_only=True)
class CheckRun:
    """One check in progress: what each step of the pipeline reads, and the notes it adds."""

    objective: Evaluator
    tensors: NamedTensors
    dtype: np.dtype[np.floating]
    """The coarsest dtype of the parameters: it sets the step and the tolerances."""
    eps: float | None
    base_step: float
    warn: float
    threshold: float
    seed: int
    top_k: int
    diagnose: bool
    loss0: float
    """J(theta), the loss at the unperturbed parameters (regularization aside)."""
    nondeterministic: bool
    notes: list[str]

    @property
    def step_given(self) -> bool:
        return self.eps is not None

    def note(self, text: str) -> None:
        self.notes.append(text)


@dataclass(frozen=True)
class Measured:
    """What the comparison found, before the verdict."""

    ratio: float
    checked: int
    mode: Mode
    worst: list[Component]
    per_tensor: dict[str, TensorResult]
    below: tuple[float, float] | None = None
    """(gradient scale, resolution floor) when the whole gradient is below resolution."""
    rounding_step: float | None = None


def components(run: CheckRun, plan: Plan) -> tuple[Comparison, list[Component]]:
    """Component-wise differences along ``plan``, the worst diagnosed, kinks left out."""
    comparison = componentwise(
        run.objective, run.tensors, plan, run.loss0, run.base_step, run.step_given, run.warn
    )
    worst, positions = comparison.worst_components(run.tensors, run.top_k)
    if run.diagnose:
        label_worst(
            worst,
            positions,
            comparison,
            run.objective,
            run.tensors,
            run.loss0,
            run.nondeterministic,
            run.warn,
        )
    kinks = [c for c in worst if c.diagnosis == "kink"]
    if kinks:
        comparison.exclude(
            [i for c, i in zip(worst, positions, strict=True) if c.diagnosis == "kink"]
        )
        run.note(
            "left out of the ratios as kinks (one-sided slopes differ at two step sizes): "
            + ", ".join(c.name for c in kinks)
        )
    return comparison, worst
