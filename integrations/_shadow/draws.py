"""Random draws on the float64 shadow, made as the training made them.

A check replays the training forward's generator state, but the shadow computes in
float64, and torch's samplers do not draw the same values in every dtype: from one
generator state ``torch.rand(n, dtype=torch.float64)`` and ``torch.rand(n)`` (float32)
give different numbers, as do ``normal_``, ``uniform_``, ``exponential_``... So a
float64 replay of drop path (``torch.rand(shape, dtype=hidden.dtype)``), layerdrop
(``torch.rand([])`` under a float64 default dtype) or router jitter (``uniform_`` on a
float64 tensor) drops other paths, skips other layers, routes to other experts, and
every later draw shifts: the step link then compares the optimizer's gradient with
the gradient of another J.

`Draws` answers each sampling call the shadow makes in the dtype the training made it
in (the model's own dtype; the default dtype for a tensor made without one), on the
same device, and upcasts the result; an in-place sampler on a float64 tensor draws
into a temporary of that dtype and copies. Dropout draws its mask on a tensor of ones
in that dtype and multiplies (the same draws as the training's kernel, which ignores
the values it masks).

Draws it cannot make as the training did are named in `unreplayed`: alpha dropout
(an affine mask), and attention dropout inside a fused kernel off the CPU (flash and
memory-efficient kernels draw in-kernel, with an element order of their own).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

__all__ = ["SAMPLERS", "Draws"]

_SIZED = frozenset({torch.rand, torch.randn, torch.randint, torch.randperm})
"""Made from a size: the dtype is ``dtype=`` or the default (integer for randint/randperm)."""
_INTEGER_BY_DEFAULT = frozenset({torch.randint, torch.randperm})
_LIKE = frozenset({torch.rand_like, torch.randn_like, torch.randint_like})
"""Made like a tensor: the dtype is ``dtype=`` or the tensor's."""
_FROM_TENSORS = frozenset(
    {
        torch.bernoulli,
        torch.Tensor.bernoulli,
        torch.poisson,
        torch.multinomial,
        torch.Tensor.multinomial,
        torch.binomial,
    }
)
"""Drawn from tensor parameters (probabilities, rates): the dtype is theirs."""
_IN_PLACE = frozenset(
    {
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        torch.Tensor.bernoulli_,
        torch.Tensor.exponential_,
        torch.Tensor.random_,
        torch.Tensor.cauchy_,
        torch.Tensor.log_normal_,
        torch.Tensor.geometric_,
    }
)
_DROPOUTS: dict[Callable[..., Any], str] = {
    F.dropout: "training",
    F.dropout1d: "training",
    F.dropout2d: "training",
    F.dropout3d: "training",
    torch.dropout: "train",
    torch.feature_dropout: "train",
}
"""Dropouts whose output is ``input * noise``: the name of their training flag."""
_ALPHA_DROPOUTS: dict[Callable[..., Any], str] = {
    F.alpha_dropout: "training",
    F.feature_alpha_dropout: "training",
    torch.alpha_dropout: "train",
    torch.feature_alpha_dropout: "train",
}

SAMPLERS = frozenset(
    {
        *_SIZED,
        *_LIKE,
        *_FROM_TENSORS,
        *_IN_PLACE,
        *_DROPOUTS,
        *_ALPHA_DROPOUTS,
        torch.normal,
        F.scaled_dot_product_attention,
    }
)
"""Every call `Draws` answers (the `ShadowMode` hands these over)."""


