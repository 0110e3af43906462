"""The two-sided gradient check of the lecture.

For each checked component i of theta::

    numeric_i = (J(theta + h e_i) - J(theta - h e_i)) / 2h
    ratio     = ||numeric - analytic|| / (||numeric|| + ||analytic||)

The caller's arrays are perturbed in place, one component at a time, and the
original value is written back (bit for bit, also when ``loss`` raises). A full
check costs 2n evaluations of J plus a handful: two to probe for
nondeterminism, two per diagnosed worst component.

What ``sample="auto"`` guarantees above ``AUTO_FULL_MAX_SIZE`` (issue 12). Each
tensor's block of a screening direction has random signs, magnitudes uniform in
[0.5, 1.5) and a random gain uniform in [0.5, 1.5), scaled so every tensor adds about
as much to g . v. The error of any one tensor then adds to each direction's error a
term with a bounded density (0-d tensors included): errors in several tensors, equal
or not, of any signs, never cancel structurally (before, the blocks of two scalars
were exactly +-1 and equal errors cancelled with probability 1/2 per direction). An
error of relative size r in one tensor t, ||e_t|| = r max(||g_t||, NEAR_ZERO_FLOOR
||g||), passes one direction unseen with probability about p = 1.6 sqrt(T) warn / r
(T tensors), and all k of them with p^k; `screen_directions` picks k so that p^k <=
1e-3 at r = 1e-2 and warn = 1e-5 (k = 2 up to 390 tensors: p^2 = 2.6e-6 T). A screen
that fires is confirmed tensor by tensor (a second direction per tensor when the first
confirms nothing). Measured by ``benchmarks.screen_miss_rate`` over random layouts of
2-40 tensors (0-d to 5,000 entries): no miss in 3,000 trials for each of an error
scaling one tensor, in one entry, spread at random, scaling two tensors with the same
sign, and issue 12's two scalars next to a 2,500-entry tensor (BENCHMARKS.md). Below
the floor, a tensor's error is judged against the whole gradient (DESIGN.md section 8).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from gradwatch._bisection import bisect, bisection_cost
from gradwatch.errors import LossError, NonFiniteLossError, OptionError
from gradwatch.params import GradientSource, NamedTensors, component_name, named_tensors
from gradwatch.regularization import RegularizationTerm
from gradwatch.result import CheckResult, Component, Diagnosis, Rule, Status, TensorResult

__all__ = [
    "AUTO_FULL_MAX_SIZE",
    "NEAR_ZERO_FLOOR",
    "check",
    "checked_components",
    "default_step",
    "most_evaluations",
    "planned_evaluations",
    "screen_directions",
]

F64 = npt.NDArray[np.float64]
Sample = int | float | Literal["auto", "directional"] | None
BatchedEvaluation = Callable[[str, npt.NDArray[np.intp], npt.NDArray[np.floating]], npt.ArrayLike]
"""``evaluate_batch(tensor, flat_indices, values)``: J at theta with only
``params[tensor].flat[flat_indices[k]]`` set to ``values[k]``, for every k. A loss
callable that has this method is evaluated in batches (e.g. torch vmap). A loss that
also has ``restore_tensor(tensor)``, writing the tensor's unperturbed values back
exactly (the torch shadow copies them from the model), spares the check a backup of
the tensors a random direction moves."""

THETA = "J(theta)"
"""Where the first evaluation of J happens: unperturbed theta, the training's own loss."""

NEAR_ZERO_FLOOR = 1e-3
"""Per-tensor denominators are floored at this fraction of the whole gradient's scale,
so a tensor whose true gradient is about 0 is not judged on noise over noise."""

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

TOLERANCE_SCALE: dict[np.dtype[np.floating], float] = {
    np.dtype(np.float32): 100.0,
    np.dtype(np.float16): 1000.0,
}
"""Factor on ``warn`` and ``threshold`` for parameters of lower precision than float64.

Two-sided differences in float32 give ratios near 1e-4..1e-3 on correct code (roundoff
of J over a step of about 5e-3, and kinks that step crosses), so the float64 tiers would
cry wolf; the thresholds follow the dtype instead, and the notes say so."""

SCREEN_DIRECTIONS = 2
"""Joint random directions ``sample="auto"`` screens a model of up to
``SCREEN_TENSORS_FOR_TWO`` tensors with (2 evaluations each); only when they disagree by
``warn`` or more is each tensor checked on its own. More tensors get more directions:
see `screen_directions`."""

SCREEN_TENSORS_FOR_TWO = 390
"""Why 390: with every tensor weighted to add about as much to g . v, an error of relative
size r in one of T tensors adds r |c| to one direction's error against a denominator of
about 2 sqrt(T), c having a density near 0.8 at 0 (random signs, magnitudes and gains:
no atom at 0). A direction misses it when |c| < 2 sqrt(T) warn / r, with probability
p = 1.6 sqrt(T) warn / r; k independent directions miss with p^k. At r = 1e-2 and
warn = 1e-5, p^2 <= 1e-3 up to T = 390."""

NOISE_UNITS = 4.0
"""A derivative along a direction is resolved only to about eps_J |J| / h (the roundoff
of J over the step). Directional denominators are floored at NOISE_UNITS times that over
``warn``, so an error within a few roundoff units stays below ``warn`` whatever the dtype
(float64: a floor near 1e-5 |J|; float32: near 1e-1 |J|, where a per-tensor direction
cannot resolve more)."""

ROUNDING_STEP_ULPS = 16.0
"""J's changes are called coarser than its dtype only when the smallest is above this many
units of eps_J |J|: any two floats near J differ by a whole number of ulps anyway."""

_STATUS_ORDER: dict[Status, int] = {"ok": 0, "warn": 1, "fail": 2, "nondeterministic": 3}


BLOCK_CACHE_ENTRIES = 2**20
"""Entries of random blocks a direction keeps between uses (8 MiB of float64)."""


