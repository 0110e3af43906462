"""Penalty terms added to J on the numeric side of the check.

They exist for the common case where the backward pass adds a penalty's
gradient while the loss closure returns the data loss only: the numeric
gradient must then see the same penalty, or a correct model fails its check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from gradwatch.errors import OptionError

__all__ = ["L2", "Penalty", "RegularizationTerm", "ValidatedTerm"]

Params = Mapping[str, npt.NDArray[np.floating]]


@runtime_checkable
class RegularizationTerm(Protocol):
    """A term of J evaluated on the parameters."""

    @property
    def name(self) -> str: ...

    def value(self, params: Params) -> float: ...

    def component_change(self, tensor: str, old: float, new: float) -> float | None:
        """The change of ``value`` when one component of ``tensor`` moves from old to new.

        None when the term is not a sum over components; the check then
        re-evaluates ``value`` on the perturbed parameters.
        """
        ...


@runtime_checkable
class ValidatedTerm(RegularizationTerm, Protocol):
    """A term that can say up front whether it fits the parameters (unknown names...)."""

    def validate(self, params: Params) -> None:
        """Raise `gradwatch.OptionError` when the term does not fit ``params``."""
        ...


class L2:
    """``lambd / (2 m) * sum ||W||^2`` over the named tensors (None = every tensor).

    The lecture penalizes weights only: ``L2(0.7, m=3, tensors=["W1", "W2", "W3"])``.

    >>> L2(0.5, m=2).value({"W": np.array([1.0, 2.0])})
    0.625
    """

    def __init__(self, lambd: float, m: int = 1, tensors: Sequence[str] | None = None) -> None:
        if not np.isfinite(lambd) or lambd < 0:
            raise OptionError(f"L2 lambd: expected a finite number >= 0, received {lambd!r}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise OptionError(f"L2 m: expected an integer >= 1, received {m!r}")
        if isinstance(tensors, str):
            raise OptionError(
                f"L2 tensors: expected a list of tensor names, received the string {tensors!r}"
            )
        self.lambd = float(lambd)
        self.m = m
        self.tensors = None if tensors is None else tuple(tensors)
        self._scale = self.lambd / (2 * m)

    @property
    def name(self) -> str:
        which = "all" if self.tensors is None else ",".join(self.tensors)
        return f"L2(lambd={self.lambd:g}, m={self.m}, tensors={which})"

    def _penalized(self, params: Params) -> list[str]:
        if self.tensors is None:
            return list(params)
        unknown = [t for t in self.tensors if t not in params]
        if unknown:
            raise OptionError(
                f"L2 tensors: expected names among {list(params)}, received unknown {unknown}"
            )
        return list(self.tensors)

    def value(self, params: Params) -> float:
        return self._scale * sum(
            float(np.sum(np.square(params[t], dtype=np.float64))) for t in self._penalized(params)
        )

    def component_change(self, tensor: str, old: float, new: float) -> float | None:
        if self.tensors is not None and tensor not in self.tensors:
            return 0.0
        return self._scale * (new - old) * (new + old)

    def validate(self, params: Params) -> None:
        self._penalized(params)


class Penalty:
    """A generic term from a callable ``fn(params) -> float``, re-evaluated on every perturbation.

    >>> Penalty(lambda p: float(abs(p["w"]).sum()), name="L1").value({"w": np.array([-1.0, 2.0])})
    3.0
    """

    def __init__(self, fn: Callable[[Params], float], name: str | None = None) -> None:
        if not callable(fn):
            raise OptionError(
                f"Penalty fn: expected a callable params -> float, received {type(fn).__name__}"
            )
        self.fn = fn
        self._name = name or str(getattr(fn, "__name__", "penalty"))

    @property
    def name(self) -> str:
        return self._name

    def value(self, params: Params) -> float:
        return float(self.fn(params))

    def component_change(self, tensor: str, old: float, new: float) -> float | None:
        return None
