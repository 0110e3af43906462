"""The two-sided gradient check of the lecture.

For each checked component i of theta::

    numeric_i = (J(theta + h e_i) - J(theta - h e_i)) / 2h
    ratio     = ||numeric - analytic|| / (||numeric|| + ||analytic||)

`check` is a pipeline: validate the options and arrays -> probe J(theta) twice ->
plan what to evaluate (`gradwatch.engine.sampling`) -> compare numeric with analytic
(component-wise differences in `gradwatch.engine.differences`, random directions in
`gradwatch.engine.directions`) -> diagnose the worst components (`gradwatch.engine.diagnosis`)
-> verdict (`gradwatch.engine.verdict`). The caller's arrays are perturbed in place and
restored bit for bit, also when ``loss`` raises. A full check costs 2n evaluations
of J plus a handful: two to probe for nondeterminism, two per diagnosed worst
component.

`gradwatch.check` is the function (the package exports it under this module's name);
it also carries this module's public constants and cost functions as attributes, so
``gradwatch.check.TOLERANCE_SCALE`` and ``from gradwatch.check import TOLERANCE_SCALE``
name the same table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext

import numpy as np
import numpy.typing as npt

from gradwatch.engine.auto import screened, tensor_by_tensor
from gradwatch.engine.comparison import NEAR_ZERO_FLOOR, NOISE_UNITS
from gradwatch.engine.differences import ROUNDING_STEP_ULPS
from gradwatch.engine.directions import BLOCK_CACHE_ENTRIES
from gradwatch.engine.objective import THETA, Evaluator, coarsest_dtype
from gradwatch.engine.run import CheckRun, Measured, components
from gradwatch.engine.sampling import (
    AUTO_FULL_MAX_SIZE,
    AUTO_LOCALIZE_EVALUATIONS,
    SCREEN_DIRECTIONS,
    SCREEN_TENSORS_FOR_TWO,
    checked_components,
    most_evaluations,
    planned_evaluations,
    sample_plan,
    screen_directions,
)
from gradwatch.engine.uninterrupted import watching
from gradwatch.engine.verdict import decide, resolution_notes
from gradwatch.errors import OptionError
from gradwatch.options import (
    Sample,
    plain_int,
    validate_check_options,
    validate_sample,
    validate_step,
    validate_terms,
)
from gradwatch.params import GradientSource, NamedTensors, named_tensors
from gradwatch.regularization import RegularizationTerm
from gradwatch.result import CheckResult

__all__ = [
    "AUTO_FULL_MAX_SIZE",
    "AUTO_LOCALIZE_EVALUATIONS",
    "BLOCK_CACHE_ENTRIES",
    "NEAR_ZERO_FLOOR",
    "NOISE_UNITS",
    "ROUNDING_STEP_ULPS",
    "SCREEN_DIRECTIONS",
    "SCREEN_TENSORS_FOR_TWO",
    "TOLERANCE_SCALE",
    "Sample",
    "check",
    "checked_components",
    "default_step",
    "most_evaluations",
    "planned_evaluations",
    "screen_directions",
]

TOLERANCE_SCALE: dict[np.dtype[np.floating], float] = {
    np.dtype(np.float32): 100.0,
    np.dtype(np.float16): 1000.0,
}
"""Factor on ``warn`` and ``threshold`` for parameters of lower precision than float64.