def default_step(dtype: np.dtype[np.floating]) -> float:
    """The base step cbrt(machine eps): it balances truncation (h^2) against roundoff (eps/h).

    >>> round(default_step(np.dtype(np.float64)), 9)
    6.055e-06
    """
    return float(np.cbrt(np.finfo(dtype).eps))


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
        sample: None checks every component; an int k checks k components; a float in
            (0, 1] checks that fraction; both drawn with ``seed``, stratified so every
            tensor is represented (at least one component each). ``"directional"``
            checks each tensor along one random unit direction (two evaluations per
            tensor); ``"auto"`` is full up to ``AUTO_FULL_MAX_SIZE`` components; above,
            it screens along `screen_directions` joint random directions (2 evaluations
            each; 2 directions up to 390 tensors), and only when the screen reaches
            ``warn`` checks each tensor's own direction (a second one when the first
            confirms nothing), then localizes inside the failing tensors, most
            suspicious first, by bisection within ``AUTO_LOCALIZE_EVALUATIONS``
            (tensors left over are named in the notes). `most_evaluations` bounds the
            cost; the module docstring says what the screen guarantees.
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
    _validate_options(eps, top_k, warn, threshold)
    if isinstance(localize_evaluations, bool) or not isinstance(localize_evaluations, int):
        raise OptionError(
            f"localize_evaluations: expected an int >= 0, received {localize_evaluations!r}"
        )
    tensors = named_tensors(params, grads)
    terms = _validate_terms(regularization, tensors)
    objective = _Objective(loss, tensors, terms)
    policy = "given" if eps is not None else "cbrt(machine eps) * max(1, |theta_i|)"
    dtype = _coarsest_dtype(tensors)
    base_step = eps if eps is not None else default_step(dtype)
    notes: list[str] = []
    scale = TOLERANCE_SCALE.get(dtype, 1.0)
    if scale != 1.0:
        warn, threshold = warn * scale, threshold * scale
        notes.append(
            f"{dtype} parameters: warn and threshold scaled x{scale:g} to {warn:g} and "
            f"{threshold:g} (differences in {dtype} are noisier than in float64)"
        )

    loss0 = objective.loss(THETA)
    loss0_again = objective.loss("J(theta), evaluated again")
    nondeterministic = abs(loss0 - loss0_again) > 64 * objective.roundoff * max(abs(loss0), 1e-300)
    if nondeterministic:
        notes.append(
            f"J(theta) evaluated twice gave {loss0!r} and {loss0_again!r}: the loss is "
            "nondeterministic (dropout or other randomness not replayed?); no alert"
        )

    def compare_components(
        plan: dict[str, npt.NDArray[np.intp]],
    ) -> tuple[_Comparison, list[Component]]:
        comparison = _componentwise(
            objective, tensors, plan, loss0, base_step, eps is not None, warn
        )
        worst = comparison.worst_components(tensors, top_k)
        if diagnose:
            _diagnose(worst, comparison, objective, tensors, loss0, nondeterministic, warn)
        kinks = [c for c in worst if c.diagnosis == "kink"]
        if kinks:
            comparison.exclude([comparison.position[c.name] for c in kinks])
            notes.append(
                "left out of the ratios as kinks (one-sided slopes differ at two step sizes): "
                + ", ".join(c.name for c in kinks)
            )
        return comparison, worst

    if sample == "auto" and tensors.size <= AUTO_FULL_MAX_SIZE:
        sample = None
    screen: tuple[float, int] | None = None
    below: tuple[float, float] | None = None  # (gradient scale, resolution floor)
    rounding_step: float | None = None
    if sample == "auto":
        directions = screen_directions(len(tensors.names))
        screen_ratio, screen_below = _screen(
            objective, tensors, base_step, seed, abs(loss0) / warn, directions
        )
        notes.append(
            f"screened along {directions} random directions over all tensors, each "
            f"tensor weighted to count equally: ratio {screen_ratio:.3g}"
        )
        # A clean screen is the whole check, and so is a screen of a nondeterministic J:
        # checking each tensor on noise would only spend evaluations.
        if screen_ratio < warn or nondeterministic:
            screen, below = (screen_ratio, directions), screen_below
    if screen is not None:
        ratio, checked, mode, worst = screen[0], screen[1], "directional", []
        screened: Status = "nondeterministic" if nondeterministic else "ok"
        per_tensor = {
            name: TensorResult(
                ratio=ratio,
                checked=0,
                size=tensors.params[name].size,
                max_abs_error=0.0,
                status=screened,
            )
            for name in tensors.names
        }
    elif _is_directional(sample):
        comparison = _directional(objective, tensors, base_step, seed, abs(loss0) / warn)
        per_tensor = comparison.per_tensor(tensors, warn, threshold)
        notes.append("directional: one random unit direction per tensor, 2 evaluations each")
        redrawn = 0
        if sample == "auto" and all(v.status == "ok" for v in per_tensor.values()):
            # The screen saw an error no tensor's direction confirms: each direction may
            # be nearly orthogonal to its tensor's error (probability ~ its ratio over
            # warn). A second draw squares that chance; if it confirms, it is the verdict.
            again = _directional(objective, tensors, base_step, seed, abs(loss0) / warn, 4)
            per_tensor_again = again.per_tensor(tensors, warn, threshold)
            confirmed = any(v.status != "ok" for v in per_tensor_again.values())
            notes.append(
                "no tensor's direction confirmed the screen; a second direction per tensor "
                + ("did" if confirmed else "did not either")
            )
            redrawn = comparison.checked
            if confirmed:
                comparison, per_tensor = again, per_tensor_again
        checked, mode = comparison.checked + redrawn, comparison.mode
        worst = comparison.worst_components(tensors, top_k)
        ratio, below = comparison.ratio(), comparison.below_resolution()
        failing = [name for name, verdict in per_tensor.items() if verdict.status == "fail"]
        if sample == "auto" and failing:
            # Most suspicious first: the worst per-tensor ratio is localized first.
            failing.sort(key=lambda name: -per_tensor[name].ratio)
            plan, skipped = _localization_plan(
                objective, tensors, failing, base_step, seed, localize_evaluations
            )
            localized, worst = compare_components(plan)
            checked += localized.checked
            done = [name for name in failing if name not in skipped]
            notes.append(
                "localized by bisection along a random direction, then the bisected entry "
                "and the largest analytic entry checked component-wise, in " + ", ".join(done)
            )
            if skipped:
                notes.append(
                    f"not localized (the localization budget of {localize_evaluations} "
                    f"evaluations was spent; their per-tensor verdicts stand): "
                    + ", ".join(skipped)
                )
    else:
        assert not isinstance(sample, str)
        comparison, worst = compare_components(_sample_plan(tensors, sample, seed))
        checked, mode = comparison.checked, comparison.mode
        ratio, below = comparison.ratio(), comparison.below_resolution()
        per_tensor = comparison.per_tensor(tensors, warn, threshold)
        rounding_step = comparison.rounding_step

    if rounding_step is not None:
        notes.append(
            f"J's values are whole multiples of a rounding step {rounding_step:.3g} (J is "
            f"computed coarser than {dtype}: float32, bfloat16 or quantized): a numeric "
            f"derivative resolves no less than {rounding_step:.3g} / h, and the ratios "
            "are judged against that resolution, not called a bug"
        )
    if below is not None:
        notes.append(
            f"below resolution: the gradient's size {below[0]:.3g} (||numeric|| + "
            f"||analytic||) is below {below[1]:.3g}, what J's finite differences resolve "
            f"at warn {warn:g} ({NOISE_UNITS:g} roundoff units eps_J |J| / h over warn): "
            "at or near an optimum; the ratio is judged against that resolution"
        )
    quiet = [n for n, t in per_tensor.items() if t.below_resolution]
    if quiet and below is None:
        listed = ", ".join(quiet[:5]) + (f" and {len(quiet) - 5} more" if len(quiet) > 5 else "")
        notes.append(
            f"below resolution (judged against J's roundoff, not their own size): {listed}"
        )

    status = _status(ratio, warn, threshold)
    for tensor_verdict in per_tensor.values():
        if _STATUS_ORDER[tensor_verdict.status] > _STATUS_ORDER[status]:
            status = tensor_verdict.status
    if nondeterministic:
        status = "nondeterministic"
    verdict, rule, rule_ratio = _verdict(status, ratio, per_tensor, warn, threshold, below)

    return CheckResult(
        ratio=ratio,
        status=status,
        tensors=per_tensor,
        worst=worst,
        eps=base_step,
        eps_policy=policy,
        checked=checked,
        size=tensors.size,
        loss=loss0 + sum(term.value(tensors.params) for term in terms),
        loss_evals=objective.evaluations,
        seconds=time.perf_counter() - started,
        regularization={term.name: term.value(tensors.params) for term in terms},
        mode=mode,
        dtype=str(dtype),
        warn=warn,
        threshold=threshold,
        seed=seed,
        notes=notes,
        verdict=verdict,
        rule=rule,
        rule_ratio=rule_ratio,
        below_resolution=below is not None,
        resolution=None if below is None else below[1],
        rounding_step=rounding_step,
    )


