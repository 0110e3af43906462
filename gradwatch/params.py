"""Named tensors <-> the flat theta of the lecture, and readable component names.

theta is the concatenation of the tensors in mapping order, each flattened
row-major. Nothing here copies a tensor: the check perturbs the caller's arrays
in place through flat views.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gradwatch.errors import ParameterError

__all__ = ["NamedTensors", "component_name", "named_tensors"]

FloatArray = npt.NDArray[np.floating]
SINGLE_ARRAY_NAME = "theta"


@dataclass(frozen=True)
class NamedTensors:
    """Validated parameters and gradients, with offsets into theta."""

    names: tuple[str, ...]
    params: dict[str, FloatArray]
    grads: dict[str, FloatArray]
    offsets: tuple[int, ...]
    """offsets[t] is where tensor t starts in theta; offsets[-1] is the size of theta."""

    @property
    def size(self) -> int:
        return self.offsets[-1]

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

    def flat_grad(self) -> npt.NDArray[np.float64]:
        """dtheta as one float64 vector (a single copy, made once per check)."""
        if not self.names:
            return np.zeros(0)
        return np.concatenate([self.grads[n].astype(np.float64).reshape(-1) for n in self.names])

    def locate(self, flat_index: int) -> tuple[str, tuple[int, ...]]:
        """The tensor and multi-index of a component of theta."""
        tensor = int(np.searchsorted(self.offsets, flat_index, side="right")) - 1
        name = self.names[tensor]
        local = flat_index - self.offsets[tensor]
        shape = self.params[name].shape
        index = tuple(int(i) for i in np.unravel_index(local, shape)) if shape else ()
        return name, index


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
    """Validate ``params`` and ``grads`` and pair them by name.

    Raises:
        ParameterError: keys, shapes or dtypes do not match, an array is read-only,
            integer, non-contiguous, or holds NaN/inf.
    """
    param_map = _as_mapping(params, "params")
    grad_map = _as_mapping(grads, "grads")
    if list(param_map) != list(grad_map):
        missing = [k for k in param_map if k not in grad_map]
        extra = [k for k in grad_map if k not in param_map]
        if missing or extra:
            raise ParameterError(
                f"grads: expected the same keys as params {list(param_map)}, "
                f"received {list(grad_map)} (missing {missing}, unexpected {extra})"
            )
        grad_map = {k: grad_map[k] for k in param_map}

    checked_params: dict[str, FloatArray] = {}
    checked_grads: dict[str, FloatArray] = {}
    offsets = [0]
    for name, param in param_map.items():
        checked_params[name] = _check_param(name, param)
        checked_grads[name] = _check_grad(name, grad_map[name], checked_params[name].shape)
        offsets.append(offsets[-1] + checked_params[name].size)
    if offsets[-1] == 0:
        raise ParameterError("params: expected at least one component to check, received none")
    return NamedTensors(
        names=tuple(checked_params),
        params=checked_params,
        grads=checked_grads,
        offsets=tuple(offsets),
    )


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
    raise ParameterError(
        f"{argument}: expected a Mapping[str, np.ndarray] or one np.ndarray, "
        f"received {type(value).__name__}"
    )


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
    _require_finite(where, value)
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
    _require_finite(where, value)
    return value


def _require_finite(where: str, value: FloatArray) -> None:
    finite = np.isfinite(value)
    if not finite.all():
        bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ParameterError(
            f"{where}: expected finite values, received {value[bad]} at index "
            f"{list(bad)} ({int((~finite).sum())} non-finite of {value.size})"
        )
