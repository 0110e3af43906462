"""Random directions: the joint screen of ``sample="auto"`` and one direction per tensor.

What the screen guarantees above ``AUTO_FULL_MAX_SIZE`` (issue 12). Each tensor's block
of a screening direction has random signs, magnitudes uniform in [0.5, 1.5) and a random
gain uniform in [0.5, 1.5), scaled so every tensor adds about as much to g . v. The
error of any one tensor then adds to each direction's error a term with a bounded
density (0-d tensors included): errors in several tensors, equal or not, of any signs,
never cancel structurally (before, the blocks of two scalars were exactly +-1 and equal
errors cancelled with probability 1/2 per direction). An error of relative size r in
one tensor t, ||e_t|| = r max(||g_t||, NEAR_ZERO_FLOOR ||g||), passes one direction
unseen with probability about p = 1.6 sqrt(T) warn / r (T tensors), and all k of them
with p^k; `gradwatch.check.screen_directions` picks k so that p^k <= 1e-3 at r = 1e-2
and warn = 1e-5 (k = 2 up to 390 tensors: p^2 = 2.6e-6 T). A screen that fires is
confirmed tensor by tensor (a second direction per tensor when the first confirms
nothing). Measured by ``benchmarks.screen_miss_rate`` over random layouts of 2-40
tensors (0-d to 5,000 entries): no miss in 3,000 trials for each of an error scaling
one tensor, in one entry, spread at random, scaling two tensors with the same sign, and
issue 12's two scalars next to a 2,500-entry tensor (BENCHMARKS.md). Below the floor, a
tensor's error is judged against the whole gradient (docs/design.md#near-zero).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from gradwatch.engine.comparison import NEAR_ZERO_FLOOR, NOISE_UNITS, Comparison, norm_ratio
from gradwatch.engine.objective import Evaluator
from gradwatch.engine.uninterrupted import restoring
from gradwatch.params import NamedTensors

__all__ = [
    "BLOCK_CACHE_ENTRIES",
    "largest_magnitude",
    "per_tensor_directions",
    "random_block",
    "screen",
]

F64 = npt.NDArray[np.float64]

BLOCK_CACHE_ENTRIES = 2**20
"""Entries of random blocks a direction keeps between uses (8 MiB of float64)."""


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
        block = random_block(np.random.default_rng([*self.seed, self._position[name]]), (size,))
        block /= max(float(np.linalg.norm(block)), 1e-300)
        if self._kept_entries + size <= BLOCK_CACHE_ENTRIES:
            self._units[name] = block
            self._kept_entries += size
        return block

    def block(self, name: str, shape: tuple[int, ...]) -> F64:
        """This direction's block in tensor ``name``: a fresh array the caller may modify."""
        block = self.unit_block(name, math.prod(shape)) * self.share(name)
        return block.reshape(shape)