class _Objective:
    """J = loss() + regularization, evaluated at the current (possibly perturbed) theta.

    Terms that are sums over components (L2) are not re-evaluated per component:
    their change is added exactly, in O(1), by the component loop.
    """

    def __init__(
        self,
        loss: Callable[[], object],
        tensors: NamedTensors,
        terms: Sequence[RegularizationTerm],
    ) -> None:
        if not callable(loss):
            raise LossError(
                f"loss: expected a zero-argument callable returning J, "
                f"received {type(loss).__name__}"
            )
        self._loss = loss
        self.batched: BatchedEvaluation | None = getattr(loss, "evaluate_batch", None)
        self.restore_tensor: Callable[[str], None] | None = getattr(loss, "restore_tensor", None)
        self._params = tensors.params
        self.terms = terms
        self.evaluations = 0
        self.roundoff = float(np.finfo(_coarsest_dtype(tensors)).eps)

    def value(self, where: str) -> float:
        """Full J: the loss plus every term."""
        return self.loss(where) + sum(term.value(self._params) for term in self.terms)

    def loss(self, where: str | tuple[str, int, str]) -> float:
        self.evaluations += 1
        raw = self._loss()
        # float is the hot path: no numpy round trip
        value = raw if type(raw) is float else _as_scalar(raw, _where(where))
        if not math.isfinite(value) and where == THETA:
            # The training's own loss went bad at this step: a finding, not a misuse.
            raise NonFiniteLossError(
                f"loss at {THETA}: expected a finite scalar, received {value!r}",
                quantity="loss",
                tensor=None,
                detail=f"J(theta) = {value!r}",
            )
        if not math.isfinite(value):
            raise LossError(
                f"loss at {_where(where)}: expected a finite scalar, received {value!r}"
            )
        return value


def _where(where: str | tuple[str, int, str]) -> str:
    """Where J was evaluated; a tuple (tensor, flat index, side) is formatted only on error."""
    if isinstance(where, str):
        return where
    tensor, flat_index, side = where
    return f"{tensor} flat index {flat_index} {side}"


def _as_scalar(raw: object, where: str) -> float:
    """A Python float from a number, a size-1 array or a 0-d tensor (anything with __array__)."""
    if raw is None or isinstance(raw, str | bytes):
        raise LossError(
            f"loss at {where}: expected a float or 0-d array, received {type(raw).__name__}"
        )
    try:
        array = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise LossError(
            f"loss at {where}: expected a float or 0-d array, received {type(raw).__name__}"
        ) from None
    if array.size != 1:
        raise LossError(
            f"loss at {where}: expected a scalar (float or 0-d array), "
            f"received an array of shape {array.shape}"
        )
    return float(array.reshape(()))