Two-sided differences in float32 give ratios near 1e-4..1e-3 on correct code (roundoff
of J over a step of about 5e-3, and kinks that step crosses), so the float64 tiers would
cry wolf; the thresholds follow the dtype instead, and the notes say so."""


def default_step(dtype: np.dtype[np.floating]) -> float:
    """The base step cbrt(machine eps): it balances truncation (h^2) against roundoff (eps/h).

    >>> round(default_step(np.dtype(np.float64)), 9)
    6.055e-06
    """
    return float(np.cbrt(np.finfo(dtype).eps))


def check(
    loss: Callable[[], object],
    params: Mapping[str, npt.NDArray[np.floating]] | npt.NDArray[np.floating],
    grads: Mapping[str, npt.NDArray[np.floating]] | npt.NDArray[np.floating] | GradientSource,
    *,
    eps: float | None = None,
    sample: Sample = None,
    seed: int = 0,
    top_k: int = 10,
    regularization: Iterable[RegularizationTerm] = (),
    warn: float = 1e-5,
    threshold: float = 1e-3,
    diagnose: bool = True,
    localize_evaluations: int = AUTO_LOCALIZE_EVALUATIONS,
    per_tensor: bool = True,
) -> CheckResult:
    """Compare ``grads`` with two-sided finite differences of ``loss`` (+ regularization).

    Args:
        loss: zero-argument callable returning J at the current values of ``params``.
        params: named writable float arrays (or one array, named ``theta``); mapping
            order is the flattening order of theta.
        grads: the analytic gradient of J, same keys and shapes; or a
            `gradwatch.params.GradientSource` that computes it when the check asks.
        eps: None picks cbrt(machine eps) * max(1, |theta_i|), divided by the step the
            dtype realizes; a float is used as given (``eps=1e-7``: the lecture's).
        sample: None checks every component; an int k, k components (all if theta has
            fewer, noted); a float in (0, 1] that fraction (at least one per tensor).
            ``"directional"``: one random direction per tensor (2 evaluations each).
            ``"auto"``: full up to ``AUTO_FULL_MAX_SIZE`` components, above a screen
            along joint directions that looks closer only when it fires (`per_tensor`).
        seed: seed of the sampling and of the random directions.
        top_k: how many worst components to report.
        regularization: terms added to J on the numeric side, e.g. ``gradwatch.L2``.
        warn: ratios at or above it are ``"warn"`` (a float64 tier, as ``threshold``).
        threshold: ratios at or above it fail; scaled by ``TOLERANCE_SCALE`` in float32.
        diagnose: re-evaluate the worst components with half the step to label them.
        localize_evaluations: the most evaluations ``"auto"`` spends bisecting inside
            failing tensors (`most_evaluations` bounds a check); the rest are noted.
        per_tensor: when the ``"auto"`` screen fires, each tensor along its own direction
            (2 evaluations each), then bisection. False: a second screen along fresh
            directions confirms it and ends the check, no per-tensor ratios (for callers
            that localize by module); unconfirmed, each tensor is checked either way.

    Returns:
        The ``CheckResult`` (``"nondeterministic"`` when J(theta) twice differs).

    Raises:
        ParameterError: bad ``params`` / ``grads``.
        OptionError: an option out of range; LossError: a non-scalar or non-finite J.

    Example:
        >>> import numpy as np, gradwatch
        >>> w = np.array([1.0, -2.0])
        >>> gradwatch.check(lambda: float(np.sum(w**2)), {"w": w}, {"w": 2 * w}).status
        'ok'
    """
    started = time.perf_counter()
    sample, seed, top_k = plain_int(sample), plain_int(seed), plain_int(top_k)
    validate_check_options(
        eps=eps,
        top_k=top_k,
        warn=warn,
        threshold=threshold,
        localize_evaluations=localize_evaluations,
        seed=seed,
        diagnose=diagnose,
        per_tensor=per_tensor,
    )
    tensors = named_tensors(params, grads)
    sample, capped = _within_theta(sample, tensors.size)
    validate_step(eps, tensors, bool(diagnose))
    # Everything is validated before J is first evaluated: no bad input costs a check.
    objective = Evaluator(loss, tensors, validate_terms(regularization, tensors))
    run = _start(objective, tensors, eps, warn, threshold, seed, top_k, diagnose)
    run.notes.extend(capped)
    with watching() if isinstance(sample, str) else nullcontext():  # one handler, many moves
        measured = _compare(run, sample, localize_evaluations, bool(per_tensor))
    return _result(run, measured, time.perf_counter() - started)


def _within_theta(sample: Sample, size: int) -> tuple[Sample, list[str]]:
    """``sample`` validated; an int larger than theta becomes every component, with a note.

    ``GradWatch(sample=10**9)`` on a small model should check it all, not raise at every
    due step of a training run.
    """
    if isinstance(sample, int) and not isinstance(sample, bool) and sample > size:
        return None, [
            f"sample={sample} is more than the {size} components of theta: every component checked"
        ]
    validate_sample(sample, size)
    return sample, []


def _start(
    objective: Evaluator,
    tensors: NamedTensors,
    eps: float | None,
    warn: float,
    threshold: float,
    seed: int,
    top_k: int,
    diagnose: bool,
) -> CheckRun:
    """The step, the tolerances of the dtype, and two probes of J(theta)."""
    dtype = coarsest_dtype(tensors)
    warn, threshold, notes = _tolerances(dtype, warn, threshold)
    loss0, nondeterministic = _probe(objective, notes)
    return CheckRun(
        objective=objective,
        tensors=tensors,
        dtype=dtype,
        eps=eps,
        base_step=eps if eps is not None else default_step(dtype),
        warn=warn,
        threshold=threshold,
        seed=seed,
        top_k=top_k,
        diagnose=diagnose,
        loss0=loss0,
        nondeterministic=nondeterministic,
        notes=notes,
    )


def _result(run: CheckRun, measured: Measured, seconds: float) -> CheckResult:
    """The verdict on what was measured, as the immutable result (notes gathered here)."""
    below, per_tensor, params = measured.below, measured.per_tensor, run.tensors.params
    notes = run.notes + resolution_notes(
        measured.rounding_step, below, per_tensor, run.warn, run.dtype
    )
    verdict = decide(
        measured.ratio,
        per_tensor,
        run.warn,
        run.threshold,
        nondeterministic=run.nondeterministic,
        below=below,
    )
    terms = run.objective.terms
    return CheckResult(
        ratio=measured.ratio,
        tensors=per_tensor,
        worst=measured.worst,
        eps=run.base_step,
        eps_policy="given" if run.step_given else "cbrt(machine eps) * max(1, |theta_i|)",
        checked=measured.checked,
        size=run.tensors.size,
        loss=run.loss0 + sum(term.value(params) for term in terms),
        loss_evals=run.objective.evaluations,
        seconds=seconds,
        regularization={term.name: term.value(params) for term in terms},
        mode=measured.mode,
        dtype=str(run.dtype),
        warn=run.warn,
        threshold=run.threshold,
        seed=run.seed,
        notes=notes,
        **verdict.fields(),
        below_resolution=below is not None,
        resolution=None if below is None else below[1],
        rounding_step=measured.rounding_step,
    )


def _tolerances(
    dtype: np.dtype[np.floating], warn: float, threshold: float
) -> tuple[float, float, list[str]]:
    """``warn`` and ``threshold`` for parameters of ``dtype`` (`TOLERANCE_SCALE`), and a note."""
    scale = TOLERANCE_SCALE.get(dtype, 1.0)
    if scale == 1.0:
        return warn, threshold, []
    warn, threshold = warn * scale, threshold * scale
    return (
        warn,
        threshold,
        [
            f"{dtype} parameters: warn and threshold scaled x{scale:g} to {warn:g} and "
            f"{threshold:g} (differences in {dtype} are noisier than in float64)"
        ],
    )


def _probe(objective: Evaluator, notes: list[str]) -> tuple[float, bool]:
    """J(theta), and whether evaluating it again gives another value (beyond roundoff)."""
    loss0 = objective.loss(THETA)
    loss0_again = objective.loss("J(theta), evaluated again")
    nondeterministic = abs(loss0 - loss0_again) > 64 * objective.roundoff * max(abs(loss0), 1e-300)
    if nondeterministic:
        notes.append(
            f"J(theta) evaluated twice gave {loss0!r} and {loss0_again!r}: the loss is "
            "nondeterministic (dropout or other randomness not replayed?); no alert"
        )
    return loss0, nondeterministic


def _compare(
    run: CheckRun, sample: Sample, localize_evaluations: int, per_tensor: bool
) -> Measured:
    """Numeric against analytic along the plan ``sample`` asks for."""
    split = run.objective.split is not None  # only the joint screen runs split
    if split and sample != "auto":
        raise OptionError(
            f"sample: a theta split across processes (SplitObjective) is checked by the "
            f"'auto' screen only, received {sample!r}"
        )
    if sample == "auto" and run.tensors.size <= AUTO_FULL_MAX_SIZE and not split:
        sample = None
    if sample == "auto":
        found = screened(run, per_tensor)
        if found is not None:
            return found
    if isinstance(sample, str):
        return tensor_by_tensor(run, sample == "auto", localize_evaluations)
    comparison, worst = components(run, sample_plan(run.tensors, sample, run.seed))
    return Measured(
        ratio=comparison.ratio(),
        checked=comparison.checked,
        mode=comparison.mode,
        worst=worst,
        per_tensor=comparison.per_tensor(run.tensors, run.warn, run.threshold),
        below=comparison.below_resolution(),
        rounding_step=comparison.rounding_step,
    )


# `gradwatch.check` is the function above (docs/design.md#public-api), which hides this
# module from attribute access on the package; the function carries the module's public
# constants and cost functions, so `gradwatch.check.TOLERANCE_SCALE` works as cited.
check.__dict__.update({name: globals()[name] for name in __all__ if name != "check"})
