"""J on the shadow: the objective the core evaluates, with RNG replay, and its gradient.

`ShadowLoss` is J(shadow) = ``loss_fn(shadow, batch)`` + penalties, every evaluation
(and the analytic pass) starting from the same forked state of the generators J
draws from, so dropout draws the same mask every time. `ShadowGradients` is the
autograd gradient of that J, streamed to the check one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from gradwatch.integrations._parallel.ranks import Ranks
from gradwatch.integrations._shadow.model import (
    Generator,
    RngState,
    Shadow,
    map_tensors,
    missing_gradients_note,
    to_numpy,
)
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradwatch.engine.uninterrupted import restored_after
from gradwatch.errors import LossError, OptionError

__all__ = ["NOT_THE_MODEL_GIVEN", "LossFn", "Penalties", "Penalty", "untouched_model"]

NOT_THE_MODEL_GIVEN = (
    "loss_fn(model, batch): expected a loss computed with the model it is given (gradwatch's "
    "copy), received one that did not use it"
)
"""Why nothing could be checked when J does not depend on the copy's parameters."""

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch) -> scalar tensor``: the data part of J."""
Penalty = Callable[[nn.Module], torch.Tensor]
"""``penalty(model) -> scalar tensor``: a regularization term of J, on both sides."""
Penalties = Sequence[Penalty] | Mapping[str, Penalty]


@contextmanager
def untouched_model(model: nn.Module) -> Iterator[None]:
    """While a check runs, the real ``model`` cannot be run or trained through by J.

    A ``loss_fn`` that closes over the real model (``lambda m, b: loss(model(b))``) would
    run it (BatchNorm statistics move) and backpropagate into its ``.grad``, while J on
    the copy stays flat: a check of nothing that reads ``ok``. Here any call of one of
    the model's modules raises `LossError` before it runs, and its parameters stop
    requiring gradients (so J through them has none, and `ShadowGradients` says so);
    everything is put back on exit.
    """
    modules = {id(module) for module in model.modules()}

    def refuse(module: nn.Module, args: Any) -> None:
        if id(module) in modules:
            raise LossError(
                f"{NOT_THE_MODEL_GIVEN}: it called the trained model's {type(module).__name__} "
                "(a loss_fn that closes over the model instead of using its argument?)"
            )

    handles: list[RemovableHandle] = []
    trainable = [p for p in model.parameters() if p.requires_grad]

    def put_back() -> None:
        for parameter in trainable:
            parameter.requires_grad_(True)
        for handle in handles:
            handle.remove()

    # Put back even when an interrupt lands between the body's end and this generator's
    # resumption, where a try/finally around the yield would never run.
    with restored_after(put_back):
        handles.extend(module.register_forward_pre_hook(refuse) for module in model.modules())
        for parameter in trainable:
            parameter.requires_grad_(False)
        yield


def penalty_items(regularization: Penalties) -> list[tuple[str, Penalty]]:
    if isinstance(regularization, Mapping):
        items = list(regularization.items())
    else:
        items = []
        for i, penalty in enumerate(regularization):
            name = str(getattr(penalty, "__name__", ""))
            items.append((name if name and name != "<lambda>" else f"penalty[{i}]", penalty))
    for name, penalty in items:
        if not callable(penalty):
            raise OptionError(
                f"regularization[{name!r}]: expected a callable (model) -> scalar tensor, "
                f"received {type(penalty).__name__}"
            )
    return items


def scalar_of(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise LossError(f"{where}: expected a scalar torch.Tensor, received {type(value).__name__}")
    if value.numel() != 1:
        raise LossError(
            f"{where}: expected a scalar tensor, received one of shape {tuple(value.shape)}"
        )
    return value if value.dim() == 0 else value.reshape(())


def is_immutable(value: Any) -> bool:
    """A tensor, a scalar, or tuples of them: nothing a loss_fn could pop from or append to."""
    if isinstance(value, tuple):
        return all(is_immutable(item) for item in value)
    return isinstance(value, torch.Tensor | int | float | str | bytes | bool | None)


def j_terms(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    penalties: Sequence[tuple[str, Penalty]],
    *,
    fresh_batch: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The data loss and each penalty of J at ``model``'s current values.

    ``fresh_batch``: hand ``loss_fn`` a new container each time (it may pop from its dict).
    """
    if fresh_batch:
        batch = map_tensors(batch, lambda t: t)
    loss = scalar_of(loss_fn(model, batch), "loss_fn(model, batch)")
    terms = {
        name: scalar_of(penalty(model), f"regularization[{name!r}](model)")
        for name, penalty in penalties
    }
    return loss, terms


