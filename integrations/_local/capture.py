"""The module calls of one forward+backward pass of J, captured for module-local checks.

`capture_calls` runs J's forward and backward once on the shadow with hooks on every
module: a forward pre-hook keeps a copy of each call's arguments (tensors cloned, so an
in-place op later in the forward cannot change what was captured; other objects such as
a key/value cache deep-copied, since the attention layers fill it as the forward goes)
and the state of every random generator at the call; a forward hook puts a tensor hook
on each output that requires grad, which keeps the gradient arriving there (the output
cotangent). Calls nest as they ran: a call's children are the module calls made while
it was running, so a module called from its parent's forward, from a sibling, or several
times (each call its own record) is found where it ran.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from gradwatch.integrations._shadow.model import RngState
from torch import nn

__all__ = ["ModuleCall", "capture_calls", "fresh_arguments", "tensor_leaves"]


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nested value (tuples, lists, mappings, ``ModelOutput``), in order."""
    found: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        found.append(tensor)
        return tensor

    _rebuild(value, keep, copy_objects=False)
    return found


def fresh_arguments(
    value: Any, replace: Callable[[int, torch.Tensor], torch.Tensor] | None = None
) -> Any:
    """A new copy of captured arguments for one evaluation: each tensor detached and cloned
    (or replaced by ``replace(position, tensor)``), each other object deep-copied, so an evaluation
    that writes into its arguments (an in-place op, a cache it appends to) leaves the
    captured ones as they were."""
    position = 0

    def fresh(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal position
        new = tensor.detach().clone() if replace is None else replace(position, tensor)
        position += 1
        return new

    return _rebuild(value, fresh, copy_objects=True)


def _rebuild(value: Any, fn: Callable[[torch.Tensor], torch.Tensor], *, copy_objects: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        items = {key: _rebuild(item, fn, copy_objects=copy_objects) for key, item in value.items()}
        try:
            return type(value)(items)  # type: ignore[call-arg]
        except Exception:
            return items
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_rebuild(item, fn, copy_objects=copy_objects) for item in value))
    if isinstance(value, list | tuple):
        return type(value)(_rebuild(item, fn, copy_objects=copy_objects) for item in value)
    if copy_objects and not _immutable(value):
        return _detached_copy(value)
    return value


def _immutable(value: Any) -> bool:
    return value is None or isinstance(
        value, int | float | str | bytes | bool | torch.dtype | torch.device | nn.Module
    )


def _detached_copy(value: Any) -> Any:
    """``copy.deepcopy`` of an object holding tensors (a key/value cache), each tensor
    detached and cloned; the object itself when it cannot be copied."""
    memo: dict[int, Any] = {}
    for tensor in _tensors_inside(value, depth=6, seen=set()):
        memo[id(tensor)] = tensor.detach().clone()
    try:
        return copy.deepcopy(value, memo)
    except Exception:
        return value


def _tensors_inside(value: Any, depth: int, seen: set[int]) -> Iterator[torch.Tensor]:
    if id(value) in seen or depth < 0 or isinstance(value, nn.Module):
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors_inside(item, depth - 1, seen)
    elif isinstance(value, list | tuple | set):
        for item in value:
            yield from _tensors_inside(item, depth - 1, seen)
    elif hasattr(value, "__dict__"):
        for item in vars(value).values():
            yield from _tensors_inside(item, depth - 1, seen)


@dataclass(eq=False)
class ModuleCall:
    """One call of one module in the captured pass, and what a local check needs of it."""

    path: str
    """The module's name in ``named_modules()`` ("" for the model itself)."""
    module: nn.Module
    number: int
    """Which call of this module it was (0 for the first)."""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    differentiable: frozenset[int]
    """Positions (in `tensor_leaves` order of ``(args, kwargs)``) of the floating inputs
    that required grad: the inputs whose gradient training uses."""
    rng: RngState
    parent: ModuleCall | None = None
    children: list[ModuleCall] = field(default_factory=list)
    cotangents: dict[int, torch.Tensor] = field(default_factory=dict)
    """Output position -> the gradient that arrived at that output in the backward."""
    outputs: int = 0
    calls: int = 1
    """How many times the module was called in the pass (set once the pass is over)."""

    @property
    def reached(self) -> bool:
        """True when some gradient arrived at the call's outputs."""
        return bool(self.cotangents)


def capture_calls(
    root: nn.Module, backward_of_j: Callable[[], None], wanted: Callable[[str], bool] | None = None
) -> list[ModuleCall]:
    """Run ``backward_of_j`` (J's forward and backward) with every module call recorded.

    Returns the top-level calls (no enclosing module call); the rest hang below them.
    ``wanted(path)`` limits which calls keep copies of their arguments (all by default).
    """
    names = {id(module): name for name, module in root.named_modules(remove_duplicate=False)}
    stack: list[ModuleCall] = []
    tops: list[ModuleCall] = []
    counts: dict[str, list[ModuleCall]] = {}

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        path = names.get(id(module), type(module).__name__)
        keep = wanted is None or wanted(path)
        leaves = tensor_leaves((args, kwargs))
        call = ModuleCall(
            path=path,
            module=module,
            number=len(counts.get(path, [])),
            args=fresh_arguments(args) if keep else (),
            kwargs=fresh_arguments(kwargs) if keep else {},
            differentiable=frozenset(
                i for i, t in enumerate(leaves) if t.is_floating_point() and t.requires_grad
            ),
            rng=RngState.capture(),
            parent=stack[-1] if stack else None,
        )
        counts.setdefault(path, []).append(call)
        (stack[-1].children if stack else tops).append(call)
        stack.append(call)

    def after(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        call = stack.pop()
        leaves = tensor_leaves(output)
        call.outputs = len(leaves)
        for position, tensor in enumerate(leaves):
            if tensor.is_floating_point() and tensor.requires_grad:
                tensor.register_hook(_keeper(call, position))  # type: ignore[no-untyped-call]

    handles = []
    for module in root.modules():
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))
    try:
        backward_of_j()
    finally:
        for handle in handles:
            handle.remove()
    for calls in counts.values():
        for call in calls:
            call.calls = len(calls)
    return tops


def _keeper(call: ModuleCall, position: int) -> Callable[[torch.Tensor], None]:
    def keep(gradient: torch.Tensor) -> None:
        kept = call.cotangents.get(position)
        gradient = gradient.detach()
        call.cotangents[position] = gradient.clone() if kept is None else kept + gradient

    return keep
