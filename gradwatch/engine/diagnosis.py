"""Labels for the worst components: re-evaluate with half the step and read the pattern."""

from __future__ import annotations

import numpy as np

from gradwatch.engine.comparison import Comparison
from gradwatch.engine.differences import Moves, central_differences
from gradwatch.engine.objective import Evaluator, split_terms
from gradwatch.params import NamedTensors
from gradwatch.result import Component, Diagnosis

__all__ = ["label_worst"]


def label_worst(
    worst: list[Component],
    positions: list[int],
    comparison: Comparison,
    objective: Evaluator,
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
    _, generic = split_terms(objective.terms)
    generic0 = sum(term.value(tensors.params) for term in generic)
    j_scale = max(abs(loss0 + generic0) * objective.roundoff, comparison.rounding_step or 0.0)
    j_scale = max(j_scale, 1e-300)
    for component, i in zip(worst, positions, strict=True):
        if nondeterministic:
            component.diagnosis = "nondeterministic"
            continue
        h_plus, h_minus, plus_half, minus_half = _half_step(
            objective, tensors, comparison, i, component, loss0
        )
        if h_plus + h_minus == 0:  # h/2 rounds to theta in its dtype: nothing to read
            component.diagnosis = "roundoff"
            continue
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
    objective: Evaluator,
    tensors: NamedTensors,
    comparison: Comparison,
    i: int,
    component: Component,
    loss0: float,
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
    moves = Moves(tensor, chosen, ups, downs, "h/2")
    plus, minus = central_differences(objective, tensors, moves, loss0, batch=False)
    up, down, centre = float(ups[0]), float(downs[0]), float(old[0])
    return up - centre, centre - down, float(plus[0]), float(minus[0])