@dataclass
class _Comparison:
    """Numeric and analytic values of the checked components, in theta order."""

    mode: Literal["full", "sampled", "directional"]
    tensor_names: tuple[str, ...]
    owner: npt.NDArray[np.intp]
    """Position in ``tensor_names`` of each component's tensor."""
    flat_index: npt.NDArray[np.intp]
    """Row-major index of each component inside its tensor (unused when directional)."""
    numeric: F64
    analytic: F64
    steps: F64
    plus: F64
    """J(theta + h e_i) - J(theta), kept for the one-sided slopes of the diagnosis."""
    minus: F64
    gradient_scale: float
    """||numeric|| + ||analytic|| over the whole comparison, for the near-zero floor."""
    resolution: F64
    """Per component, NOISE_UNITS times the roundoff of its numeric derivative
    (eps_J |J| / h, or the rounding step of a coarse J over h) over ``warn``: an error
    of a few roundoff units over a denominator floored at it stays below ``warn``. A
    set of components is floored at the norm of theirs (roundoff adds up like noise)."""
    rounding_step: float | None = None
    """The step J's values come in when coarser than its dtype (see `_rounding_step`)."""
    included: npt.NDArray[np.bool_] = field(init=False)
    position: dict[str, int] = field(default_factory=dict)
    """Position of each component that ``worst_components`` returned, by name."""

    def __post_init__(self) -> None:
        self.included = np.ones(len(self.numeric), dtype=bool)

    @property
    def checked(self) -> int:
        return len(self.numeric)

    def exclude(self, positions: list[int]) -> None:
        self.included[positions] = False

    def ratio(self) -> float:
        keep = self.included
        return _ratio(self.numeric[keep], self.analytic[keep], self.floor(keep))

    def floor(self, members: npt.NDArray[np.bool_]) -> float:
        """The resolution floor of a set of components' denominator."""
        return float(np.linalg.norm(self.resolution[members]))

    def below_resolution(self) -> tuple[float, float] | None:
        """(gradient scale, floor) when the whole gradient is below resolution, else None."""
        keep = self.included
        scale = float(np.linalg.norm(self.numeric[keep]) + np.linalg.norm(self.analytic[keep]))
        floor = self.floor(keep)
        return (scale, floor) if scale < floor else None

    def per_tensor(
        self, tensors: NamedTensors, warn: float, threshold: float
    ) -> dict[str, TensorResult]:
        results: dict[str, TensorResult] = {}
        for position, name in enumerate(self.tensor_names):
            members = self.owner == position
            keep = members & self.included
            numeric, analytic = self.numeric[keep], self.analytic[keep]
            error = float(np.linalg.norm(numeric - analytic))
            scale = float(np.linalg.norm(numeric) + np.linalg.norm(analytic))
            floor = NEAR_ZERO_FLOOR * self.gradient_scale * self._floor_weight(tensors, name)
            resolution = self.floor(keep)
            denominator = max(scale, floor, resolution)
            ratio = error / denominator if denominator > 0 else 0.0
            results[name] = TensorResult(
                ratio=ratio,
                checked=int(members.sum()),
                size=tensors.params[name].size,
                max_abs_error=float(np.max(np.abs(numeric - analytic), initial=0.0)),
                status=_status(ratio, warn, threshold),
                below_resolution=bool(keep.any()) and scale < resolution,
            )
        return results

    def _floor_weight(self, tensors: NamedTensors, name: str) -> float:
        # A directional value is one projection of the tensor's gradient: compare
        # it with the projection of the whole gradient onto one random direction.
        if self.mode == "directional":
            return 1.0 / math.sqrt(tensors.params[name].size)
        return 1.0

    def worst_components(self, tensors: NamedTensors, top_k: int) -> list[Component]:
        shapes = {name: tensors.params[name].shape for name in self.tensor_names}
        errors = np.abs(self.numeric - self.analytic)
        count = min(top_k, len(errors))
        if count == 0:
            return []
        order = np.argpartition(-errors, count - 1)[:count]
        order = order[np.argsort(-errors[order], kind="stable")]
        worst = []
        for i in order.tolist():
            tensor = self.tensor_names[self.owner[i]]
            if self.mode == "directional":
                index: tuple[int, ...] = ()
                name = f"{tensor} (direction)"
            else:
                shape = shapes[tensor]
                index = tuple(int(k) for k in np.unravel_index(self.flat_index[i], shape))
                name = component_name(tensor, index)
            self.position[name] = i
            numeric, analytic = float(self.numeric[i]), float(self.analytic[i])
            denominator = abs(numeric) + abs(analytic)
            worst.append(
                Component(
                    tensor=tensor,
                    index=list(index),
                    name=name,
                    analytic=analytic,
                    numeric=numeric,
                    abs_error=float(errors[i]),
                    rel_error=float(errors[i]) / denominator if denominator > 0 else 0.0,
                )
            )
        return worst


def _componentwise(
    objective: _Objective,
    tensors: NamedTensors,
    plan: dict[str, npt.NDArray[np.intp]],
    loss0: float,
    base_step: float,
    step_given: bool,
    warn: float,
) -> _Comparison:
    raw_changes: list[F64] = []
    plus_changes: list[F64] = []
    minus_changes: list[F64] = []
    steps: list[F64] = []
    analytic_parts: list[F64] = []
    separable, generic = _split_terms(objective.terms)
    # A batched loss sees only the parameters, not a generic term: those go one by one.
    batched = objective.batched if not generic else None
    analytic_values = _gradient_components(tensors, plan)
    for tensor in tensors.names:
        chosen = plan[tensor]
        view = tensors.flat_param(tensor)
        olds = view[chosen].astype(np.float64)
        h = np.full(olds.shape, base_step) if step_given else base_step * np.maximum(1, abs(olds))
        ups = (olds + h).astype(view.dtype)
        downs = (olds - h).astype(view.dtype)
        plus, minus = _differences(
            objective,
            tensors,
            tensor,
            chosen,
            ups,
            downs,
            loss0,
            separable,
            generic,
            batched,
            raw=raw_changes,
        )
        plus_changes.append(plus)
        minus_changes.append(minus)
        # Divide by the step realized in the dtype, unless eps was given (the lecture's 2 eps).
        steps.append(2 * h if step_given else ups.astype(np.float64) - downs.astype(np.float64))
        analytic_parts.append(analytic_values[tensor])

    plus_array = np.concatenate(plus_changes)
    minus_array = np.concatenate(minus_changes)
    step_array = np.concatenate(steps)
    numeric = (plus_array - minus_array) / step_array
    analytic = np.concatenate(analytic_parts) if analytic_parts else np.zeros(0)
    full = all(plan[t].size == tensors.params[t].size for t in tensors.names)
    rounding_step = _rounding_step(np.concatenate([np.zeros(0), *raw_changes]), loss0, objective)
    noise = max(objective.roundoff * abs(loss0), rounding_step or 0.0)
    return _Comparison(
        mode="full" if full else "sampled",
        tensor_names=tensors.names,
        owner=np.repeat(np.arange(len(tensors.names)), [plan[t].size for t in tensors.names]),
        flat_index=np.concatenate([plan[t] for t in tensors.names]),
        numeric=numeric,
        analytic=analytic,
        steps=step_array,
        plus=plus_array,
        minus=minus_array,
        gradient_scale=float(np.linalg.norm(numeric) + np.linalg.norm(analytic)),
        resolution=NOISE_UNITS * noise / warn / (step_array / 2),
        rounding_step=rounding_step,
    )


def _rounding_step(changes: F64, loss0: float, objective: _Objective) -> float | None:
    """The step q that J's values come in, when J is rounded coarser than its dtype.

    Differences J(theta +- h e_i) - J(theta) of a J computed in float32, bfloat16 or
    quantized are whole multiples of one q (the spacing of J's values near J(theta));
    None when they are not, or when q is within ``ROUNDING_STEP_ULPS`` of the dtype's own
    spacing (every float difference is a multiple of that).
    """
    values = np.abs(changes[changes != 0])
    if values.size < 4:
        return None
    smallest = float(values.min())
    if smallest <= ROUNDING_STEP_ULPS * objective.roundoff * max(abs(loss0), 1e-300):
        return None
    multiples = values / smallest
    for divisor in range(1, 9):  # the smallest change may itself be a few steps
        scaled = multiples * divisor
        if np.all(np.abs(scaled - np.round(scaled)) <= 1e-6 * np.maximum(1.0, scaled)):
            return smallest / divisor
    return None


