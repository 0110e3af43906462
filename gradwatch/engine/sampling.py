"""Which components and directions a check evaluates, and what that costs in evaluations of J.

The cost model the callback's budget plans with (`planned_evaluations`,
`most_evaluations`) lives beside the plans it prices, so the two cannot drift apart.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from gradwatch.engine.bisection import bisect, bisection_cost
from gradwatch.engine.directions import largest_magnitude, random_block
from gradwatch.engine.objective import Evaluator
from gradwatch.options import Sample
from gradwatch.params import NamedTensors

__all__ = [
    "AUTO_FULL_MAX_SIZE",
    "AUTO_LOCALIZE_EVALUATIONS",
    "SCREEN_DIRECTIONS",
    "SCREEN_TENSORS_FOR_TWO",
    "checked_components",
    "localization_plan",
    "most_evaluations",
    "planned_evaluations",
    "sample_plan",
    "screen_directions",
]

F64 = npt.NDArray[np.float64]
Plan = dict[str, npt.NDArray[np.intp]]

SCREEN_DIRECTIONS = 2
"""Joint random directions ``sample="auto"`` screens a model of up to
``SCREEN_TENSORS_FOR_TWO`` tensors with (2 evaluations each); only when they disagree by
``warn`` or more is each tensor checked on its own. More tensors get more directions:
see `screen_directions`."""

AUTO_FULL_MAX_SIZE = 2000
"""``sample="auto"`` checks every component up to this size, above it it detects per
tensor with random directions and localizes by sampling inside flagged tensors."""


AUTO_LOCALIZE_EVALUATIONS = 240
"""Loss evaluations ``sample="auto"`` spends localizing inside the tensors it fails (most
suspicious first), on top of the screen, the per-tensor directions (2 per tensor) and
the diagnosis (2 per worst component). Bisection costs 2 + 2 log2(size) per tensor
plus 4 for its two entries: 30 for a 4096-entry tensor, so about 8 tensors of that
size; the ones left over keep their per-tensor verdict and are named in the notes.
Before issue 12 each failing tensor got 256 sampled components (512 evaluations):
2,898 evaluations for a 30k-parameter GPT-2 with a wrong activation backward."""


SCREEN_TENSORS_FOR_TWO = 390
"""Why 390: with every tensor weighted to add about as much to g . v, an error of relative
size r in one of T tensors adds r |c| to one direction's error against a denominator of
about 2 sqrt(T), c having a density near 0.8 at 0 (random signs, magnitudes and gains:
no atom at 0). A direction misses it when |c| < 2 sqrt(T) warn / r, with probability
p = 1.6 sqrt(T) warn / r; k independent directions miss with p^k. At r = 1e-2 and
warn = 1e-5, p^2 <= 1e-3 up to T = 390."""


def screen_directions(tensors: int) -> int:
    """Joint directions of the ``sample="auto"`` screen of a model with ``tensors`` tensors.

    The fewest k >= 2 with p^k <= 1e-3, p = 1.6 sqrt(T) 1e-5 / 1e-2 (see
    ``SCREEN_TENSORS_FOR_TWO``), at most 8.

    >>> screen_directions(28), screen_directions(390), screen_directions(1000)
    (2, 2, 3)
    """
    if tensors <= SCREEN_TENSORS_FOR_TWO:
        return SCREEN_DIRECTIONS
    miss = min(1.6 * math.sqrt(tensors) * 1e-3, 0.5)
    return min(8, max(SCREEN_DIRECTIONS, math.ceil(math.log(1e-3) / math.log(miss))))


def checked_components(sample: Sample, size: int, tensors: int) -> int:
    """Components a full or sampled check covers (one per tensor when directional).

    >>> checked_components(10, size=1000, tensors=3), checked_components(0.5, 1000, 3)
    (10, 500)
    """
    if sample is None or (sample == "auto" and size <= AUTO_FULL_MAX_SIZE):
        return size
    if isinstance(sample, str):
        return tensors
    count = sample if isinstance(sample, int) else max(1, round(sample * size))
    return min(size, max(tensors, count))


def planned_evaluations(sample: Sample, size: int, tensors: int, top_k: int = 10) -> int:
    """Loss evaluations `check` spends on a model whose gradient is correct.

    Two probes of J(theta), two per checked component plus two per diagnosed worst
    component, or two per tensor (directional), or two per screening direction
    (auto above ``AUTO_FULL_MAX_SIZE``). A failing check spends more: auto then checks
    each tensor and samples inside the failing ones.

    >>> planned_evaluations(None, size=47, tensors=6, top_k=10)
    116
    >>> planned_evaluations("auto", size=18413, tensors=41)
    6
    """
    if sample == "auto" and size > AUTO_FULL_MAX_SIZE:
        return 2 + 2 * screen_directions(tensors)
    if sample == "directional":
        return 2 + 2 * tensors
    checked = checked_components(sample, size, tensors)
    return 2 + 2 * checked + 2 * min(top_k, checked)


def most_evaluations(size: int, tensors: int, top_k: int = 10) -> int:
    """The most loss evaluations a ``sample="auto"`` check spends, failing or not.

    Up to ``AUTO_FULL_MAX_SIZE`` components: the full check. Above: two probes, the
    screen (2 per direction), each tensor's direction (2 per tensor), then either a
    second direction per tensor (when the first confirms nothing) or localization
    (``AUTO_LOCALIZE_EVALUATIONS``) and the diagnosis of the worst components.

    >>> most_evaluations(29184, tensors=28)  # the tiny GPT-2 of benchmarks.failing_check
    322
    """
    if size <= AUTO_FULL_MAX_SIZE:
        return planned_evaluations(None, size, tensors, top_k)
    localize = max(2 * tensors, AUTO_LOCALIZE_EVALUATIONS + 2 * top_k)
    return 2 + 2 * screen_directions(tensors) + 2 * tensors + localize


def sample_plan(tensors: NamedTensors, sample: int | float | None, seed: int) -> Plan:
    """Which flat indices of each tensor to check, sorted."""
    sizes = {name: tensors.params[name].size for name in tensors.names}
    total = tensors.size
    if sample is None:
        return {name: np.arange(size) for name, size in sizes.items()}
    # Validated by gradwatch.options: a fraction in (0, 1] or an int in [1, total].
    count = max(1, round(sample * total)) if isinstance(sample, float) else sample
    if count >= total:
        return {name: np.arange(size) for name, size in sizes.items()}
    allocation = _stratified_allocation(sizes, count)
    rng = np.random.default_rng(seed)
    return {
        name: np.sort(rng.choice(sizes[name], size=allocation[name], replace=False))
        for name in tensors.names
    }


def _stratified_allocation(sizes: dict[str, int], count: int) -> dict[str, int]:
    """Components per tensor: one each, the rest proportional to size (largest remainder).

    When ``count`` is below the number of tensors every tensor still gets one (an empty
    tensor none: it has no component to check).
    """
    allocation = {name: min(1, size) for name, size in sizes.items()}
    spare = {name: max(size - 1, 0) for name, size in sizes.items()}
    remaining = count - sum(allocation.values())
    total_spare = sum(spare.values())
    if remaining <= 0 or total_spare == 0:
        return allocation
    shares = {name: remaining * room / total_spare for name, room in spare.items()}
    for name, share in shares.items():
        allocation[name] += math.floor(share)
    leftover = count - sum(allocation.values())
    by_remainder = sorted(sizes, key=lambda n: shares[n] - math.floor(shares[n]), reverse=True)
    for name in by_remainder[:leftover]:
        allocation[name] += 1
    return allocation


def localization_plan(
    objective: Evaluator,
    tensors: NamedTensors,
    failing: list[str],
    base_step: float,
    seed: int,
    budget: int = AUTO_LOCALIZE_EVALUATIONS,
) -> tuple[Plan, list[str]]:
    """The entries to check component-wise in each failing tensor, and the tensors skipped.

    In the order given (most suspicious first) and while ``budget`` evaluations allow:
    the entry `bisect` blames and the entry of largest |analytic gradient| (where a
    gradient off by a factor errs most), 2 evaluations each once checked.
    """
    cost = {name: _localization_cost(tensors.params[name].size) for name in failing}
    chosen: list[str] = []
    for name in failing:
        if sum(cost[c] for c in chosen) + cost[name] > budget:
            break
        chosen.append(name)
    gradients: dict[str, F64] = {}

    def keep(name: str, gradient: npt.NDArray[np.floating]) -> None:
        gradients[name] = gradient.reshape(-1).astype(np.float64)

    # One visit (one backward pass for a GradientSource), in theta order.
    tensors.visit_grads([n for n in tensors.names if n in chosen], keep)
    plan = {name: np.zeros(0, dtype=np.intp) for name in tensors.names}
    for name in chosen:
        view = tensors.flat_param(name)
        entries = {int(np.argmax(np.abs(gradients[name])))}
        if view.size > 1:
            position = tensors.names.index(name)
            direction = random_block(np.random.default_rng([seed, 3, position]), (view.size,))
            direction /= float(np.linalg.norm(direction))
            step = base_step * max(1.0, largest_magnitude(view))
            entries.add(bisect(view, gradients[name], direction, step, objective.value, name))
        plan[name] = np.array(sorted(entries), dtype=np.intp)
    skipped = [name for name in failing if name not in chosen]
    return plan, skipped


def _localization_cost(size: int) -> int:
    """Evaluations `localization_plan` spends on a tensor: bisection + 2 entries checked."""
    return (bisection_cost(size) if size > 1 else 0) + 2 * min(size, 2)
