"""Named tensors <-> the flat theta of the lecture, and readable component names.

theta is the concatenation of the tensors in mapping order, each flattened
row-major. Nothing here copies a tensor: the check perturbs the caller's arrays
in place through flat views.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from gradwatch.errors import NonFiniteParameterError, ParameterError

__all__ = ["GradientSource", "NamedTensors", "component_name", "named_tensors"]

FloatArray = npt.NDArray[np.floating]
SINGLE_ARRAY_NAME = "theta"
Consume = Callable[[str, FloatArray], None]


@runtime_checkable
class GradientSource(Protocol):
    """An analytic gradient computed when the check asks for it instead of held whole.

    ``visit(names, consume)`` calls ``consume(name, gradient)`` once for each name,
    at the unperturbed parameters; the array is only valid during the call (the
    check copies what it needs: norms, projections, a few components). The torch
    integration runs one backward pass per visit and drops each tensor's gradient
    as soon as it is consumed, so no float64 copy of the whole gradient is held.
    """

    def visit(self, names: Sequence[str], consume: Consume) -> None: ...


class _HeldGradients:
    """Gradients given as arrays: a visit is a loop over them."""

    def __init__(self, grads: dict[str, FloatArray]) -> None:
        self.grads = grads

    def visit(self, names: Sequence[str], consume: Consume) -> None:
        for name in names:
            consume(name, self.grads[name])


@dataclass(frozen=True)
class NamedTensors:
    """Validated parameters and their gradient, in theta order."""

    names: tuple[str, ...]
    params: dict[str, FloatArray]
    gradient: GradientSource
    size: int
    """Components of theta (of every tensor together)."""

    def flat_param(self, name: str) -> FloatArray:
        """A writable 1-D view of a tensor (a copy would break in-place perturbation)."""
        array = self.params[name]
        view = array.reshape(-1)
        if not np.shares_memory(view, array) and array.size > 0:
            raise ParameterError(  # pragma: no cover - guarded by validation
                f"params[{name!r}]: expected an array that can be viewed flat, "
                "received a non-contiguous one"
            )
        return view

    def visit_grads(self, names: Sequence[str], consume: Consume) -> None:
        """``consume(name, gradient)`` for each of ``names``, in that order, validated.

        Arrays given to `check` were validated up front; a `GradientSource` is
        validated as it delivers (shape, dtype, finite values, every name once).
        """
        if isinstance(self.gradient, _HeldGradients):
            self.gradient.visit(names, consume)
            return
        wanted = set(names)
        delivered: dict[str, None] = {}

        def checked(name: str, gradient: FloatArray) -> None:
            if name not in wanted or name in delivered:
                raise ParameterError(
                    f"grads: expected one gradient for each of {list(names)}, "
                    f"received {name!r} {'again' if name in delivered else 'unasked'}"
                )
            delivered[name] = None
            consume(name, _check_grad(name, gradient, self.params[name].shape))

        self.gradient.visit(names, checked)
        missing = [name for name in names if name not in delivered]
        if missing:
            raise ParameterError(
                f"grads: expected a gradient for each of {list(names)}, received none for {missing}"
            )


def component_name(tensor: str, index: tuple[int, ...]) -> str:
    """Readable name of one component.

    >>> component_name("W2", (0, 3))
    'W2[0, 3]'
    >>> component_name("b", ())
    'b'
    """
    if not index:
        return tensor
    return f"{tensor}[{', '.join(str(i) for i in index)}]"


def named_tensors(params: object, grads: object) -> NamedTensors:
    """Validate ``params`` and ``grads`` (arrays, or a `GradientSource`) and pair them by name.

    Raises:
        ParameterError: keys, shapes or dtypes do not match, an array is read-only,
            integer, non-contiguous, or holds NaN/inf.
    """
    param_map = _as_mapping(params, "params")
    source = isinstance(grads, GradientSource) and not isinstance(grads, Mapping | np.ndarray)
    grad_map = {} if source else _as_mapping(grads, "grads")
    if not source and list(param_map) != list(grad_map):
        missing = [k for k in param_map if k not in grad_map]
        extra = [k for k in grad_map if k not in param_map]
        if missing or extra:
            raise ParameterError(
                f"grads: expected the same keys as params {list(param_map)}, "
                f"received {list(grad_map)} (missing {missing}, unexpected {extra})"
            )

    checked_params = {name: _check_param(name, param) for name, param in param_map.items()}
    _refuse_one_array_under_two_names(checked_params)
    size = sum(param.size for param in checked_params.values())
    if size == 0:
        raise ParameterError("params: expected at least one component to check, received none")
    gradient = (
        grads
        if source
        else _HeldGradients(
            {name: _check_grad(name, grad_map[name], p.shape) for name, p in checked_params.items()}
        )
    )
    assert isinstance(gradient, GradientSource)
    return NamedTensors(
        names=tuple(checked_params),
        params=checked_params,
        gradient=gradient,
        size=size,
    )


def _refuse_one_array_under_two_names(params: Mapping[str, npt.NDArray[np.floating]]) -> None:
    """Perturbing a component of one name would move the other too: J's difference would
    count it twice and a correct gradient would fail. Tied weights are given once."""
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, array in params.items():
        if array.size == 0:
            continue
        key = (array.__array_interface__["data"][0], array.shape, array.strides)
        if key in seen:
            raise ParameterError(
                f"params[{name!r}]: expected an array of its own, received the same array as "
                f"params[{seen[key]!r}] (give a tied tensor once, under one name)"
            )
        seen[key] = name


def _as_mapping(value: object, argument: str) -> dict[str, object]:
    if isinstance(value, np.ndarray):
        return {SINGLE_ARRAY_NAME: value}
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ParameterError(
                    f"{argument}: expected string keys, received {type(key).__name__} {key!r}"
                )
        return dict(value)
    expected = "a Mapping[str, np.ndarray] or one np.ndarray"
    if argument == "grads":
        expected += " (or a gradwatch.params.GradientSource)"
    raise ParameterError(f"{argument}: expected {expected}, received {type(value).__name__}")


def _check_param(name: str, value: object) -> FloatArray:
    where = f"params[{name!r}]"
    if not isinstance(value, np.ndarray):
        raise ParameterError(
            f"{where}: expected a writable float np.ndarray, received {type(value).__name__}"
        )
    if not np.issubdtype(value.dtype, np.floating):
        raise ParameterError(
            f"{where}: expected a float array, received dtype {value.dtype} "
            "(an integer array cannot be nudged by epsilon)"
        )
    if not value.flags.writeable:
        raise ParameterError(
            f"{where}: expected a writable array (the check perturbs it in place and "
            "restores it), received a read-only one"
        )
    if not value.flags.c_contiguous:
        raise ParameterError(
            f"{where}: expected a C-contiguous array, received a strided view "
            "(pass the array itself, not a slice of it)"
        )
    _require_finite(where, value, "parameter", name)
    return value


def _check_grad(name: str, value: object, shape: tuple[int, ...]) -> FloatArray:
    where = f"grads[{name!r}]"
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
        received = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise ParameterError(f"{where}: expected a float np.ndarray, received {received}")
    if value.shape != shape:
        raise ParameterError(
            f"{where}: expected shape {shape} (the shape of params[{name!r}]), "
            f"received {value.shape}"
        )
    _require_finite(where, value, "gradient", name)
    return value


def _require_finite(where: str, value: FloatArray, quantity: str, name: str) -> None:
    finite = np.isfinite(value)
    if not finite.all():
        bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        count = int((~finite).sum())
        raise NonFiniteParameterError(
            f"{where}: expected finite values, received {value[bad]} at index "
            f"{list(bad)} ({count} non-finite of {value.size})",
            quantity=quantity,
            tensor=name,
            detail=f"{count} of {value.size} entries, first {list(bad)}: {value[bad]}",
            size=value.size,
        )