def _gradient_components(
    tensors: NamedTensors, plan: dict[str, npt.NDArray[np.intp]]
) -> dict[str, F64]:
    """The analytic values of the planned components, from one visit of the gradient."""
    values = {name: np.zeros(0) for name in tensors.names}

    def take(name: str, gradient: npt.NDArray[np.floating]) -> None:
        values[name] = gradient.reshape(-1)[plan[name]].astype(np.float64)

    tensors.visit_grads([name for name in tensors.names if plan[name].size], take)
    return values


def _differences(
    objective: _Objective,
    tensors: NamedTensors,
    tensor: str,
    chosen: npt.NDArray[np.intp],
    ups: npt.NDArray[np.floating],
    downs: npt.NDArray[np.floating],
    loss0: float,
    separable: list[RegularizationTerm],
    generic: list[RegularizationTerm],
    batched: BatchedEvaluation | None,
    step_name: str = "h",
    raw: list[F64] | None = None,
) -> tuple[F64, F64]:
    """J(theta with component j at ups / downs) - J(theta) for each chosen j, penalties included.

    ``raw``, when given, receives the changes of the loss alone (no penalty), for
    `_rounding_step`.
    """
    if batched is not None and chosen.size:
        plus, minus = _evaluate_in_batch(batched, objective, tensor, chosen, ups, downs, loss0)
    else:
        plus, minus = _evaluate_one_by_one(
            objective, tensors, tensor, chosen, ups, downs, loss0, generic, step_name
        )
    if raw is not None and not generic:
        raw.extend((plus.copy(), minus.copy()))
    olds = tensors.flat_param(tensor)[chosen].astype(np.float64)
    for term in separable:
        plus += _term_changes(term, tensor, olds, ups.astype(np.float64))
        minus += _term_changes(term, tensor, olds, downs.astype(np.float64))
    return plus, minus


def _evaluate_one_by_one(
    objective: _Objective,
    tensors: NamedTensors,
    tensor: str,
    chosen: npt.NDArray[np.intp],
    ups: npt.NDArray[np.floating],
    downs: npt.NDArray[np.floating],
    loss0: float,
    generic: list[RegularizationTerm],
    step_name: str,
) -> tuple[F64, F64]:
    """J(theta +- h e_j) - J(theta) for each chosen j, perturbing in place and restoring.

    The hot loop of a full check: per component two writes, two loss calls and
    one restore, nothing that grows with n.
    """
    view = tensors.flat_param(tensor)
    plus = np.empty(chosen.size)
    minus = np.empty(chosen.size)
    generic0 = sum(term.value(tensors.params) for term in generic)
    for k, j in enumerate(chosen.tolist()):
        old = view[j]
        try:
            view[j] = ups[k]
            plus[k] = objective.loss((tensor, j, f"+ {step_name}")) - loss0
            if generic:
                plus[k] += sum(t.value(tensors.params) for t in generic) - generic0
            view[j] = downs[k]
            minus[k] = objective.loss((tensor, j, f"- {step_name}")) - loss0
            if generic:
                minus[k] += sum(t.value(tensors.params) for t in generic) - generic0
        finally:
            view[j] = old
    return plus, minus


def _evaluate_in_batch(
    batched: BatchedEvaluation,
    objective: _Objective,
    tensor: str,
    chosen: npt.NDArray[np.intp],
    ups: npt.NDArray[np.floating],
    downs: npt.NDArray[np.floating],
    loss0: float,
) -> tuple[F64, F64]:
    """The same differences from one call of the loss's ``evaluate_batch``."""
    indices = np.concatenate([chosen, chosen])
    raw = batched(tensor, indices, np.concatenate([ups, downs]))
    objective.evaluations += indices.size
    values = np.asarray(raw, dtype=np.float64)
    if values.shape != indices.shape:
        raise LossError(
            f"evaluate_batch for {tensor}: expected {indices.size} values, one per "
            f"perturbation, received shape {values.shape}"
        )
    if not np.isfinite(values).all():
        bad = int(np.argmin(np.isfinite(values)))
        raise LossError(
            f"evaluate_batch at {tensor} flat index {indices[bad]}: expected finite values, "
            f"received {values[bad]!r}"
        )
    return values[: chosen.size] - loss0, values[chosen.size :] - loss0


def _term_changes(term: RegularizationTerm, tensor: str, old: F64, new: F64) -> F64:
    return np.array(
        [term.component_change(tensor, o, n) or 0.0 for o, n in zip(old, new, strict=True)]
    )


class _Direction:
    """A random direction with a block of norm proportional to ``weights[t]`` in each tensor t.

    Blocks are seeded by the tensor's position in ``weights``. A direction keeps the
    blocks it has drawn up to ``BLOCK_CACHE_ENTRIES`` entries in all (drawing one costs
    more than a small model's forward, and each is used three times); beyond that they
    are drawn again whenever needed, so a large model's direction never costs more than
    that plus one tensor's memory. A direction over several tensors also multiplies each
    tensor's block by a random gain uniform in [0.5, 1.5): without it a 1-component
    tensor's block is exactly +-1 (its magnitude is normalized away), and equal relative
    errors in two scalars cancel in g . v with probability 1/2 (issue 12). With it, the
    contribution of any one tensor to g . v has a bounded density, so no error pattern
    cancels structurally.
    """

    def __init__(self, weights: dict[str, float], seed: list[int], where: str) -> None:
        self.seed = seed
        self.where = where
        self._position = {name: position for position, name in enumerate(weights)}
        self._gains = (
            np.random.default_rng([*seed, len(weights), 1]).uniform(0.5, 1.5, size=len(weights))
            if len(weights) > 1
            else np.ones(1)
        )
        self._units: dict[str, F64] = {}
        self._kept_entries = 0
        self.reweight(weights)

    def reweight(self, weights: dict[str, float]) -> None:
        """Set the norm of each tensor's block (proportional to ``weights``, times its gain)."""
        self.weights = {
            name: w * float(g) for (name, w), g in zip(weights.items(), self._gains, strict=True)
        }
        self._total = math.sqrt(sum(w * w for w in self.weights.values()))

    def share(self, name: str) -> float:
        """The norm of this direction's block in tensor ``name`` (the direction has norm 1)."""
        return self.weights[name] / self._total

    def unit_block(self, name: str, size: int) -> F64:
        """The block's random pattern in tensor ``name``, flat and of norm 1 (read only)."""
        kept = self._units.get(name)
        if kept is not None:
            return kept
        block = _random_block(np.random.default_rng([*self.seed, self._position[name]]), (size,))
        block /= max(float(np.linalg.norm(block)), 1e-300)
        if self._kept_entries + size <= BLOCK_CACHE_ENTRIES:
            self._units[name] = block
            self._kept_entries += size
        return block

    def block(self, name: str, shape: tuple[int, ...]) -> F64:
        """This direction's block in tensor ``name``: a fresh array the caller may modify."""
        block = self.unit_block(name, math.prod(shape)) * self.share(name)
        return block.reshape(shape)


