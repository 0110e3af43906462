"""What the model's own code asks of the float64 shadow, answered in float64.

Real model code upcasts on purpose: ``logits.float()`` before a loss,
``hidden_states.to(torch.float32)`` in RMSNorm, ``softmax(..., dtype=torch.float32)``
in attention. On a float64 shadow each of these is a *downcast*: J comes out rounded
to float32 and its finite differences are whole multiples of ulp(J)/2h, which reads
as a wrong gradient on a correct model. `ShadowMode` is a ``TorchFunctionMode``
active while a check evaluates J (and during its autograd pass) that

- answers requests for a lower floating dtype (``.float()``, ``.half()``,
  ``.bfloat16()``, ``.to(torch.float32)``, ``.type(torch.float32)``,
  ``dtype=torch.float32`` arguments) with the shadow's dtype;
- runs an op that has no kernel for the shadow's dtype (transformers' MoE
  ``grouped_mm`` has none for float64) as a reference implementation in that dtype
  where one is known, else in float32 with its outputs cast back;
- makes tensors created without a dtype in the shadow's dtype (the default dtype);
- makes every random draw in the dtype the training drew it in, then upcasts it
  (`gradwatch.integrations._shadow.draws`), so a replay draws the training's numbers;
- records every op that still turned a shadow-dtype tensor into a coarser one (`coarse_ops`), so
  the check can say J is coarser than the shadow instead of reporting a bug;
- holds each ``nn.Embedding`` padding row constant *inside the lookup only*: torch
  gives the lookup no gradient for that row, while every other use of the weight
  (a tied LM head) does train it.

A backward pass runs outside the mode (a mode is off while it runs a call it
answers, ``loss.backward()`` included), so a gradient checkpoint's recompute would
not be answered: `without_checkpointing` turns checkpointing off on the shadow.

A mode sees only calls made through Python (``__torch_function__``); what a kernel
does inside, or an autocast region, shows up in `coarse_ops` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from gradwatch.integrations._shadow.draws import SAMPLERS, Draws
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

__all__ = ["HeldRow", "ShadowMode", "without_checkpointing"]

_LOWER: dict[torch.dtype, frozenset[torch.dtype]] = {
    torch.float64: frozenset({torch.float32, torch.float16, torch.bfloat16}),
    torch.float32: frozenset({torch.float16, torch.bfloat16}),
}
"""Floating dtypes coarser than the shadow's: a request for one is a downcast."""

_TYPE_NAMES = {
    "torch.FloatTensor": torch.float32,
    "torch.HalfTensor": torch.float16,
    "torch.BFloat16Tensor": torch.bfloat16,
}

_DOWNCAST_METHODS: dict[Callable[..., Any], torch.dtype] = {
    torch.Tensor.float: torch.float32,
    torch.Tensor.half: torch.float16,
    torch.Tensor.bfloat16: torch.bfloat16,
}

_ANSWERED = frozenset({*_DOWNCAST_METHODS, torch.Tensor.to, torch.Tensor.type, F.embedding})
"""Ops whose arguments the mode may rewrite (besides any op given a ``dtype=``)."""

_REINTERPRETING = frozenset({torch.Tensor.view})
"""``x.view(dtype)`` reinterprets the bytes: its dtype argument must not change."""

HeldRow = tuple[int, torch.Tensor]
"""``(padding_idx, row)``: an embedding's padding row and its unperturbed values."""

COARSE_OPS_KEPT = 8
"""How many distinct ops that produced coarser tensors a check names."""


