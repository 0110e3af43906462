"""Component-wise central differences: perturb in place, evaluate J, restore.

For each planned component i, ``J(theta + h e_i) - J(theta)`` and
``J(theta - h e_i) - J(theta)``, from a loss evaluated one perturbation at a time
(the caller's array written and restored bit for bit, also when J raises) or in
batches (`BatchedObjective`). Separable penalties (L2) add their exact change in O(1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gradwatch.engine.comparison import NOISE_UNITS, Comparison
from gradwatch.engine.objective import BatchedObjective, Evaluator, split_terms
from gradwatch.errors import LossError
from gradwatch.params import NamedTensors
from gradwatch.regularization import RegularizationTerm

__all__ = ["ROUNDING_STEP_ULPS", "Moves", "central_differences", "componentwise"]

F64 = npt.NDArray[np.float64]
Plan = dict[str, npt.NDArray[np.intp]]

ROUNDING_STEP_ULPS = 16.0
"""J's changes are called coarser than its dtype only when the smallest is above this many
units of eps_J |J|: any two floats near J differ by a whole number of ulps anyway."""


def componentwise(
    objective: Evaluator,
    tensors: NamedTensors,
    plan: Plan,
    loss0: float,
    base_step: float,
    step_given: bool,
    warn: float,
) -> Comparison:
    """Central differences of every planned component against its analytic value.

    The step is ``base_step`` times max(1, |theta_i|), divided by as realized in the
    dtype, or ``base_step`` as given (``step_given``: the lecture's 2 eps).
    """
    raw_changes: list[F64] = []
    plus_changes: list[F64] = []
    minus_changes: list[F64] = []
    steps: list[F64] = []
    analytic_parts: list[F64] = []
    analytic_values = _gradient_components(tensors, plan)
    for tensor in tensors.names:
        chosen = plan[tensor]
        view = tensors.flat_param(tensor)
        olds = view[chosen].astype(np.float64)
        h = np.full(olds.shape, base_step) if step_given else base_step * np.maximum(1, abs(olds))
        ups = (olds + h).astype(view.dtype)
        downs = (olds - h).astype(view.dtype)
        moves = Moves(tensor, chosen, ups, downs)
        plus, minus = central_differences(objective, tensors, moves, loss0, raw=raw_changes)
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
    return Comparison(
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


def _rounding_step(changes: F64, loss0: float, objective: Evaluator) -> float | None:
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


def _gradient_components(tensors: NamedTensors, plan: Plan) -> dict[str, F64]:
    """The analytic values of the planned components, from one visit of the gradient."""
    values = {name: np.zeros(0) for name in tensors.names}

    def take(name: str, gradient: npt.NDArray[np.floating]) -> None:
        values[name] = gradient.reshape(-1)[plan[name]].astype(np.float64)

    tensors.visit_grads([name for name in tensors.names if plan[name].size], take)
    return values


@dataclass(frozen=True)
class Moves:
    """The values chosen components of one tensor take on either side of theta."""

    tensor: str
    chosen: npt.NDArray[np.intp]
    """Flat indices into the tensor."""
    ups: npt.NDArray[np.floating]
    """theta_j + h for each chosen j, in the tensor's dtype."""
    downs: npt.NDArray[np.floating]
    step_name: str = "h"
    """How the step is named in errors ("h", "h/2")."""


def central_differences(
    objective: Evaluator,
    tensors: NamedTensors,
    moves: Moves,
    loss0: float,
    *,
    batch: bool = True,
    raw: list[F64] | None = None,
) -> tuple[F64, F64]:
    """J(theta with component j at ups / downs) - J(theta) for each chosen j, penalties included.

    Evaluated in batches when the loss is a `BatchedObjective` and ``batch`` (a batched
    loss sees only the parameters: a generic penalty sends every move one by one).
    ``raw``, when given, receives the changes of the loss alone (no penalty), for
    `_rounding_step`.
    """
    separable, generic = split_terms(objective.terms)
    batched = objective.batched if batch and not generic else None
    if batched is not None and moves.chosen.size:
        plus, minus = _evaluate_in_batch(batched, objective, moves, loss0)
    else:
        plus, minus = _evaluate_one_by_one(objective, tensors, moves, loss0, generic)
    if raw is not None and not generic:
        raw.extend((plus.copy(), minus.copy()))
    olds = tensors.flat_param(moves.tensor)[moves.chosen].astype(np.float64)
    for term in separable:
        plus += _term_changes(term, moves.tensor, olds, moves.ups.astype(np.float64))
        minus += _term_changes(term, moves.tensor, olds, moves.downs.astype(np.float64))
    return plus, minus


def _evaluate_one_by_one(
    objective: Evaluator,
    tensors: NamedTensors,
    moves: Moves,
    loss0: float,
    generic: list[RegularizationTerm],
) -> tuple[F64, F64]:
    """J(theta +- h e_j) - J(theta) for each chosen j, perturbing in place and restoring.

    The hot loop of a full check: per component two writes, two loss calls and
    one restore, nothing that grows with n.
    """
    tensor, ups, downs, step_name = moves.tensor, moves.ups, moves.downs, moves.step_name
    view = tensors.flat_param(tensor)
    plus = np.empty(moves.chosen.size)
    minus = np.empty(moves.chosen.size)
    generic0 = sum(term.value(tensors.params) for term in generic)
    for k, j in enumerate(moves.chosen.tolist()):
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
    batched: BatchedObjective, objective: Evaluator, moves: Moves, loss0: float
) -> tuple[F64, F64]:
    """The same differences from one call of the loss's ``evaluate_batch``."""
    tensor, chosen = moves.tensor, moves.chosen
    indices = np.concatenate([chosen, chosen])
    raw = batched.evaluate_batch(tensor, indices, np.concatenate([moves.ups, moves.downs]))
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