def _directional(
    objective: _Objective,
    tensors: NamedTensors,
    base_step: float,
    seed: int,
    loss_over_warn: float,
    stream: int = 1,
) -> _Comparison:
    """One random unit direction v per tensor: (J(theta + h v) - J(theta - h v)) / 2h vs g . v.

    ``loss_over_warn`` is |J| / warn, for the roundoff floor of each denominator
    (NOISE_UNITS).
    """
    names = tensors.names
    directions = [
        _Direction({tensor: 1.0}, [seed, stream, position], f"{tensor} +- h v")
        for position, tensor in enumerate(names)
    ]
    numeric_array, analytic_array, steps = _along_directions(
        objective, tensors, directions, base_step
    )
    # A projection onto one random unit direction has about 1/sqrt(size) of the norm;
    # rescale so the floor compares like with like.
    sizes = np.array([tensors.params[t].size for t in names], dtype=np.float64)
    scale = float(np.linalg.norm(numeric_array * np.sqrt(sizes)))
    scale += float(np.linalg.norm(analytic_array * np.sqrt(sizes)))
    return _Comparison(
        mode="directional",
        tensor_names=names,
        owner=np.arange(len(names)),
        flat_index=np.zeros(len(names), dtype=np.intp),
        numeric=numeric_array,
        analytic=analytic_array,
        steps=np.zeros(len(names)),
        plus=np.zeros(len(names)),
        minus=np.zeros(len(names)),
        gradient_scale=scale,
        resolution=NOISE_UNITS * objective.roundoff * loss_over_warn / steps,
    )


def _screen(
    objective: _Objective,
    tensors: NamedTensors,
    base_step: float,
    seed: int,
    loss_over_warn: float,
    count: int = SCREEN_DIRECTIONS,
) -> tuple[float, tuple[float, float] | None]:
    """The ratio along ``count`` random directions that move every tensor at once, and
    (gradient scale, resolution) when the gradient is below resolution.

    Each tensor's block of the direction is scaled by sqrt(size) / ||g_t|| (floored at
    NEAR_ZERO_FLOOR * ||g||), so every tensor adds about the same to g . v and a
    relative error in any one of them shows, at 2 evaluations per direction. The
    denominator is floored at the roundoff resolution (NOISE_UNITS).
    """
    names = tensors.names
    directions = [
        _Direction(dict.fromkeys(names, 1.0), [seed, 2, draw], "all tensors +- h v")
        for draw in range(count)
    ]
    # In float64 the realized step is h v to roundoff, so g . v follows from each tensor's
    # projection on its unit pattern, taken in the same backward pass as the norms that
    # weight the blocks: one pass of the gradient, not two.
    one_pass = all(tensors.params[name].dtype == np.float64 for name in names)
    norms: dict[str, float] = {}
    projections: dict[str, list[float]] = {}

    def measure(name: str, gradient: npt.NDArray[np.floating]) -> None:
        norms[name] = float(np.linalg.norm(gradient))
        if one_pass:
            flat = gradient.reshape(-1)
            projections[name] = [
                float(np.dot(flat, d.unit_block(name, flat.size))) for d in directions
            ]

    tensors.visit_grads(names, measure)
    floor = NEAR_ZERO_FLOOR * math.sqrt(sum(n * n for n in norms.values()))
    for direction in directions:
        direction.reweight(
            {
                name: math.sqrt(tensors.params[name].size) / max(norms[name], floor, 1e-300)
                for name in names
            }
        )
    if one_pass:
        steps = _direction_steps(tensors.params, directions, base_step)
        analytic = np.array(
            [
                sum(d.share(name) * projections[name][k] for name in names)
                for k, d in enumerate(directions)
            ]
        )
        numeric = np.array(
            [
                _numeric_along(objective, tensors.params, direction, float(h))
                for direction, h in zip(directions, steps, strict=True)
            ]
        )
    else:
        numeric, analytic, steps = _along_directions(objective, tensors, directions, base_step)
    resolution = NOISE_UNITS * objective.roundoff * loss_over_warn / float(np.min(steps))
    scale = float(np.linalg.norm(numeric) + np.linalg.norm(analytic))
    below = (scale, resolution) if scale < resolution else None
    return _ratio(numeric, analytic, floor=resolution), below


def _direction_steps(
    params: dict[str, npt.NDArray[np.floating]], directions: list[_Direction], base_step: float
) -> F64:
    """The step h along each direction: ``base_step`` times the largest |theta| it moves (>= 1)."""
    return np.array(
        [
            base_step * max([1.0, *(_largest_magnitude(params[n]) for n in d.weights)])
            for d in directions
        ]
    )


def _along_directions(
    objective: _Objective,
    tensors: NamedTensors,
    directions: list[_Direction],
    base_step: float,
) -> tuple[F64, F64, F64]:
    """Numeric and analytic derivatives of J along each direction (2 evaluations each), and
    the step h taken along each.

    The analytic side is g . (theta_+ - theta_-) / 2h with theta_+- as realized in the
    arrays' dtype (so float32 rounding of theta +- h v is not mistaken for an error),
    taken for every direction in one visit of the gradient, before anything moves.
    Moved tensors are put back with the loss's ``restore_tensor`` where it has one (no
    copy at all), else from a backup of just the moved tensors.
    """
    params = tensors.params
    steps = _direction_steps(params, directions, base_step)
    analytic = np.zeros(len(directions))

    def project(name: str, gradient: npt.NDArray[np.floating]) -> None:
        # In place where possible: the largest tensor's temporaries are the peak memory.
        # Flat, so a 0-d tensor's arithmetic stays in arrays (out= needs one).
        theta = params[name].reshape(-1)
        for k, direction in enumerate(directions):
            if name in direction.weights:
                step = direction.block(name, theta.shape)
                step *= float(steps[k])
                up = (theta + step).astype(theta.dtype, copy=False)
                up = up.astype(np.float64, copy=False)
                down = np.subtract(theta, step, out=step).astype(theta.dtype, copy=False)
                realized = np.subtract(up, down, out=up, dtype=np.float64)
                analytic[k] += float(np.dot(gradient.reshape(-1), realized.reshape(-1)))

    moved = [n for n in tensors.names if any(n in d.weights for d in directions)]
    tensors.visit_grads(moved, project)

    numeric = np.array(
        [
            _numeric_along(objective, params, direction, float(h))
            for direction, h in zip(directions, steps, strict=True)
        ]
    )
    return numeric, analytic / (2 * steps), steps


