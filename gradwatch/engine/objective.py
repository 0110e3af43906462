"""What the engine needs from a loss, and J as the engine evaluates it.

The seam between the core and whoever supplies J (a user's closure, the torch
integration's shadow) is a set of typed protocols, found by structural typing
(``isinstance`` on runtime-checkable protocols), never by ``getattr`` probes:

- `Objective`: ``loss()`` returns J at the current theta (every loss is one);
- `BatchedObjective`: also ``evaluate_batch(tensor, flat_indices, values)``, many
  one-component perturbations of a tensor per call (torch vmap);
- `RestoringObjective`: also ``restore_tensor(tensor)``, writing a moved tensor's
  unperturbed values back exactly (spares the check a backup of it);
- `SplitObjective`: theta split across processes that each run the same check on their
  own part at once (FSDP2 shards), J common to all; ``total`` and ``largest`` reduce over
  the processes, so the joint screen moves every part along one direction.

`Evaluator` wraps one for a check: J = loss() + regularization, counted, validated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from gradwatch.errors import LossError, NonFiniteLossError
from gradwatch.params import NamedTensors
from gradwatch.regularization import RegularizationTerm

__all__ = [
    "THETA",
    "BatchedObjective",
    "Evaluator",
    "Objective",
    "RestoringObjective",
    "SplitObjective",
    "coarsest_dtype",
    "split_terms",
]


@runtime_checkable
class Objective(Protocol):
    """J at the current (possibly perturbed) values of the parameters: a float or 0-d array."""

    def __call__(self) -> object: ...


@runtime_checkable
class BatchedObjective(Objective, Protocol):
    """An objective that evaluates many one-component perturbations of a tensor per call."""

    def evaluate_batch(
        self, tensor: str, flat_indices: npt.NDArray[np.intp], values: npt.NDArray[np.floating]
    ) -> npt.ArrayLike:
        """J at theta with only ``params[tensor].flat[flat_indices[k]]`` set to ``values[k]``,
        for every k (one value per k)."""
        ...


@runtime_checkable
class RestoringObjective(Objective, Protocol):
    """An objective that can put a moved tensor back exactly (the torch shadow copies it
    from the model), so a random direction needs no backup of the tensors it moves."""

    def restore_tensor(self, tensor: str) -> None: ...


@runtime_checkable
class SplitObjective(Objective, Protocol):
    """J of a theta whose tensors are split across processes, each checking its own part.

    Every process calls the check at once with its part of every tensor (possibly empty)
    and the same options; J is common to all of them. Only the joint screen of
    ``sample="auto"`` runs split (its verdict is then the whole check's, a fired screen
    included): it needs, besides J, sums and maxima over the processes.
    """

    def total(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``values`` summed elementwise over the processes (the same shape on each)."""
        ...

    def largest(self, value: float) -> float:
        """The largest ``value`` over the processes."""
        ...

    def full_sizes(self) -> dict[str, int]:
        """Each tensor's size over every process's part."""
        ...


THETA = "J(theta)"
"""Where the first evaluation of J happens: unperturbed theta, the training's own loss."""


class Evaluator:
    """J = loss() + regularization, evaluated at the current (possibly perturbed) theta.

    ``evaluations`` counts the loss calls (a batch counts each of its perturbations).

    Terms that are sums over components (L2) are not re-evaluated per component:
    their change is added exactly, in O(1), by the component loop.
    """

    def __init__(
        self,
        loss: Objective,
        tensors: NamedTensors,
        terms: Sequence[RegularizationTerm],
    ) -> None:
        if not callable(loss):
            raise LossError(
                f"loss: expected a zero-argument callable returning J, "
                f"received {type(loss).__name__}"
            )
        self._loss = loss
        self.batched = loss if isinstance(loss, BatchedObjective) else None
        self.restoring = loss if isinstance(loss, RestoringObjective) else None
        self.split = loss if isinstance(loss, SplitObjective) else None
        self._params = tensors.params
        self.terms = terms
        self.evaluations = 0
        self.roundoff = float(np.finfo(coarsest_dtype(tensors)).eps)

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


def split_terms(
    terms: Sequence[RegularizationTerm],
) -> tuple[list[RegularizationTerm], list[RegularizationTerm]]:
    """Terms whose per-component change is exact in O(1), and the rest."""
    separable = [t for t in terms if t.component_change("", 0.0, 0.0) is not None]
    generic = [t for t in terms if t not in separable]
    return separable, generic


def coarsest_dtype(tensors: NamedTensors) -> np.dtype[np.floating]:
    return max((tensors.params[n].dtype for n in tensors.names), key=lambda d: np.finfo(d).eps)
