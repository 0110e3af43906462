"""The budget: how much of training time checks may take, and what a due check runs.

`GradWatch` keeps the schedule (which steps are due); a `Budget` keeps the account
beside it: the allowance at a due step is ``share`` times the training time so far
minus what checks have cost, and the check that runs is the configured one when its
estimated cost fits, else the largest cheaper one that fits (a budget-sized sample,
then ``"directional"``, then the ``"auto"`` screen; in a module-local run, fewer
blocks), else none. Costs are estimated from the checks so far with the evaluation
counts of `gradwatch.engine.sampling` (the same module that plans them), or for
module-local checks from the blocks each covered.

No starvation: after `STARVATION_SKIPS` skipped due checks in a row, the next one runs
the cheapest check whatever the allowance (a bug that appears after the first check is
then seen within a few due checks); and the first check, which has no estimate and no
training time to take a share of, is the cheapest that covers every tensor, localizing
nothing in the core (`FIRST_LOCALIZE_EVALUATIONS`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from gradwatch.engine.sampling import AUTO_FULL_MAX_SIZE, checked_components, planned_evaluations
from gradwatch.options import Sample
from gradwatch.report import SkippedCheck

__all__ = [
    "COST_HISTORY",
    "FIRST_LOCALIZE_EVALUATIONS",
    "MIN_SAMPLED_SHARE",
    "STARVATION_SKIPS",
    "Budget",
    "BudgetPlan",
    "describe_sample",
]

MIN_SAMPLED_SHARE = 0.25
"""A budget-sized component sample is used only when it covers at least this share of
theta; below it the directional check (every entry of every tensor, projected) is the
better detector for the same time."""


COST_HISTORY = 8
"""How many recent checks the cost model (fixed seconds + seconds per loss evaluation) fits."""

STARVATION_SKIPS = 2
"""Due checks skipped in a row at most: the next one runs the cheapest check even over
the allowance (the account then repays it), so the budget never leaves a run unchecked."""

FIRST_LOCALIZE_EVALUATIONS = 0
"""Loss evaluations a budgeted first check may spend localizing inside failing tensors:
none (a failing first check of a 124M GPT-2 spent 312-434 evaluations there, a debt
that skipped every check for thousands of steps); the module-local search of the torch
integration still names the module."""


class Budget:
    """The account of check time against training time, and the plan for each due step.

    Args:
        share: the largest share of training time (in (0, 1]) checks may take; None: no limit.
        sample: the configured ``sample``.
        top_k: the configured ``top_k`` (diagnosis costs 2 evaluations per worst component).
    """

    def __init__(self, share: float | None, sample: Sample, top_k: int) -> None:
        self.share = share
        self.sample = sample
        self.top_k = top_k
        self.started: float | None = None
        """The clock at the first `start` (the first `GradWatch.due` call)."""
        self.check_seconds = 0.0
        """What checks (and recording them) have cost the training loop so far."""
        self.plans: list[BudgetPlan] = []
        self._costs: list[tuple[int, float]] = []
        """(loss evaluations, seconds) of the recent checks, for the cost model."""
        self._shape: tuple[int, int] | None = None
        """(components, tensors) of theta, learned from the first check."""
        self._skips = 0
        """Due checks skipped in a row (see `STARVATION_SKIPS`)."""
        self._blocks: tuple[int, int] | None = None
        """(blocks per check as configured, blocks in the model) of a module-local run,
        learned from its checks' coverage; None for other checks."""
        self._block_costs: list[tuple[int, float]] = []
        """(blocks covered, seconds) of the recent module-local checks."""

    def start(self, now: float) -> None:
        """Training time counts from the first call."""
        if self.started is None:
            self.started = now

    def charge(self, seconds: float) -> None:
        """Add time spent on checks (a check, recording it, writing a skip)."""
        self.check_seconds += seconds

    def learn(self, evaluations: int, seconds: float) -> None:
        """A check's cost, for the cost model."""
        self._costs.append((evaluations, seconds))

    def learn_coverage(self, blocks: int, per_check: int, total: int, seconds: float) -> None:
        """A module-local check's cost: it covered ``blocks`` of ``total`` blocks (``per_check``
        as configured) in ``seconds``; later plans size such checks by blocks."""
        self._blocks = (max(per_check, 1), max(total, 1))
        if blocks > 0:
            self._block_costs.append((blocks, seconds))

    def learn_shape(self, size: int, tensors: int) -> None:
        """Theta's size and tensor count, from a check that ran."""
        if self._shape is None or self._shape[0] != size:
            self._shape = (size, max(tensors, 1))

    def plan(self, step: int, now: float) -> tuple[BudgetPlan, SkippedCheck | None]:
        """The check to run at a due step within the budget; a skipped plan comes with
        the `SkippedCheck` the report records."""
        if self.share is None:
            return BudgetPlan(step=step, sample=self.sample, action="run"), None
        assert self.started is not None
        training = max(now - self.started - self.check_seconds, 0.0)
        allowance = self.share * training - self.check_seconds
        if self._blocks is not None and self._block_costs:
            return self._plan_blocks(step, now, training, allowance)
        model = self.cost_model()
        if model is None or self._shape is None:
            return self._first(step, training, allowance), None
        fixed, per_evaluation = model
        size, tensors = self._shape

        def cost(sample: Sample) -> float:
            return fixed + per_evaluation * planned_evaluations(sample, size, tensors, self.top_k)

        candidates: list[Sample] = [self.sample]
        components = self.sample is None or not isinstance(self.sample, str)
        if components or (self.sample == "auto" and size <= AUTO_FULL_MAX_SIZE):
            k = _affordable_components(allowance - fixed, per_evaluation, self.top_k)
            if MIN_SAMPLED_SHARE * size <= k < checked_components(self.sample, size, tensors):
                candidates.append(k)
        if self.sample != "directional":
            candidates.append("directional")
        if self.sample != "auto" and size > AUTO_FULL_MAX_SIZE:
            candidates.append("auto")  # the joint screen: every tensor, a few evaluations
        # Cheapest last whatever the order above: the one a starved due step runs.
        cheapest = min(candidates, key=cost)
        candidates = [c for c in candidates if c != cheapest] + [cheapest]
        estimates = {describe_sample(c): cost(c) for c in candidates}
        for candidate in candidates:
            estimate = cost(candidate)
            if estimate <= allowance or (candidate == cheapest and self._starved()):
                spare = max(allowance - estimate, 0.0)
                return self._run(
                    step,
                    candidate,
                    allowance,
                    estimate,
                    training,
                    _estimates_text(estimates) + self._starved_text(estimate, allowance),
                    localize_evaluations=int(spare / per_evaluation)
                    if per_evaluation > 0
                    else None,
                ), None
        return self._skip(
            step, now, training, allowance, candidates[-1], cost(candidates[-1]), estimates
        )

    def _plan_blocks(
        self, step: int, now: float, training: float, allowance: float
    ) -> tuple[BudgetPlan, SkippedCheck | None]:
        """A module-local run: as many blocks as the allowance affords (at most the
        configured number), at least one; a skip when even one block does not fit."""
        assert self._blocks is not None
        per_check, _ = self._blocks
        fixed, per_block = _fit(self._block_costs[-COST_HISTORY:])
        affordable = int((allowance - fixed) / per_block) if per_block > 0 else per_check
        blocks = min(per_check, affordable)
        estimates = {f"{b} block(s)": fixed + per_block * b for b in sorted({per_check, 1})}
        if blocks < 1 and not self._starved():
            return self._skip(
                step, now, training, allowance, "auto", fixed + per_block, estimates, blocks=True
            )
        blocks = max(blocks, 1)
        estimate = fixed + per_block * blocks
        reason = _estimates_text(estimates) + self._starved_text(estimate, allowance)
        plan = self._run(step, self.sample, allowance, estimate, training, reason, blocks=blocks)
        if blocks < per_check:
            plan = self.plans[-1] = dataclasses.replace(plan, action="reduced")
        return plan, None

    def _starved(self) -> bool:
        return self._skips >= STARVATION_SKIPS

    def _starved_text(self, estimate: float, allowance: float) -> str:
        if estimate <= allowance:
            return ""
        return (
            f"; over the allowance, run anyway: {self._skips} due check(s) in a row were "
            "skipped, and a run is never left unchecked longer than that"
        )

    def _run(
        self,
        step: int,
        sample: Sample,
        allowance: float,
        estimate: float,
        training: float,
        reason: str,
        *,
        localize_evaluations: int | None = None,
        blocks: int | None = None,
    ) -> BudgetPlan:
        self._skips = 0
        plan = BudgetPlan(
            step=step,
            sample=sample,
            action="run" if sample == self.sample else "reduced",
            allowance=allowance,
            estimate=estimate,
            training_seconds=training,
            reason=reason,
            localize_evaluations=localize_evaluations,
            blocks=blocks,
        )
        self.plans.append(plan)
        return plan

    def _skip(
        self,
        step: int,
        now: float,
        training: float,
        allowance: float,
        cheapest: Sample,
        estimate: float,
        estimates: dict[str, float],
        *,
        blocks: bool = False,
    ) -> tuple[BudgetPlan, SkippedCheck]:
        """The plan that skips a due step, and the report's record of it."""
        assert self.started is not None and self.share is not None
        self._skips += 1
        what = "one block of a module-local check" if blocks else describe_sample(cheapest)
        elapsed = now - self.started
        share = self.check_seconds / elapsed if elapsed > 0 else math.inf
        plan = BudgetPlan(
            step=step,
            sample=None,
            action="skipped",
            allowance=allowance,
            estimate=estimate,
            training_seconds=training,
            reason=_estimates_text(estimates),
        )
        self.plans.append(plan)
        skip = SkippedCheck(
            step=step,
            reason=(
                f"even the cheapest check ({what}, estimated "
                f"{estimate:.3g} s) exceeds the allowance {allowance:.3g} s "
                f"(budget {self.share:.1%} of {training:.3g} s of training, minus "
                f"{self.check_seconds:.3g} s of checks so far)"
            ),
            share=share,
            budget=self.share,
        )
        return plan, skip

    def _first(self, step: int, training: float, allowance: float) -> BudgetPlan:
        """No estimate yet: the cheapest check that covers every tensor. "auto" is that
        already (a full check only of models small enough to be cheap)."""
        cheapest: Sample = "auto" if self.sample == "auto" else "directional"
        plan = BudgetPlan(
            step=step,
            sample=cheapest,
            action="run" if self.sample == cheapest else "reduced",
            allowance=allowance,
            training_seconds=training,
            reason="first check: no cost estimate yet, the cheapest check that covers every "
            "tensor, localizing nothing in the core",
            localize_evaluations=FIRST_LOCALIZE_EVALUATIONS,
            blocks=1,
        )
        self.plans.append(plan)
        return plan

    def cost_model(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per loss evaluation) fitted to the recent checks.

        With checks of one size only, the fixed part is 0 and every second is charged
        to the evaluations (the median of the last three checks, so one cold first
        check does not hold back the rest), which over-estimates smaller checks (so
        stays within budget) and is exact for checks of the same size.
        """
        costs = [(e, s) for e, s in self._costs[-COST_HISTORY:] if e > 0]
        return _fit(costs) if costs else None


@dataclass(frozen=True)
class BudgetPlan:
    """What the `budget` decided for one due step.

    Attributes:
        step: the due step.
        sample: the ``sample`` the check runs with (None with ``action="skipped"`` too).
        action: ``"run"`` (the configured sample), ``"reduced"`` (a cheaper one) or
            ``"skipped"``.
        allowance: seconds the check could take (budget x training time, minus checks).
        estimate: the estimated seconds of the chosen (or cheapest, when skipped) check.
        training_seconds: training time so far (wall time minus checks).
        reason: the estimates the decision compared.
    """

    step: int
    sample: Sample
    action: Literal["run", "reduced", "skipped"]
    allowance: float | None = None
    estimate: float | None = None
    training_seconds: float | None = None
    reason: str = ""
    localize_evaluations: int | None = None
    """Evaluations the allowance leaves for localizing inside failing tensors (a failing
    check spends more than the estimate, which is of a correct model's check)."""
    blocks: int | None = None
    """How many blocks a module-local check may cover (None: as configured)."""

    def note(self, configured: Sample) -> str:
        """The sentence a reduced check carries in its notes."""
        estimate = "" if self.estimate is None else f", estimated {self.estimate:.3g} s"
        allowance = "" if self.allowance is None else f" (allowance {self.allowance:.3g} s)"
        if self.blocks is not None and self.sample == configured:
            return (
                f"budget: a module-local check of {self.blocks} block(s) instead of all it "
                f"was configured to cover{estimate}{allowance}: {self.reason}"
            )
        return (
            f"budget: ran sample={describe_sample(self.sample)} instead of "
            f"{describe_sample(configured)}{estimate}{allowance}: {self.reason}"
        )


def describe_sample(sample: Sample) -> str:
    """``None (full)`` or the sample's repr, for notes and reasons."""
    return "None (full)" if sample is None else repr(sample)


def _estimates_text(estimates: dict[str, float]) -> str:
    return "estimated " + ", ".join(f"{name} {sec:.3g} s" for name, sec in estimates.items())


def _fit(costs: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed seconds, seconds per unit) of (units, seconds) pairs: a line through checks
    of two sizes or more, else every second charged to the units (the median of the last
    three, so one cold first check does not hold back the rest)."""
    units = np.array([u for u, _ in costs], dtype=np.float64)
    seconds = np.array([s for _, s in costs], dtype=np.float64)
    if len(set(units.tolist())) >= 2:
        slope, intercept = np.polyfit(units, seconds, 1)
        if slope > 0 and intercept >= 0:
            return float(intercept), float(slope)
    return 0.0, float(np.median(seconds[-3:] / units[-3:]))


def _affordable_components(seconds: float, per_evaluation: float, top_k: int) -> int:
    """The largest k whose sampled check fits in `seconds` (0 when none does)."""
    if per_evaluation <= 0 or seconds <= 0:
        return 0
    evaluations = seconds / per_evaluation - 2 - 2 * top_k
    return max(int(evaluations // 2), 0)