class ShadowLoss:
    """J(shadow) = loss_fn(shadow, batch) + penalties, with the forked RNG state replayed.

    The first evaluation starts from the forked state of every generator and
    records which ones it drew from (``replay``); every later evaluation restores
    just those, so a model without randomness pays nothing for the replay. A
    generator drawn only by some later evaluation is caught by `stray_draws`.
    """

    def __init__(
        self,
        shadow: Shadow,
        loss_fn: LossFn,
        batch: Any,
        penalties: list[tuple[str, Penalty]],
        rng: RngState,
        ranks: Ranks | None = None,
    ) -> None:
        self.shadow = shadow
        self.loss_fn = loss_fn
        self.ranks = ranks
        """The job's ranks when J is the mean of theirs (a distributed check), else None."""
        dtype = shadow.dtype
        self._batch = map_tensors(
            batch,
            lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t,
        )
        self._batch_is_immutable = is_immutable(self._batch)
        self._plain = self._batch_is_immutable and not penalties and not shadow.needs_sync
        self.penalties = penalties
        self.rng = rng
        self.replay: frozenset[Generator] | None = None
        """The generators J draws from; None until the first evaluation."""

    def terms(self, model: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The data loss and each penalty, from the same RNG state every time."""
        first = self.replay is None
        if first:
            self.rng.restore()
        elif self.replay:
            self.rng.restore(self.replay)
        model = self.shadow.module if model is None else model
        loss, penalties = j_terms(
            model,
            self.loss_fn,
            self._batch,
            self.penalties,
            fresh_batch=not self._batch_is_immutable,
        )
        if first:
            self.replay = self.rng.drawn()
        return loss, penalties

    def total(self, model: nn.Module | None = None) -> torch.Tensor:
        """J as a 0-d tensor: the data loss plus every penalty."""
        loss, penalties = self.terms(model)
        return loss + sum(penalties.values()) if penalties else loss

    def stray_draws(self) -> frozenset[Generator]:
        """Generators that some evaluation drew from although the first one did not."""
        return self.rng.drawn() - (self.replay or frozenset())

    def penalty_values(self) -> dict[str, float]:
        """Each penalty at the current parameters."""
        self.shadow.sync()
        with torch.no_grad():
            return {
                name: float(scalar_of(penalty(self.shadow.module), f"regularization[{name!r}]"))
                for name, penalty in self.penalties
            }

    def __call__(self) -> float:
        """J at the current values of the numpy arrays (the core's loss closure).

        In a distributed check, the mean of every rank's J (each on its own batch).
        """
        if self.ranks is not None:
            return self.ranks.mean_of(self._local)
        return self._local()

    def _local(self) -> float:
        """This process's J at the current values of the numpy arrays."""
        if self.replay == frozenset() and self._plain and not torch.is_grad_enabled():
            # The hot path of a full check on a CPU model without randomness or penalties:
            # nothing to replay, sync or add, as cheap as calling loss_fn in a loop.
            value = self.loss_fn(self.shadow.module, self._batch)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                return float(value)
        self.shadow.sync()
        if self.replay is None:
            # The first forward of the shadow runs outside inference mode: a tensor the
            # model builds and keeps on it (a rotary table, a mask) must stay usable by
            # the autograd passes that follow.
            with torch.inference_mode(False), torch.no_grad():
                return float(self.total())
        if torch.is_grad_enabled():
            with torch.no_grad():
                return float(self.total())
        return float(self.total())  # check_module runs the check under inference_mode

    def restore_tensor(self, name: str) -> None:
        """The core's exact restore of a moved tensor (see `Shadow.restore_tensor`)."""
        self.shadow.restore_tensor(name)


class ShadowGradients:
    """The autograd gradient of J on the shadow, as a `gradwatch.params.GradientSource`.

    Each visit runs one backward pass from the same RNG state as every evaluation; a
    hook hands each parameter's gradient to the check the moment autograd has
    accumulated it, then drops it. So the whole float64 gradient is never held: the
    check keeps norms, projections and the components it compares. The first visit's
    findings (missing gradients, J not depending on the parameters) become notes.

    Where a gradient arrives in parts (a parameter used in two reentrant checkpoint
    segments is accumulated once per segment) the hook hands over only the first part
    and records the tensor in `arrived_in_parts`; ``check_module`` then checks again
    with ``hold=True``: every gradient is kept until the backward pass ends, as one
    float64 copy.

    In a distributed check (``objective.ranks``) the gradient is the mean of the ranks'
    gradients, always held until the backward pass ends and then reduced tensor by
    tensor in theta order: a rank whose batch leaves a parameter unused (an MoE expert
    no token was routed to) must still take part in that tensor's reduction.
    """

    def __init__(
        self, objective: ShadowLoss, hold: bool = False, largest: dict[str, int] | None = None
    ) -> None:
        self.objective = objective
        self.hold = hold or objective.ranks is not None
        self.notes: list[str] = []
        self.largest: dict[str, int] = {} if largest is None else largest
        """Flat index of each visited tensor's largest gradient entry (the batched probe)."""
        self.visits = 0
        self.arrived_in_parts: str | None = None
        """The first tensor whose gradient arrived in parts (streamed visits only)."""
        self.nonzero = False
        """Whether the first visit's gradient had any nonzero entry."""
        self.first_visit_complete = False
        """Whether the first visit covered every trainable tensor of the shadow."""

    def visit(
        self, names: Sequence[str], consume: Callable[[str, npt.NDArray[np.floating]], None]
    ) -> None:
        shadow = self.objective.shadow
        wanted = set(names)
        delivered: set[str] = set()
        dtype = shadow.arrays_dtype()

        def hand_over(name: str, gradient: torch.Tensor) -> None:
            array = to_numpy(gradient).astype(dtype, copy=False)
            self.largest[name] = largest_entry(array)
            if self.visits == 0 and not self.nonzero:
                self.nonzero = bool(array.reshape(-1)[self.largest[name]] != 0)
            delivered.add(name)
            consume(name, array)

        def make_hook(name: str) -> Callable[[torch.Tensor], None]:
            def hook(parameter: torch.Tensor) -> None:
                if name in delivered:  # a later part: the check already took the first
                    self.arrived_in_parts = self.arrived_in_parts or name
                elif parameter.grad is not None and name in wanted:
                    hand_over(name, parameter.grad)
                parameter.grad = None  # freed now, not after the whole backward

            return hook

        handles = []
        if not self.hold:
            handles = [
                p.register_post_accumulate_grad_hook(make_hook(name))  # type: ignore[no-untyped-call]
                for name, p in shadow.params.items()
            ]
        try:
            shadow.sync()
            with torch.inference_mode(False), torch.enable_grad():
                total = self.objective.total()
                if total.requires_grad:
                    total.backward()  # type: ignore[no-untyped-call]
            if self.hold:
                for name, gradient in self._held(names):
                    hand_over(name, gradient)
        finally:
            for handle in handles:
                handle.remove()
            for p in shadow.params.values():
                p.grad = None
        missing = [name for name in names if name not in delivered]
        for name in missing:
            hand_over(name, torch.zeros(shadow.params[name].shape, dtype=shadow.dtype))
        if self.visits == 0:
            self.first_visit_complete = set(names) >= set(shadow.params)
            if not total.requires_grad:
                raise LossError(NOT_THE_MODEL_GIVEN)
            elif missing:
                self.notes.append(missing_gradients_note(missing))
        self.visits += 1

    def _held(self, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each held gradient in ``names`` order; across ranks, their mean where any has one."""
        params = self.objective.shadow.params
        ranks = self.objective.ranks
        if ranks is None:
            for name in names:
                gradient = params[name].grad
                if gradient is not None:
                    yield name, gradient
            return
        present = torch.tensor([params[name].grad is not None for name in names])
        anywhere = ranks.mean_tensor(present.to(torch.float64)) > 0
        for name, wanted in zip(names, anywhere.tolist(), strict=True):
            if wanted:
                gradient = params[name].grad
                if gradient is None:
                    gradient = torch.zeros_like(params[name])
                yield name, ranks.mean_tensor(gradient)


def largest_entry(gradient: npt.NDArray[np.floating]) -> int:
    """Flat index of the entry largest in magnitude (no temporary |gradient|)."""
    if gradient.size == 0:
        return 0
    high, low = int(gradient.argmax()), int(gradient.argmin())
    flat = gradient.reshape(-1)
    return high if abs(flat[high]) >= abs(flat[low]) else low