class ShadowMode(TorchFunctionMode):
    """Requests for a coarser dtype yield ``dtype``; see the module docstring.

    Args:
        dtype: the shadow's floating dtype (float64 by default in a check).
        held_rows: ``id(weight) -> (padding_idx, row)`` for each trainable embedding
            weight with a padding row.
        training_dtype: the dtype the training computed (and drew its random numbers)
            in; random draws are made in it and upcast (`Draws`). None: ``dtype``.
    """

    def __init__(
        self,
        dtype: torch.dtype,
        held_rows: Mapping[int, HeldRow] = (),  # type: ignore[assignment]
        training_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dtype = dtype
        self.draws = Draws(dtype, training_dtype or dtype, torch.get_default_dtype())
        """Random draws made as the training made them; ``draws.unreplayed`` names the rest."""
        self.lower = _LOWER.get(dtype, frozenset())
        self.held_rows = dict(held_rows)
        self.coarse_ops: list[str] = []
        """Ops that produced a floating tensor coarser than ``dtype`` (first few)."""
        self.fallback_ops: list[str] = []
        """Ops that had no kernel for ``dtype`` and ran in float32."""
        self.replaced_ops: list[str] = []
        """Ops that had no kernel for ``dtype`` and ran as a reference implementation."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in SAMPLERS:
            return self.draws(func, args, kwargs)
        if func in _ANSWERED or "dtype" in kwargs:  # the hot path (every other op) skips this
            kwargs = dict(kwargs)
            if self.lower:
                func, args, kwargs = self._answer_downcasts(func, args, kwargs)
            if func is F.embedding and self.held_rows:
                args, kwargs = self._hold_padding_row(args, kwargs)
        if func in _REFERENCES and self.lower and _has_dtype(args, kwargs, self.dtype):
            return self._reference(func, args, kwargs)  # known up front: no float64 kernel
        try:
            result = func(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as error:
            # Decided by dtypes, never by the words of torch's message: the same call on
            # float32 copies of its float64 tensors. Where that runs, only the dtype was
            # in the way; where it fails too, the float64 call's own error is raised. A
            # call that writes into its arguments is never run on copies.
            if not (self.lower and _has_dtype(args, kwargs, self.dtype)) or _writes_into(
                func, kwargs
            ):
                raise
            result = self._in_float32(func, args, kwargs, error)
        if (
            type(result) is torch.Tensor
            and result.dtype in self.lower
            and _has_dtype(args, kwargs, self.dtype)
        ):
            _remember(self.coarse_ops, func)  # a downcast this mode could not answer
        return result

    def __enter__(self) -> ShadowMode:
        # Tensors made without a dtype (torch.ones(n), torch.tensor(0.5)) follow the shadow.
        self._default_dtype = torch.get_default_dtype()
        if self.lower:
            torch.set_default_dtype(self.dtype)
        super().__enter__()  # type: ignore[no-untyped-call]
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)  # type: ignore[no-untyped-call]
        torch.set_default_dtype(self._default_dtype)

    def _answer_downcasts(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        if func in _DOWNCAST_METHODS:
            return torch.Tensor.to, (args[0], self.dtype), kwargs
        if func in _REINTERPRETING:
            return func, args, kwargs
        if func is torch.Tensor.to or func is torch.Tensor.type:
            args = tuple(self._mapped(a) for a in args)
        if kwargs.get("dtype") in self.lower:
            kwargs["dtype"] = self.dtype
        return func, args, kwargs

    def _mapped(self, value: Any) -> Any:
        if isinstance(value, str):
            value = _TYPE_NAMES.get(value, value)
        return self.dtype if isinstance(value, torch.dtype) and value in self.lower else value

    def _hold_padding_row(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        held = self.held_rows.get(id(weight))
        if held is None or not isinstance(weight, torch.Tensor):
            return args, kwargs
        index, row = held
        held_weight = weight.index_put(
            (torch.tensor([index], device=weight.device),), row.to(weight.dtype).unsqueeze(0)
        )
        if len(args) > 1:
            return (args[0], held_weight, *args[2:]), kwargs
        return args, {**kwargs, "weight": held_weight}

    def _reference(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """``func``, which has no kernel for ``dtype``, as gradwatch's reference in ``dtype``;
        where the reference does not take these arguments, on float32 copies."""
        try:
            result = _REFERENCES[func](*args, **kwargs)
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as error:
            return self._in_float32(func, args, kwargs, error)
        _remember(self.replaced_ops, func)
        return result

    def _in_float32(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        error: Exception,
    ) -> Any:
        """``func`` on float32 copies of its ``dtype`` tensors (outputs cast back), or
        ``error`` (the ``dtype`` call's) when that fails too."""

        def down(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dtype == self.dtype:
                return value.to(torch.float32)
            return value

        def up(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                return value.to(self.dtype)
            return value

        try:
            result = func(*tree_map(down, args), **tree_map(down, kwargs))
        except Exception:
            raise error from None
        _remember(self.fallback_ops, func)
        _remember(self.coarse_ops, func)
        return tree_map(up, result)


def without_checkpointing(module: torch.nn.Module) -> None:
    """Turn gradient checkpointing off on the shadow ``module`` (never on the model).

    A checkpointed layer recomputes its forward during the backward pass, where no
    `ShadowMode` answers its casts: RMSNorm's ``.to(torch.float32)`` then recomputes in
    float32 what the forward saved in float64, and torch refuses the mismatch. Without
    checkpointing J and its gradient are the same (the recompute replays the forward's
    draws), at the memory cost checkpointing saves. A layer says it checkpoints with the
    boolean ``gradient_checkpointing`` (`transformers`' convention).
    """
    for layer in module.modules():
        if getattr(layer, "gradient_checkpointing", None) is True:
            object.__setattr__(layer, "gradient_checkpointing", False)


def grouped_mm_by_groups(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    *,
    offs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``torch._grouped_mm`` (MoE experts) as one ``mm`` per group, in any dtype.

    The CPU kernel takes float32/bfloat16/float16 only. Supported: 2D x 3D with
    ``offs`` (tokens sorted by expert), 3D x 3D (a batch of groups) and 2D x 2D with
    ``offs`` (per-group weight gradients); no bias or out_dtype.
    """
    if bias is not None or out_dtype is not None:
        raise NotImplementedError("grouped_mm_by_groups: bias and out_dtype not supported")
    if mat_a.dim() == 3 and mat_b.dim() == 3 and offs is None:
        return torch.bmm(mat_a, mat_b)
    if offs is None:
        raise NotImplementedError("grouped_mm_by_groups: 2D operands need offs")
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    if mat_a.dim() == 2 and mat_b.dim() == 3:
        rows = [mat_a[s:e] @ mat_b[g] for g, (s, e) in enumerate(zip(starts, ends, strict=True))]
        tail = mat_a.new_zeros((mat_a.shape[0] - ends[-1], mat_b.shape[-1]))
        return torch.cat([*rows, tail])
    if mat_a.dim() == 2 and mat_b.dim() == 2:
        return torch.stack([mat_a[:, s:e] @ mat_b[s:e] for s, e in zip(starts, ends, strict=True)])
    raise NotImplementedError(f"grouped_mm_by_groups: {mat_a.dim()}D x {mat_b.dim()}D")


_REFERENCES: dict[Callable[..., Any], Callable[..., torch.Tensor]] = {
    torch._grouped_mm: grouped_mm_by_groups,
    **({F.grouped_mm: grouped_mm_by_groups} if hasattr(F, "grouped_mm") else {}),
}
"""Implementations in any dtype of ops whose kernels lack float64."""


def _op_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None) or ""
    if name.startswith(("TensorBase.", "Tensor.")):
        return "Tensor." + name.split(".", 1)[1]
    if name.startswith("_VariableFunctionsClass."):
        return "torch." + name.split(".", 1)[1]
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    return f"torch.{name}" if module.startswith("torch") and "." not in name else str(name)


def _remember(names: list[str], func: Callable[..., Any]) -> None:
    name = _op_name(func)
    if name not in names and len(names) < COARSE_OPS_KEPT:
        names.append(name)


def _writes_into(func: Callable[..., Any], kwargs: dict[str, Any]) -> bool:
    """True when ``func`` writes into a tensor it is given (in place, ``out=``, item
    assignment): run on copies, it would change the copies, not its arguments."""
    name = getattr(func, "__name__", "")
    in_place = name.endswith("_") and not name.endswith("__")
    return in_place or name in _WRITING_DUNDERS or "out" in kwargs


_WRITING_DUNDERS = frozenset(
    f"__i{op}__"
    for op in (
        [
            "add",
            "sub",
            "mul",
            "matmul",
            "truediv",
            "floordiv",
            "mod",
            "pow",
            "and",
            "or",
            "xor",
            "lshift",
            "rshift",
        ]
    )
) | {"__setitem__"}
"""Operators that write into their left operand (``x += y``, ``x[i] = y``)."""


def _has_dtype(args: tuple[Any, ...], kwargs: dict[str, Any], dtype: torch.dtype) -> bool:
    found = False

    def look(value: Any) -> Any:
        nonlocal found
        if isinstance(value, torch.Tensor) and value.dtype == dtype:
            found = True
        return value

    tree_map(look, (args, kwargs))
    return found
