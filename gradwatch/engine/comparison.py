"""Numeric against analytic: the ratio of the lecture, per tensor and worst components.

A `Comparison` holds the numeric and analytic derivatives of the checked components
(or of the per-tensor directions) in theta order and judges them: the global ratio,
each tensor's ratio with its denominator floored (docs/design.md#near-zero), the worst
components.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from gradwatch.params import NamedTensors, component_name
from gradwatch.result import Component, Status, TensorResult

__all__ = ["NEAR_ZERO_FLOOR", "NOISE_UNITS", "Comparison", "norm_ratio", "status_for"]

F64 = npt.NDArray[np.float64]

NEAR_ZERO_FLOOR = 1e-3
"""Per-tensor denominators are floored at this fraction of the whole gradient's scale,
so a tensor whose true gradient is about 0 is not judged on noise over noise."""


NOISE_UNITS = 4.0
"""A derivative along a direction is resolved only to about eps_J |J| / h (the roundoff
of J over the step). Directional denominators are floored at NOISE_UNITS times that over
``warn``, so an error within a few roundoff units stays below ``warn`` whatever the dtype
(float64: a floor near 1e-5 |J|; float32: near 1e-1 |J|, where a per-tensor direction
cannot resolve more)."""


@dataclass
class Comparison:
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

    def __post_init__(self) -> None:
        self.included = np.ones(len(self.numeric), dtype=bool)

    @property
    def checked(self) -> int:
        return len(self.numeric)

    def exclude(self, positions: list[int]) -> None:
        self.included[positions] = False

    def ratio(self) -> float:
        keep = self.included
        return norm_ratio(self.numeric[keep], self.analytic[keep], self.floor(keep))

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
                status=status_for(ratio, warn, threshold),
                below_resolution=bool(keep.any()) and scale < resolution,
            )
        return results

    def _floor_weight(self, tensors: NamedTensors, name: str) -> float:
        # A directional value is one projection of the tensor's gradient: compare
        # it with the projection of the whole gradient onto one random direction.
        if self.mode == "directional":
            return 1.0 / math.sqrt(max(tensors.params[name].size, 1))  # an empty tensor: 0 = 0
        return 1.0

    def worst_components(
        self, tensors: NamedTensors, top_k: int
    ) -> tuple[list[Component], list[int]]:
        """Up to ``top_k`` components by |numeric - analytic|, and their positions here."""
        shapes = {name: tensors.params[name].shape for name in self.tensor_names}
        errors = np.abs(self.numeric - self.analytic)
        count = min(top_k, len(errors))
        if count == 0:
            return [], []
        order = np.argpartition(-errors, count - 1)[:count]
        order = order[np.argsort(-errors[order], kind="stable")]
        worst = []
        positions: list[int] = order.tolist()
        for i in positions:
            tensor = self.tensor_names[self.owner[i]]
            if self.mode == "directional":
                index: tuple[int, ...] = ()
                name = f"{tensor} (direction)"
            else:
                shape = shapes[tensor]
                index = tuple(int(k) for k in np.unravel_index(self.flat_index[i], shape))
                name = component_name(tensor, index)
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
        return worst, positions


def norm_ratio(numeric: F64, analytic: F64, floor: float = 0.0) -> float:
    """The lecture's ||numeric - analytic|| / (||numeric|| + ||analytic||), the denominator
    floored at ``floor``; 0 when both are 0."""
    difference = float(np.linalg.norm(numeric - analytic))
    denominator = max(float(np.linalg.norm(numeric) + np.linalg.norm(analytic)), floor)
    return difference / denominator if denominator > 0 else 0.0


def status_for(ratio: float, warn: float, threshold: float) -> Status:
    """The status of one ratio against the two tiers; a NaN ratio fails (it is never "ok")."""
    if not ratio < threshold:
        return "fail"
    if ratio >= warn:
        return "warn"
    return "ok"