class Draws:
    """Sampling calls on a ``dtype`` shadow, drawn as a ``training_dtype`` training drew them.

    Args:
        dtype: the shadow's floating dtype.
        training_dtype: the dtype the training drew in where the shadow asks for ``dtype``
            (the model's parameters' dtype).
        default_dtype: the default dtype the training ran under (a tensor made without a
            dtype was drawn in it).
    """

    def __init__(
        self, dtype: torch.dtype, training_dtype: torch.dtype, default_dtype: torch.dtype
    ) -> None:
        self.dtype = dtype
        self.training_dtype = training_dtype
        self.default_dtype = default_dtype
        self.unreplayed: list[str] = []
        """Draws made otherwise than in the training (named once each)."""

    def __call__(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if "out" in kwargs or ("generator" in kwargs and kwargs["generator"] is not None):
            return func(*args, **kwargs)  # an explicit output or generator: the caller's own
        if func in _SIZED or func in _LIKE or (func is torch.normal and not _tensor_form(args)):
            return self._created(func, args, kwargs)
        if func in _FROM_TENSORS or func is torch.normal:
            return self._from_tensors(func, args, kwargs)
        if func in _IN_PLACE:
            return self._in_place(func, args, kwargs)
        if func in _DROPOUTS:
            return self._dropout(func, args, kwargs)
        if func in _ALPHA_DROPOUTS:
            if _flag(args, kwargs, _ALPHA_DROPOUTS[func]) and _probability(args, kwargs) > 0:
                self._unreplayed("alpha dropout (an affine mask)")
            return func(*args, **kwargs)
        return self._attention(func, args, kwargs)

    def _draw_dtype(self, requested: torch.dtype | None) -> torch.dtype | None:
        """The dtype to draw in for a request of ``requested``, or None: as requested."""
        if requested == self.dtype and self.training_dtype != self.dtype:
            return self.training_dtype
        if requested is not None and requested.is_floating_point and requested != self.dtype:
            return requested  # an explicit coarser request: drawn so, answered in dtype
        return None

    def _upcast(self, result: Any) -> Any:
        if isinstance(result, torch.Tensor) and result.is_floating_point():
            return result.to(self.dtype)
        return result

    def _created(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        requested = kwargs.get("dtype")
        if requested is None and func in _LIKE and _is(args[0]):
            requested = args[0].dtype
        if requested is None:  # made in the default dtype: the training's, not the shadow's
            default = None if func in _INTEGER_BY_DEFAULT else self.default_dtype
            draw = default if default is not None and default != self.dtype else None
        else:
            draw = self._draw_dtype(requested)
        if draw is None:
            return func(*args, **kwargs)
        grad = bool(kwargs.pop("requires_grad", False))
        result = self._upcast(func(*args, **{**kwargs, "dtype": draw}))
        return result.requires_grad_() if grad else result

    def _down(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dtype == self.dtype:
            return value.detach().to(self.training_dtype)
        return value

    def _from_tensors(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self.training_dtype == self.dtype:
            return func(*args, **kwargs)
        if func is torch.normal:  # normal(mean, std): mean + std * N(0, 1), differentiable
            mean = args[0] if args else kwargs["mean"]
            std = args[1] if len(args) > 1 else kwargs.get("std", 1.0)
            shape = torch.broadcast_shapes(*(t.shape for t in (mean, std) if _is(t)))  # type: ignore[no-untyped-call]
            device = next(t.device for t in (mean, std) if _is(t))
            noise = torch.empty(shape, dtype=self.training_dtype, device=device).normal_(0, 1)
            return mean + std * noise.to(self.dtype)
        return self._upcast(func(*tree_map(self._down, args), **tree_map(self._down, kwargs)))

    def _in_place(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        target = args[0]
        if target.dtype != self.dtype or self.training_dtype == self.dtype:
            return func(*args, **kwargs)
        drawn = torch.empty_like(target, dtype=self.training_dtype)  # same strides
        func(drawn, *tree_map(self._down, args[1:]), **tree_map(self._down, kwargs))
        with torch.no_grad():
            target.copy_(drawn)
        return target

    def _dropout(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        source = args[0] if args else kwargs["input"]
        p = _probability(args, kwargs)
        training = _flag(args, kwargs, _DROPOUTS[func])
        if (
            not training
            or p <= 0
            or source.dtype != self.dtype
            or self.training_dtype == self.dtype
        ):
            return func(*args, **kwargs)
        # Strides kept (ones_like): the kernel fills its mask in memory order.
        ones = torch.ones_like(source, dtype=self.training_dtype)
        noise = func(ones, p, True).to(self.dtype)  # the training's mask, times 1/(1-p)
        if kwargs.get("inplace") or (len(args) > 3 and args[3]):
            return source.mul_(noise)
        return source * noise

    def _attention(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Attention dropout is drawn inside the kernel: on the CPU (the math kernel, whose
        Bernoulli mask does not depend on the dtype) it replays; elsewhere it does not."""
        query = args[0] if args else kwargs["query"]
        dropout = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
        if dropout > 0 and query.device.type != "cpu":
            self._unreplayed(f"attention dropout in a fused {query.device.type} kernel")
        return func(*args, **kwargs)

    def _unreplayed(self, what: str) -> None:
        if what not in self.unreplayed:
            self.unreplayed.append(what)


def _is(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _tensor_form(args: tuple[Any, ...]) -> bool:
    """``torch.normal(mean, std)`` with a tensor among its first two arguments."""
    return any(_is(a) for a in args[:2])


def _probability(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    return float(args[1] if len(args) > 1 else kwargs.get("p", 0.5))


def _flag(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> bool:
    return bool(args[2] if len(args) > 2 else kwargs.get(name, True))