def _numeric_along(
    objective: _Objective,
    params: dict[str, npt.NDArray[np.floating]],
    direction: _Direction,
    h: float,
) -> float:
    """(J(theta + h v) - J(theta - h v)) / 2h, every moved tensor put back exactly after."""
    restore = objective.restore_tensor
    backup = {} if restore else {name: _exact_backup(params[name]) for name in direction.weights}

    def put_back() -> None:
        for name in direction.weights:
            if restore is not None:
                restore(name)
            else:
                params[name][...] = backup[name]

    def move(sign: float) -> None:
        """Write theta + sign h v, computed from the original values."""
        for name in direction.weights:
            theta = params[name]
            values = direction.block(name, theta.shape)
            values *= sign * h
            values += theta
            theta[...] = values

    try:
        move(+1.0)
        plus = objective.value(f"{direction.where} (+)")
        put_back()
        move(-1.0)
        minus = objective.value(f"{direction.where} (-)")
    finally:
        put_back()
    return (plus - minus) / (2 * h)


def _exact_backup(array: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    """A copy for a bit-exact restore: float32 when it holds every value exactly."""
    if array.dtype == np.float64:
        narrow = array.astype(np.float32)
        if np.array_equal(narrow, array):
            return narrow
    return array.copy()


def _random_block(rng: np.random.Generator, shape: tuple[int, ...]) -> F64:
    """Random signs times magnitudes uniform in [0.5, 1.5).

    Unlike a Gaussian, no entry is near zero, so an error confined to one entry always
    shows in g . v; unlike pure signs, equal errors in several entries cannot cancel.
    """
    size = math.prod(shape)  # drawn flat: a 0-d tensor still gets an array, not a scalar
    negative = rng.integers(0, 2, size=size, dtype=np.int8).astype(bool)
    block = rng.uniform(0.5, 1.5, size=size)
    return np.negative(block, out=block, where=negative).reshape(shape)


def _largest_magnitude(array: npt.NDArray[np.floating]) -> float:
    """max |array| without a temporary the size of the array."""
    if array.size == 0:
        return 0.0
    return max(abs(float(array.max())), abs(float(array.min())))


def _diagnose(
    worst: list[Component],
    comparison: _Comparison,
    objective: _Objective,
    tensors: NamedTensors,
    loss0: float,
    nondeterministic: bool,
    warn: float,
) -> None:
    """Label the worst components by re-evaluating them with half the step.

    The rule, in order (h is the step, noise = eps_J * |J| / h):
      nondeterministic: J(theta) itself was not reproducible.
      roundoff / truncation for a component that agrees (relative error below
            ``warn``): truncation when the error at h/2 is at most half the error
            at h, else roundoff.
      roundoff: the error is within 4 noise (the noise being the larger of eps_J |J| / h
            and J's rounding step over h, when J is coarser than its dtype); checked
            before kink, since an error of pure noise can look like any pattern.
      kink: the one-sided slopes (J(theta+h)-J(theta))/h and (J(theta)-J(theta-h))/h
            differ by at least half the error and by more than 16 noise, and either the
            gap stays the same size at h/2 (ratio 0.75..1.5: the kink lies within h/2)
            or the error at h/2 is below 1/16 of the error at h (the kink lies between
            h/2 and h). For a smooth J the gap is about h * J'' (it halves) and the error
            shrinks by 4; for roundoff the gap is about noise (it doubles).
            (A gap growing like 1/h is noise too: it then counts as the noise.)
      truncation: the error at h/2 is at most half the error at h (it shrinks like h^2).
      bug: none of the above: the error is stable under a change of step.
    """
    if not worst:
        return
    separable, generic = _split_terms(objective.terms)
    generic0 = sum(term.value(tensors.params) for term in generic)
    j_scale = max(abs(loss0 + generic0) * objective.roundoff, comparison.rounding_step or 0.0)
    j_scale = max(j_scale, 1e-300)
    for component in worst:
        if nondeterministic:
            component.diagnosis = "nondeterministic"
            continue
        i = comparison.position[component.name]
        h_plus, h_minus, plus_half, minus_half = _half_step(
            objective, tensors, comparison, i, component, loss0, separable, generic
        )
        step = comparison.steps[i] / 2
        error_h = abs(component.numeric - component.analytic)
        numeric_half = (plus_half - minus_half) / (h_plus + h_minus)
        error_half = abs(numeric_half - component.analytic)
        noise = j_scale / step
        gap_h = abs(comparison.plus[i] / step + comparison.minus[i] / step)
        gap_half = abs(plus_half / h_plus + minus_half / h_minus)
        gap_growth = gap_half / gap_h if gap_h > 0 else 0.0
        if gap_growth >= 1.5:
            noise = max(noise, gap_h)
        label: Diagnosis
        if component.rel_error < warn:
            label = "truncation" if error_half <= 0.5 * error_h else "roundoff"
        elif error_h <= 4 * noise:
            label = "roundoff"  # first: noise can mimic any pattern below (issue 12)
        elif gap_h >= 0.5 * error_h and gap_h > 16 * noise and 0.75 <= gap_growth <= 1.5:
            label = "kink"
        elif gap_h >= 0.5 * error_h and gap_h > 16 * noise and error_half < error_h / 16:
            label = "kink"  # crossed at h but not at h/2: the error vanishes, not / 4
        elif error_half <= 0.5 * error_h:
            label = "truncation"
        else:
            label = "bug"
        component.diagnosis = label


def _half_step(
    objective: _Objective,
    tensors: NamedTensors,
    comparison: _Comparison,
    i: int,
    component: Component,
    loss0: float,
    separable: list[RegularizationTerm],
    generic: list[RegularizationTerm],
) -> tuple[float, float, float, float]:
    """J(theta +- h/2 e_i) - J(theta) and the realized half steps."""
    tensor = component.tensor
    view = tensors.flat_param(tensor)
    shape = tensors.params[tensor].shape
    chosen = np.array([np.ravel_multi_index(tuple(component.index), shape) if shape else 0])
    old = view[chosen].astype(np.float64)
    half = float(comparison.steps[i]) / 4
    ups = (old + half).astype(view.dtype)
    downs = (old - half).astype(view.dtype)
    plus, minus = _differences(
        objective, tensors, tensor, chosen, ups, downs, loss0, separable, generic, None, "h/2"
    )
    up, down, centre = float(ups[0]), float(downs[0]), float(old[0])
    return up - centre, centre - down, float(plus[0]), float(minus[0])


def _split_terms(
    terms: Sequence[RegularizationTerm],
) -> tuple[list[RegularizationTerm], list[RegularizationTerm]]:
    """Terms whose per-component change is exact in O(1), and the rest."""
    separable = [t for t in terms if t.component_change("", 0.0, 0.0) is not None]
    generic = [t for t in terms if t not in separable]
    return separable, generic


def _sample_plan(
    tensors: NamedTensors, sample: int | float | None, seed: int
) -> dict[str, npt.NDArray[np.intp]]:
    """Which flat indices of each tensor to check, sorted."""
    sizes = {name: tensors.params[name].size for name in tensors.names}
    total = tensors.size
    if sample is None:
        return {name: np.arange(size) for name, size in sizes.items()}
    if isinstance(sample, bool) or not isinstance(sample, int | float):
        raise OptionError(
            f"sample: expected None, an int k >= 1, a float in (0, 1], 'auto' or "
            f"'directional', received {sample!r}"
        )
    if isinstance(sample, float):
        if not 0.0 < sample <= 1.0:
            raise OptionError(f"sample: expected a fraction in (0, 1], received {sample!r}")
        count = max(1, round(sample * total))
    else:
        if not 1 <= sample <= total:
            raise OptionError(
                f"sample: expected an int between 1 and the {total} components of theta, "
                f"received {sample!r}"
            )
        count = sample
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

    When ``count`` is below the number of tensors every tensor still gets one.
    """
    allocation = {name: 1 for name in sizes}
    spare = {name: size - 1 for name, size in sizes.items()}
    remaining = count - len(sizes)
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


def _is_directional(sample: Sample) -> bool:
    if isinstance(sample, str):
        if sample not in ("auto", "directional"):
            raise OptionError(
                f"sample: expected None, an int, a float in (0, 1], 'auto' or 'directional', "
                f"received {sample!r}"
            )
        return True
    return False


def _localization_plan(
    objective: _Objective,
    tensors: NamedTensors,
    failing: list[str],
    base_step: float,
    seed: int,
    budget: int = AUTO_LOCALIZE_EVALUATIONS,
) -> tuple[dict[str, npt.NDArray[np.intp]], list[str]]:
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
            direction = _random_block(np.random.default_rng([seed, 3, position]), (view.size,))
            direction /= float(np.linalg.norm(direction))
            step = base_step * max(1.0, _largest_magnitude(view))
            entries.add(bisect(view, gradients[name], direction, step, objective.value, name))
        plan[name] = np.array(sorted(entries), dtype=np.intp)
    skipped = [name for name in failing if name not in chosen]
    return plan, skipped


def _localization_cost(size: int) -> int:
    """Evaluations `_localization_plan` spends on a tensor: bisection + 2 entries checked."""
    return (bisection_cost(size) if size > 1 else 0) + 2 * min(size, 2)


def _validate_options(eps: float | None, top_k: int, warn: float, threshold: float) -> None:
    if eps is not None and (
        isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < math.inf
    ):
        raise OptionError(f"eps: expected None or a finite float > 0, received {eps!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise OptionError(f"top_k: expected an int >= 0, received {top_k!r}")
    for name, value in (("warn", warn), ("threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise OptionError(f"{name}: expected a float > 0, received {value!r}")
    if warn > threshold:
        raise OptionError(
            f"warn: expected warn <= threshold ({threshold!r}), received warn={warn!r}"
        )


def _validate_terms(
    regularization: Iterable[RegularizationTerm], tensors: NamedTensors
) -> list[RegularizationTerm]:
    if isinstance(regularization, RegularizationTerm):
        regularization = [regularization]
    terms = list(regularization)
    for term in terms:
        if not isinstance(term, RegularizationTerm):
            raise OptionError(
                "regularization: expected terms such as gradwatch.L2(...) or "
                f"gradwatch.Penalty(fn), received {type(term).__name__}"
            )
        validate = getattr(term, "validate", None)
        if validate is not None:
            validate(tensors.params)
    return terms


def _coarsest_dtype(tensors: NamedTensors) -> np.dtype[np.floating]:
    return max((tensors.params[n].dtype for n in tensors.names), key=lambda d: np.finfo(d).eps)


def _ratio(numeric: F64, analytic: F64, floor: float = 0.0) -> float:
    difference = float(np.linalg.norm(numeric - analytic))
    denominator = max(float(np.linalg.norm(numeric) + np.linalg.norm(analytic)), floor)
    return difference / denominator if denominator > 0 else 0.0


def _verdict(
    status: Status,
    ratio: float,
    per_tensor: Mapping[str, TensorResult],
    warn: float,
    threshold: float,
    below: tuple[float, float] | None = None,
) -> tuple[str, Rule, float | None]:
    """Which rule set ``status``, with that rule's own number: (sentence, rule, number).

    The global rule judges ``ratio`` over every checked component; the per-tensor rule
    judges each tensor's own ratio, its denominator floored at ``NEAR_ZERO_FLOOR`` of
    the whole gradient's scale (DESIGN.md section 8). The status is the worse of the two.
    Both denominators are floored at J's resolution (``NOISE_UNITS``).
    """
    resolved = (
        ""
        if below is None
        else f" (gradient {below[0]:.3g} below resolution {below[1]:.3g}, judged against it)"
    )
    if status == "nondeterministic":
        return (
            "nondeterministic: J(theta) evaluated twice differs; no verdict, no alert",
            "none",
            None,
        )
    limit = {"fail": ("threshold", threshold), "warn": ("warn", warn)}
    if status not in limit:
        return (
            f"ok: global ratio {ratio:.3g}{resolved} and every tensor's ratio below warn {warn:g}",
            "none",
            None,
        )
    name, value = limit[status]
    if _status(ratio, warn, threshold) == status:
        return (
            f"{status} by the global rule: ratio {ratio:.3g} >= {name} {value:g}{resolved}",
            "global",
            ratio,
        )
    flagged = sorted(
        ((t, r.ratio) for t, r in per_tensor.items() if r.status == status), key=lambda x: -x[1]
    )
    listed = ", ".join(f"{t} (ratio {r:.3g})" for t, r in flagged[:3])
    more = f" and {len(flagged) - 3} more" if len(flagged) > 3 else ""
    sentence = (
        f"{status} by the per-tensor rule: {listed}{more} >= {name} {value:g}; the global "
        f"ratio {ratio:.3g} is below it (a tensor is judged on its own, its denominator "
        f"floored at {NEAR_ZERO_FLOOR:g} of the whole gradient's scale)"
    )
    return sentence, "per-tensor", flagged[0][1]


def _status(ratio: float, warn: float, threshold: float) -> Status:
    if ratio >= threshold:
        return "fail"
    if ratio >= warn:
        return "warn"
    return "ok"