def per_tensor_directions(
    objective: Evaluator,
    tensors: NamedTensors,
    base_step: float,
    seed: int,
    loss_over_warn: float,
    stream: int = 1,
) -> Comparison:
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
    return Comparison(
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


def screen(
    objective: Evaluator,
    tensors: NamedTensors,
    base_step: float,
    seed: int,
    loss_over_warn: float,
    count: int,
    stream: int = 2,
) -> tuple[float, tuple[float, float] | None]:
    """The ratio along ``count`` random directions that move every tensor at once, and
    (gradient scale, resolution) when the gradient is below resolution.

    ``stream`` picks the random directions (with ``seed``): a second screen along another
    stream draws directions independent of the first's.

    Each tensor's block of the direction is scaled by sqrt(size) / ||g_t|| (floored at
    NEAR_ZERO_FLOOR * ||g||), so every tensor adds about the same to g . v and a
    relative error in any one of them shows, at 2 evaluations per direction. The
    denominator is floored at the roundoff resolution (NOISE_UNITS).
    """
    names = tensors.names
    directions = [
        _Direction(dict.fromkeys(names, 1.0), [seed, stream, draw], "all tensors +- h v")
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
    split = objective.split
    sizes = {name: tensors.params[name].size for name in names}
    if split is not None:  # each process measured its part: the whole gradient's numbers
        squares = split.total(np.array([norms[name] ** 2 for name in names]))
        norms = dict(zip(names, np.sqrt(squares).tolist(), strict=True))
        sizes = split.full_sizes()
        if one_pass:
            summed = split.total(np.array([projections[name] for name in names]))
            projections = dict(zip(names, summed.tolist(), strict=True))
    floor = NEAR_ZERO_FLOOR * math.sqrt(sum(n * n for n in norms.values()))
    for direction in directions:
        direction.reweight(
            {name: math.sqrt(sizes[name]) / max(norms[name], floor, 1e-300) for name in names}
        )
    if one_pass:
        steps = _direction_steps(objective, tensors.params, directions, base_step)
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
    return norm_ratio(numeric, analytic, floor=resolution), below


def _direction_steps(
    objective: Evaluator,
    params: dict[str, npt.NDArray[np.floating]],
    directions: list[_Direction],
    base_step: float,
) -> F64:
    """The step h along each direction: ``base_step`` times the largest |theta| it moves (>= 1)."""
    steps = []
    for direction in directions:
        largest = max([1.0, *(largest_magnitude(params[n]) for n in direction.weights)])
        if objective.split is not None:
            largest = objective.split.largest(largest)
        steps.append(base_step * largest)
    return np.array(steps)


def _along_directions(
    objective: Evaluator,
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
    steps = _direction_steps(objective, params, directions, base_step)
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
    if objective.split is not None:
        analytic = objective.split.total(analytic)

    numeric = np.array(
        [
            _numeric_along(objective, params, direction, float(h))
            for direction, h in zip(directions, steps, strict=True)
        ]
    )
    return numeric, analytic / (2 * steps), steps


def _numeric_along(
    objective: Evaluator,
    params: dict[str, npt.NDArray[np.floating]],
    direction: _Direction,
    h: float,
) -> float:
    """(J(theta + h v) - J(theta - h v)) / 2h, every moved tensor put back exactly after."""
    restore = objective.restoring
    backup = (
        {}
        if restore is not None
        else {name: _exact_backup(params[name]) for name in direction.weights}
    )

    def put_back() -> None:
        for name in direction.weights:
            if restore is not None:
                restore.restore_tensor(name)
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

    # put_back on exit, and before any interrupt goes on: no signal leaves theta +- h v.
    with restoring(put_back) as region:
        move(+1.0)
        plus = region.run(objective.value, f"{direction.where} (+)")
        put_back()
        move(-1.0)
        minus = region.run(objective.value, f"{direction.where} (-)")
    return (plus - minus) / (2 * h)


def _exact_backup(array: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    """A copy for a bit-exact restore: float32 when it holds every value exactly."""
    if array.dtype == np.float64:
        narrow = array.astype(np.float32)
        if np.array_equal(narrow, array):
            return narrow
    return array.copy()


def random_block(rng: np.random.Generator, shape: tuple[int, ...]) -> F64:
    """Random signs times magnitudes uniform in [0.5, 1.5).

    Unlike a Gaussian, no entry is near zero, so an error confined to one entry always
    shows in g . v; unlike pure signs, equal errors in several entries cannot cancel.
    """
    size = math.prod(shape)  # drawn flat: a 0-d tensor still gets an array, not a scalar
    negative = rng.integers(0, 2, size=size, dtype=np.int8).astype(bool)
    block = rng.uniform(0.5, 1.5, size=size)
    return np.negative(block, out=block, where=negative).reshape(shape)


def largest_magnitude(array: npt.NDArray[np.floating]) -> float:
    """max |array| without a temporary the size of the array."""
    if array.size == 0:
        return 0.0
    return max(abs(float(array.max())), abs(float(array.min())))
