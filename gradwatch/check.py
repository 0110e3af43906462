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
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gradwatch.engine.comparison import NEAR_ZERO_FLOOR, NOISE_UNITS, Comparison, status_for
from gradwatch.engine.diagnosis import label_worst
from gradwatch.engine.differences import ROUNDING_STEP_ULPS, componentwise
from gradwatch.engine.directions import BLOCK_CACHE_ENTRIES, per_tensor_directions, screen
from gradwatch.engine.objective import THETA, Evaluator, coarsest_dtype
from gradwatch.engine.sampling import (
    AUTO_FULL_MAX_SIZE,
    AUTO_LOCALIZE_EVALUATIONS,
    SCREEN_DIRECTIONS,
    SCREEN_TENSORS_FOR_TWO,
    Plan,
    checked_components,
    localization_plan,
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
from gradwatch.result import CheckResult, Component, Mode, Status, TensorResult

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
            `gradwatch.params.GradientSource` that computes it again when the check
            asks (the torch integration: no float64 copy of the gradient is held).
        eps: step size. None picks cbrt(machine eps) * max(1, |theta_i|) per component
            and divides by the step actually realized in the dtype; a float is used as
            given, dividing by 2 * eps (``eps=1e-7`` reproduces the lecture).
        sample: None checks every component; an int k checks k components (more than
            theta has: all, noted); a float in (0, 1] that fraction (drawn with ``seed``,
            at least one per tensor). ``"directional"``: one random unit direction per
            tensor (2 evaluations each). ``"auto"``: full up to ``AUTO_FULL_MAX_SIZE``
            components; above, a screen along `screen_directions` joint directions, then,
            when it reaches ``warn``, each tensor's direction and bisection inside failing
            tensors within ``localize_evaluations`` (`most_evaluations` bounds the cost).
        seed: seed of the sampling and of the random directions.
        top_k: how many worst components to report.
        regularization: terms added to J on the numeric side, e.g. ``gradwatch.L2``.
        warn: ratios at or above it are ``"warn"``.
        threshold: ratios at or above it are ``"fail"``. Both are float64 tiers: for
            float32 / float16 parameters they are multiplied by ``TOLERANCE_SCALE``
            (100 / 1000) and the result records the values used.
        diagnose: re-evaluate the worst components with half the step to label them.
        localize_evaluations: the most loss evaluations ``"auto"`` spends localizing
            inside failing tensors (the callback's ``budget`` lowers it to what the
            allowance leaves); tensors it cannot afford are named in a note.
        per_tensor: when the ``"auto"`` screen fires, measure each tensor along its own
            direction (2 evaluations per tensor) and localize inside failing tensors.
            False confirms the screen along fresh joint directions instead and ends the
            check there, without per-tensor ratios (``tensors`` empty): for callers that
            localize by module (the torch integration's module search), a failing check
            then costs a few evaluations, not two per tensor. A screen the second one
            does not confirm is checked per tensor either way.

    Returns:
        The ``CheckResult``; ``status`` is the worse of the global verdict and the
        per-tensor verdicts, or ``"nondeterministic"`` when J(theta) evaluated twice
        differs beyond roundoff.

    Raises:
        ParameterError: bad ``params`` / ``grads``.
        OptionError: an option out of range.
        LossError: ``loss`` returned a non-scalar or non-finite value.

    Example:
        >>> import numpy as np, gradwatch
        >>> w = np.array([1.0, -2.0])
        >>> result = gradwatch.check(lambda: float(np.sum(w**2)), {"w": w}, {"w": 2 * w})
        >>> result.status, result.checked
        ('ok', 2)
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
    )
    if not isinstance(per_tensor, bool | np.bool_):
        raise OptionError(f"per_tensor: expected True or False, received {per_tensor!r}")
    tensors = named_tensors(params, grads)
    sample, capped = _within_theta(sample, tensors.size)
    validate_sample(sample, tensors.size)
    validate_step(eps, tensors, bool(diagnose))
    # Everything is validated before J is first evaluated: no bad input costs a check.
    objective = Evaluator(loss, tensors, validate_terms(regularization, tensors))
    run = _Check.start(objective, tensors, eps, warn, threshold, seed, top_k, diagnose)
    run.notes.extend(capped)
    # Plans that move whole tensors open a region per move: install the handler once.
    with watching() if isinstance(sample, str) else nullcontext():
        measured = _compare(run, sample, localize_evaluations, bool(per_tensor))
    return _result(run, measured, time.perf_counter() - started)


def _within_theta(sample: Sample, size: int) -> tuple[Sample, list[str]]:
    """An int ``sample`` larger than theta becomes every component, with a note.

    ``GradWatch(sample=10**9)`` on a small model should check it all, not raise at every
    due step of a training run.
    """
    if isinstance(sample, int) and not isinstance(sample, bool) and sample > size:
        return None, [
            f"sample={sample} is more than the {size} components of theta: every component checked"
        ]
    return sample, []


@dataclass
class _Check:
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

    @classmethod
    def start(
        cls,
        objective: Evaluator,
        tensors: NamedTensors,
        eps: float | None,
        warn: float,
        threshold: float,
        seed: int,
        top_k: int,
        diagnose: bool,
    ) -> _Check:
        """The step, the tolerances of the dtype, and two probes of J(theta)."""
        dtype = coarsest_dtype(tensors)
        base_step = eps if eps is not None else default_step(dtype)
        warn, threshold, notes = _tolerances(dtype, warn, threshold)
        loss0, nondeterministic = _probe(objective, notes)
        return cls(
            objective,
            tensors,
            dtype,
            eps,
            base_step,
            warn,
            threshold,
            seed,
            top_k,
            diagnose,
            loss0,
            nondeterministic,
            notes,
        )

    @property
    def step_given(self) -> bool:
        return self.eps is not None

    def note(self, text: str) -> None:
        self.notes.append(text)


def _result(run: _Check, measured: _Measured, seconds: float) -> CheckResult:
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


@dataclass(frozen=True)
class _Measured:
    """What the comparison found, before the verdict."""

    ratio: float
    checked: int
    mode: Mode
    worst: list[Component]
    per_tensor: dict[str, TensorResult]
    below: tuple[float, float] | None = None
    """(gradient scale, resolution floor) when the whole gradient is below resolution."""
    rounding_step: float | None = None


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


def _compare(run: _Check, sample: Sample, localize_evaluations: int, per_tensor: bool) -> _Measured:
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
        screened = _screen(run, per_tensor)
        if screened is not None:
            return screened
    if isinstance(sample, str):
        return _per_tensor(run, sample == "auto", localize_evaluations)
    comparison, worst = _components(run, sample_plan(run.tensors, sample, run.seed))
    return _Measured(
        ratio=comparison.ratio(),
        checked=comparison.checked,
        mode=comparison.mode,
        worst=worst,
        per_tensor=comparison.per_tensor(run.tensors, run.warn, run.threshold),
        below=comparison.below_resolution(),
        rounding_step=comparison.rounding_step,
    )


def _screen(run: _Check, per_tensor: bool) -> _Measured | None:
    """The joint random-direction screen of ``"auto"``; None when it fires and each tensor
    is to be checked (look closer)."""
    directions = screen_directions(len(run.tensors.names))
    ratio, below = _screen_along(run, directions, FIRST_SCREEN)
    run.note(
        f"screened along {directions} random directions over all tensors, each "
        f"tensor weighted to count equally: ratio {ratio:.3g}"
    )
    # A clean screen is the whole check, and so is a screen of a nondeterministic J:
    # checking each tensor on noise would only spend evaluations. A split theta's screen
    # is the whole check either way (its caller localizes otherwise).
    fired = ratio >= run.warn and not run.nondeterministic
    if fired and run.objective.split is None:
        return None if per_tensor else _confirmed(run, ratio, directions)
    screened: Status = "nondeterministic" if run.nondeterministic else "ok"
    if fired:
        screened = status_for(ratio, run.warn, run.threshold)
    together = {
        name: TensorResult(
            ratio=None,  # screened together: no ratio of its own was measured
            checked=0,
            size=run.tensors.params[name].size,
            max_abs_error=0.0,
            status=screened,
        )
        for name in run.tensors.names
    }
    return _Measured(ratio, directions, "directional", [], together, below)


FIRST_SCREEN, CONFIRMING_SCREEN = 2, 5
"""Random streams of the screen's directions and of the second screen's that confirms it."""


def _screen_along(
    run: _Check, directions: int, stream: int
) -> tuple[float, tuple[float, float] | None]:
    loss_over_warn = abs(run.loss0) / run.warn
    return screen(
        run.objective, run.tensors, run.base_step, run.seed, loss_over_warn, directions, stream
    )


def _confirmed(run: _Check, first: float, directions: int) -> _Measured | None:
    """A fired screen confirmed along fresh directions, as the verdict; None if unconfirmed.

    The smaller of the two ratios is the check's: both screens saw at least that much
    error. No tensor has a ratio of its own (``tensors`` is empty): the caller localizes.
    """
    ratio, below = _screen_along(run, directions, CONFIRMING_SCREEN)
    if ratio < run.warn:
        run.note(
            f"a second screen along {directions} fresh directions did not confirm it "
            f"(ratio {ratio:.3g}): each tensor checked along its own direction"
        )
        return None
    run.note(
        f"a second screen along {directions} fresh directions confirmed it (ratio "
        f"{ratio:.3g}); per-tensor ratios not measured: the failure is localized by module"
    )
    return _Measured(min(ratio, first), 2 * directions, "directional", [], {}, below)


def _per_tensor(run: _Check, auto: bool, localize_evaluations: int) -> _Measured:
    """One random direction per tensor; under ``"auto"``, then localize in failing tensors."""
    loss_over_warn = abs(run.loss0) / run.warn
    comparison = per_tensor_directions(
        run.objective, run.tensors, run.base_step, run.seed, loss_over_warn
    )
    per_tensor = comparison.per_tensor(run.tensors, run.warn, run.threshold)
    run.note("directional: one random unit direction per tensor, 2 evaluations each")
    redrawn = 0
    if auto and all(v.status == "ok" for v in per_tensor.values()):
        # The screen saw an error no tensor's direction confirms: each direction may
        # be nearly orthogonal to its tensor's error (probability ~ its ratio over
        # warn). A second draw squares that chance; if it confirms, it is the verdict.
        again = per_tensor_directions(
            run.objective, run.tensors, run.base_step, run.seed, loss_over_warn, 4
        )
        per_tensor_again = again.per_tensor(run.tensors, run.warn, run.threshold)
        confirmed = any(v.status != "ok" for v in per_tensor_again.values())
        run.note(
            "no tensor's direction confirmed the screen; a second direction per tensor "
            + ("did" if confirmed else "did not either")
        )
        redrawn = comparison.checked
        if confirmed:
            comparison, per_tensor = again, per_tensor_again
    checked = comparison.checked + redrawn
    worst, _ = comparison.worst_components(run.tensors, run.top_k)
    failing = [name for name, verdict in per_tensor.items() if verdict.status == "fail"]
    if auto and failing:
        # Most suspicious first: the worst per-tensor ratio is localized first.
        failing.sort(key=lambda name: -(per_tensor[name].ratio or 0.0))  # all measured here
        localized, worst = _localize(run, failing, localize_evaluations)
        checked += localized
    return _Measured(
        ratio=comparison.ratio(),
        checked=checked,
        mode=comparison.mode,
        worst=worst,
        per_tensor=per_tensor,
        below=comparison.below_resolution(),
    )


def _localize(run: _Check, failing: list[str], budget: int) -> tuple[int, list[Component]]:
    """Bisect inside the failing tensors, then check the entries found component-wise."""
    plan, skipped = localization_plan(
        run.objective, run.tensors, failing, run.base_step, run.seed, budget
    )
    localized, worst = _components(run, plan)
    done = [name for name in failing if name not in skipped]
    run.note(
        "localized by bisection along a random direction, then the bisected entry "
        "and the largest analytic entry checked component-wise, in " + ", ".join(done)
    )
    if skipped:
        run.note(
            f"not localized (the localization budget of {budget} evaluations was spent; "
            "their per-tensor verdicts stand): " + ", ".join(skipped)
        )
    return localized.checked, worst


def _components(run: _Check, plan: Plan) -> tuple[Comparison, list[Component]]:
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


# `gradwatch.check` is the function above (docs/design.md#public-api), which hides this
# module from attribute access on the package; the function carries the module's public
# constants and cost functions, so `gradwatch.check.TOLERANCE_SCALE` works as cited.
check.__dict__.update({name: globals()[name] for name in __all__ if name != "check"})
