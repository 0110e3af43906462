"""PyTorch modules as gradient-check parameters: a float64 shadow, RNG replay, restore.

``check_module`` checks the gradient of J = ``loss_fn(model, batch)`` (+ penalties)
in *recompute* mode: it never touches ``model``. It deep-copies the model into a
*shadow* (float64 by default) and hands the shadow's parameters to
``gradwatch.check`` as numpy arrays that share memory with the shadow's tensors, so
the core's in-place perturbation of one component is what the shadow's next forward
sees. The analytic gradient is autograd on the shadow, streamed to the check one
tensor at a time (`_ShadowGradients`), and moved tensors are restored from the
model's own values: the shadow is the only copy of the parameters a check holds.
Every evaluation of J (and the analytic pass) starts from the same forked state of
the generators J draws from, so dropout draws the same mask every time; afterwards
every global RNG (python, numpy, torch, CUDA) and torch's default dtype are put
back as they were. Where J can be vmapped (no randomness, no BatchNorm in train
mode), the perturbations of each tensor are evaluated in chunks with
``torch.func.vmap`` instead of one forward each.
The model's parameters, ``.grad``, buffers (BatchNorm running stats), train/eval
mode and the optimizer are never written to, so training continues bit for bit as
if no check had run.

Plain PyTorch loop, after ``loss.backward()`` and before ``optimizer.step()``::

    import gradwatch
    from gradwatch.integrations.torch import after_backward

    def loss_fn(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    watch = gradwatch.GradWatch(every=500, report_dir="runs/exp1/gradwatch")
    for step, batch in enumerate(loader):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        after_backward(watch, step, model, loss_fn, batch, optimizer=optimizer)
        optimizer.step()
    watch.close()

The framework callbacks (``gradwatch.integrations.transformers`` and
``gradwatch.integrations.lightning``) use the same pieces: `BatchCapture` to see the
batch, `weight_decay_notes`, and `check_due` to run and record a due check.
"""

from __future__ import annotations

import copy
import math
import os
import random
import re
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from gradwatch.integrations._shadow_mode import HeldRow, ShadowMode
from torch import nn
from torch.utils.hooks import RemovableHandle

import gradwatch
from gradwatch.errors import GradwatchError, LossError, OptionError, ParameterError
from gradwatch.result import CheckResult

if TYPE_CHECKING:
    from gradwatch.integrations._step import MicroBatch

    from gradwatch.callback import GradWatch, OnAlert, OnError, Sample

__all__ = [
    "NATIVE_DTYPES",
    "STATUS_CODES",
    "BatchCapture",
    "LossFn",
    "Penalties",
    "Penalty",
    "Precision",
    "RngState",
    "TrainingWatch",
    "after_backward",
    "check_due",
    "check_module",
    "check_step_notes",
    "is_shadow",
    "module_gradients",
    "result_metrics",
    "trainable_parameters",
    "weight_decay_notes",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch) -> scalar tensor``: the data part of J."""
Penalty = Callable[[nn.Module], torch.Tensor]
"""``penalty(model) -> scalar tensor``: a regularization term of J, on both sides."""
Penalties = Sequence[Penalty] | Mapping[str, Penalty]
Precision = Literal["float64", "native"]
Analytic = Literal["recompute", "live"]
Generator = Literal["python", "numpy", "torch", "cuda"]
GENERATORS: tuple[Generator, ...] = ("python", "numpy", "torch", "cuda")

NATIVE_DTYPES = (torch.float64, torch.float32, torch.float16)
"""Dtypes ``precision="native"`` can check: numpy must hold the parameters. The core
scales ``warn`` and ``threshold`` for float32 / float16 (``gradwatch.check.TOLERANCE_SCALE``)."""


# --------------------------------------------------------------------------- parameters


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a check covers: ``model.named_parameters()`` with ``requires_grad``.

    Frozen parameters (``requires_grad=False``) are left out; a parameter shared by
    two modules (tied weights) appears once, under its first name.
    """
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def module_gradients(
    model: nn.Module, dtype: npt.DTypeLike = np.float64, *, copy: bool = True
) -> tuple[dict[str, npt.NDArray[np.floating]], list[str]]:
    """The ``.grad`` of each trainable parameter as a numpy array, plus notes.

    A parameter whose ``.grad`` is None (unused in the forward, or a path cut by
    ``.detach()``) gets zeros and a note naming it, instead of an error: if the
    true gradient is not zero the check then fails on that tensor. ``copy=False``
    returns views where the dtype allows (the shadow's own gradients, which nothing
    else touches: one float64 copy of the parameters less).
    """
    grads: dict[str, npt.NDArray[np.floating]] = {}
    missing: list[str] = []
    for name, p in trainable_parameters(model).items():
        if p.grad is None:
            missing.append(name)
            grads[name] = np.zeros(tuple(p.shape), dtype=dtype)
        else:
            grads[name] = _to_numpy(p.grad).astype(dtype, copy=copy)
    notes = []
    if missing:
        notes.append(
            "no gradient (.grad is None after backward), compared as zeros: " + ", ".join(missing)
        )
    return grads, notes


# --------------------------------------------------------------------------- global state


@dataclass(frozen=True)
class RngState:
    """Every global random generator a forward pass may draw from.

    ``capture()`` forks the state; ``restore()`` puts it back bit for bit, as often
    as needed: the check restores the generators J draws from (`drawn`) before every
    evaluation of J (so dropout draws the same mask each time) and every generator
    once more at the end (so training draws as if no check had run).
    """

    python: tuple[Any, ...]
    numpy: Any
    torch_cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...] | None

    @classmethod
    def capture(cls) -> RngState:
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            cuda = tuple(torch.cuda.get_rng_state_all())
        return cls(
            python=random.getstate(),
            numpy=np.random.get_state(),
            torch_cpu=torch.get_rng_state(),
            cuda=cuda,
        )

    def restore(self, generators: Collection[Generator] = GENERATORS) -> None:
        """Put ``generators`` (default: all) back to the captured state."""
        if "python" in generators:
            random.setstate(self.python)
        if "numpy" in generators:
            np.random.set_state(self.numpy)
        if "torch" in generators:
            torch.set_rng_state(self.torch_cpu)
        if "cuda" in generators and self.cuda is not None:
            torch.cuda.set_rng_state_all(list(self.cuda))

    def drawn(self) -> frozenset[Generator]:
        """The generators whose state moved since the capture (something drew from them).

        Restoring numpy's legacy generator costs tens of microseconds, more than a
        small model's forward: the check replays only the generators J draws from.
        """
        now = RngState.capture()
        moved: set[Generator] = set()
        if now.python != self.python:
            moved.add("python")
        if not _same_numpy_state(now.numpy, self.numpy):
            moved.add("numpy")
        if not torch.equal(now.torch_cpu, self.torch_cpu):
            moved.add("torch")
        if self.cuda is not None and (
            now.cuda is None or not all(map(torch.equal, now.cuda, self.cuda))
        ):
            moved.add("cuda")
        return frozenset(moved)


def _same_numpy_state(first: Any, second: Any) -> bool:
    return all(
        np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
        for a, b in zip(first, second, strict=True)
    )


@contextmanager
def _untouched_globals(model: nn.Module) -> Iterator[RngState]:
    """Fork the RNGs; on exit restore them, the default dtype, grad mode and train modes."""
    rng = RngState.capture()
    default_dtype = torch.get_default_dtype()
    grad_enabled = torch.is_grad_enabled()
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield rng
    finally:
        rng.restore()
        torch.set_default_dtype(default_dtype)
        torch.set_grad_enabled(grad_enabled)
        for module, training in modes:
            module.training = training


# --------------------------------------------------------------------------- the shadow


_SHADOW_FLAG = "_gradwatch_shadow"


def is_shadow(module: nn.Module) -> bool:
    """True for a module built by a check (hooks use it to ignore the shadow's forwards)."""
    return bool(getattr(module, _SHADOW_FLAG, False))


def _shadow_parameters(model: nn.Module, precision: Precision) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo giving each parameter its copy in the check's dtype.

    Converting while copying (rather than deep-copying, then ``.to(float64)``) never
    holds a second copy of the parameters, and leaves their ``.grad`` behind. A
    parameter used twice (tied weights) maps to one copy.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        dtype = torch.float64 if precision == "float64" and p.is_floating_point() else p.dtype
        copied = p.detach().to(dtype=dtype, copy=True)
        memo[id(p)] = nn.Parameter(copied, requires_grad=p.requires_grad)
    return memo


class _Shadow:
    """A deep copy of the model whose trainable parameters are views of numpy arrays."""

    def __init__(self, model: nn.Module, precision: Precision) -> None:
        try:
            shadow = copy.deepcopy(model, memo=_shadow_parameters(model, precision))
        except Exception as error:
            raise ParameterError(
                f"model: expected a module that copy.deepcopy can copy (the check runs on "
                f"a copy and never touches the model), received {type(model).__name__}, "
                f"whose copy failed: {error}"
            ) from error
        object.__setattr__(shadow, _SHADOW_FLAG, True)
        self.native_dtype = _floating_dtype(model)
        if precision == "float64":
            shadow.to(torch.float64)  # the buffers; the parameters are float64 already
            self.dtype = torch.float64
        else:
            self.dtype = self.native_dtype
            if self.dtype not in NATIVE_DTYPES:
                raise OptionError(
                    f"precision: 'native' needs parameters numpy can hold (float64, float32, "
                    f"float16), received {self.dtype}; use precision='float64'"
                )
        self.module = shadow
        self.params = trainable_parameters(shadow)
        self.held_ranges: dict[str, tuple[int, int]] = {}
        """Flat index range of each held padding row (see `held_padding_rows`), by tensor."""
        self._sources = trainable_parameters(model)
        """The model's parameters by the shadow's names: the unperturbed values, exactly."""
        self._source_views = {
            name: p.detach().numpy()
            for name, p in self._sources.items()
            if p.device.type == "cpu" and p.layout == torch.strided and p.dtype != torch.bfloat16
        }
        """Numpy views of the CPU parameters (no copy): a restore makes no torch call."""
        self.arrays: dict[str, npt.NDArray[np.floating]] = {}
        self._synced: list[tuple[torch.Tensor, npt.NDArray[np.floating]]] = []
        for name, p in self.params.items():
            p.grad = None
            if not p.is_contiguous():
                p.data = p.data.contiguous()
            if p.device.type == "cpu":
                self.arrays[name] = p.detach().numpy()  # shares memory with the shadow
            else:  # copied into the device tensor before each evaluation
                self.arrays[name] = p.detach().cpu().numpy().copy()
                self._synced.append((p, self.arrays[name]))

    def held_padding_rows(self) -> dict[int, HeldRow]:
        """Each trainable ``nn.Embedding`` padding row, to hold constant in its lookup.

        Torch's lookup gives the ``padding_idx`` row no gradient (by design), yet J
        reads the row there wherever the padding token is not masked; every other
        use of the weight (an LM head tied to it) does train the row. `ShadowMode`
        holds the row at its unperturbed values inside the lookup only, so both
        sides of the check see torch's rule.
        """
        names = {id(p): name for name, p in self.params.items()}
        held: dict[int, HeldRow] = {}
        for module in self.module.modules():
            if not isinstance(module, nn.Embedding) or module.padding_idx is None:
                continue
            name = names.get(id(module.weight))
            if name is None or id(module.weight) in held:
                continue
            row = module.weight.detach()[module.padding_idx].clone()
            held[id(module.weight)] = (module.padding_idx, row)
            start = module.padding_idx * row.numel()
            self.held_ranges[name] = (start, start + row.numel())
        return held

    def restore_tensor(self, name: str) -> None:
        """Write a tensor's unperturbed values back, exactly, from the model (no backup).

        The shadow's values are the model's converted to float64 (or kept), which is
        exact, so the model is the backup; it is only read.
        """
        source = self._source_views.get(name)
        self.arrays[name][...] = _to_numpy(self._sources[name]) if source is None else source

    def arrays_dtype(self) -> npt.DTypeLike:
        """The numpy dtype of the checked arrays (float64, or the native dtype)."""
        first = next(iter(self.arrays.values()), None)
        return np.float64 if first is None else first.dtype

    @property
    def needs_sync(self) -> bool:
        """True when the shadow lives off the CPU and must copy the numpy arrays in."""
        return bool(self._synced)

    def sync(self) -> None:
        """Make a non-CPU shadow see the (possibly perturbed) numpy arrays."""
        if not self._synced:
            return
        with torch.no_grad():
            for tensor, array in self._synced:
                tensor.copy_(torch.from_numpy(array))


def _floating_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _to_numpy(tensor: torch.Tensor) -> npt.NDArray[Any]:
    if tensor.layout != torch.strided:  # a sparse gradient (nn.Embedding(sparse=True))
        tensor = tensor.to_dense()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a nested batch; containers are rebuilt (never mutated)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        items = {key: _map_tensors(item, fn) for key, item in value.items()}
        try:
            return type(value)(items)  # type: ignore[call-arg]
        except Exception:
            return items
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_map_tensors(item, fn) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, fn) for item in value)
    return value


def _penalty_items(regularization: Penalties) -> list[tuple[str, Penalty]]:
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


def _scalar(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise LossError(f"{where}: expected a scalar torch.Tensor, received {type(value).__name__}")
    if value.numel() != 1:
        raise LossError(
            f"{where}: expected a scalar tensor, received one of shape {tuple(value.shape)}"
        )
    return value if value.dim() == 0 else value.reshape(())


def _is_immutable(value: Any) -> bool:
    """A tensor, a scalar, or tuples of them: nothing a loss_fn could pop from or append to."""
    if isinstance(value, tuple):
        return all(_is_immutable(item) for item in value)
    return isinstance(value, torch.Tensor | int | float | str | bytes | bool | None)


class _Objective:
    """J(shadow) = loss_fn(shadow, batch) + penalties, with the forked RNG state replayed.

    The first evaluation starts from the forked state of every generator and
    records which ones it drew from (``replay``); every later evaluation restores
    just those, so a model without randomness pays nothing for the replay. A
    generator drawn only by some later evaluation is caught by `stray_draws`.
    """

    def __init__(
        self,
        shadow: _Shadow,
        loss_fn: LossFn,
        batch: Any,
        penalties: list[tuple[str, Penalty]],
        rng: RngState,
    ) -> None:
        self.shadow = shadow
        self.loss_fn = loss_fn
        dtype = shadow.dtype
        self._batch = _map_tensors(
            batch,
            lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t,
        )
        self._batch_is_immutable = _is_immutable(self._batch)
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
        batch = self._batch
        if not self._batch_is_immutable:  # loss_fn may pop from its dict: a fresh one each time
            batch = _map_tensors(batch, lambda t: t)
        loss = _scalar(self.loss_fn(model, batch), "loss_fn(model, batch)")
        penalties = {
            name: _scalar(penalty(model), f"regularization[{name!r}](model)")
            for name, penalty in self.penalties
        }
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
                name: float(_scalar(penalty(self.shadow.module), f"regularization[{name!r}]"))
                for name, penalty in self.penalties
            }

    def __call__(self) -> float:
        """J at the current values of the numpy arrays (the core's loss closure)."""
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
        """The core's exact restore of a moved tensor (see `_Shadow.restore_tensor`)."""
        self.shadow.restore_tensor(name)


class _AccumulatedInParts(Exception):
    """A parameter's gradient arrived in several accumulations (reentrant checkpointing)."""


class _ShadowGradients:
    """The autograd gradient of J on the shadow, as a `gradwatch.params.GradientSource`.

    Each visit runs one backward pass from the same RNG state as every evaluation; a
    hook hands each parameter's gradient to the check the moment autograd has
    accumulated it, then drops it. So the whole float64 gradient is never held: the
    check keeps norms, projections and the components it compares. The first visit's
    findings (missing gradients, J not depending on the parameters) become notes.

    Where a gradient arrives in parts (a parameter used in two reentrant checkpoint
    segments is accumulated once per segment) the hook raises `_AccumulatedInParts`
    and ``check_module`` checks again with ``hold=True``: every gradient is kept
    until the backward pass ends, as one float64 copy.
    """

    def __init__(
        self, objective: _Objective, hold: bool = False, largest: dict[str, int] | None = None
    ) -> None:
        self.objective = objective
        self.hold = hold
        self.notes: list[str] = []
        self.largest: dict[str, int] = {} if largest is None else largest
        """Flat index of each visited tensor's largest gradient entry (the batched probe)."""
        self.visits = 0

    def visit(
        self, names: Sequence[str], consume: Callable[[str, npt.NDArray[np.floating]], None]
    ) -> None:
        shadow = self.objective.shadow
        wanted = set(names)
        delivered: set[str] = set()
        dtype = shadow.arrays_dtype()

        def hand_over(name: str, gradient: torch.Tensor) -> None:
            array = _to_numpy(gradient).astype(dtype, copy=False)
            self.largest[name] = _largest_entry(array)
            delivered.add(name)
            consume(name, array)

        def make_hook(name: str) -> Callable[[torch.Tensor], None]:
            def hook(parameter: torch.Tensor) -> None:
                if name in delivered:
                    raise _AccumulatedInParts(name)
                if parameter.grad is not None and name in wanted:
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
                for name in names:
                    gradient = shadow.params[name].grad
                    if gradient is not None:
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
            if not total.requires_grad:
                self.notes.append("J does not depend on any trainable parameter through autograd")
            elif missing:
                self.notes.append(
                    "no gradient (.grad is None after backward), compared as zeros: "
                    + ", ".join(missing)
                )
        self.visits += 1


def _largest_entry(gradient: npt.NDArray[np.floating]) -> int:
    """Flat index of the entry largest in magnitude (no temporary |gradient|)."""
    if gradient.size == 0:
        return 0
    high, low = int(gradient.argmax()), int(gradient.argmin())
    flat = gradient.reshape(-1)
    return high if abs(flat[high]) >= abs(flat[low]) else low


# --------------------------------------------------------------------------- batched evaluation


PERTURBATION_BUDGET = 16 * 2**20
"""Bytes of perturbed copies of one tensor that a vmapped call may hold."""
ACTIVATION_BUDGET = 64 * 2**20
"""Bytes of module outputs (one forward's, times the chunk) that a vmapped call may hold."""
MAX_CHUNK = 256
"""Most perturbations per vmapped call; larger chunks stop paying on a CPU."""
MIN_BATCH = 16
"""Fewer perturbations of a tensor than this are evaluated one by one (vmap's setup
costs about as much as a dozen small forwards)."""
_PROBE_TOLERANCE = 256
"""Batched and sequential J may differ by this many units of roundoff (matmul order)."""


class _JModule(nn.Module):
    """J as a module over the shadow's parameters, for `torch.func.functional_call`."""

    def __init__(self, objective: _Objective) -> None:
        super().__init__()
        self.model = objective.shadow.module
        self.objective = objective

    def forward(self) -> torch.Tensor:
        return self.objective.total(self.model)


class _BatchedObjective:
    """The objective plus ``evaluate_batch``: many perturbations of a tensor per call.

    ``evaluate_batch`` builds a chunk of perturbed copies of one tensor and
    evaluates J on all of them at once with ``torch.func.vmap`` over
    ``functional_call``: one forward of the whole chunk instead of one per
    perturbation. It falls back to perturbing in place one by one (and says why in
    ``notes``) where vmap cannot give the sequential numbers: randomness in J
    (dropout in train mode draws differently under vmap), BatchNorm in train mode
    (running-stat updates), vmap raising, or a probe where the batched J of a
    tensor disagrees with the sequential one (a forward that reads the parameter
    around ``functional_call``).
    """

    def __init__(self, objective: _Objective, largest: Mapping[str, int]) -> None:
        self.objective = objective
        self._module = _JModule(objective)
        self._largest = largest
        """Flat index of each tensor's largest gradient entry, where the probe moves."""
        self.unavailable: str | None = None
        self.disagreeing: list[str] = []
        self.largest_chunk = 0
        self._probed: set[str] = set()
        self._availability_known = False
        self._activation_bytes = 0
        """Bytes of module outputs in one forward; 0 until measured on the first probe."""

    def __call__(self) -> float:
        return self.objective()

    def restore_tensor(self, name: str) -> None:
        self.objective.restore_tensor(name)

    def evaluate_batch(
        self, tensor: str, flat_indices: npt.NDArray[np.intp], values: npt.NDArray[np.floating]
    ) -> npt.NDArray[np.float64]:
        """J with ``tensor.flat[flat_indices[k]] = values[k]`` alone, for every k."""
        if len(flat_indices) < MIN_BATCH:  # a vmapped call would cost more than it saves
            return self._one_by_one(tensor, flat_indices, values)
        held = self.objective.shadow.held_ranges.get(tensor)
        if held is not None:
            # ShadowMode holds a padding row in the lookup by the tensor's identity, which
            # a vmapped copy does not have: that row's perturbations go one by one.
            in_row = (flat_indices >= held[0]) & (flat_indices < held[1])
            if in_row.any():
                out = np.empty(len(flat_indices))
                out[in_row] = self._one_by_one(tensor, flat_indices[in_row], values[in_row])
                rest = ~in_row
                if rest.any():
                    out[rest] = self.evaluate_batch(tensor, flat_indices[rest], values[rest])
                return out
        if not self._availability_known:  # the first batch: J has been evaluated by now
            self.unavailable = _batched_unavailable(self.objective)
            self._availability_known = True
        if self.unavailable is None and tensor not in self.disagreeing:
            try:
                return self._vmapped_and_probed(tensor, flat_indices, values)
            except Exception as error:
                self.unavailable = _vmap_failure(error)
        return self._one_by_one(tensor, flat_indices, values)

    def notes(self) -> list[str]:
        if not self._probed and self.unavailable is None:
            return []  # no batch large enough to vmap (directional, or few per tensor)
        if self.unavailable is not None:
            return [f"batched evaluation unavailable: {self.unavailable}; sequential"]
        notes = [
            f"batched evaluation: torch.func.vmap, up to {self.largest_chunk} perturbations "
            "per call"
        ]
        if self.disagreeing:
            notes.append(
                "batched J disagreed with the sequential one on a probe for "
                + ", ".join(self.disagreeing)
                + " (a forward that reads them around functional_call?); those sequential"
            )
        return notes

    def _one_by_one(
        self, tensor: str, flat_indices: npt.NDArray[np.intp], values: npt.NDArray[np.floating]
    ) -> npt.NDArray[np.float64]:
        view = self.objective.shadow.arrays[tensor].reshape(-1)
        out = np.empty(len(flat_indices))
        for k, (j, value) in enumerate(zip(flat_indices.tolist(), values, strict=True)):
            old = view[j]
            try:
                view[j] = value
                out[k] = self.objective()
            finally:
                view[j] = old
        return out

    def _vmapped_and_probed(
        self, tensor: str, flat_indices: npt.NDArray[np.intp], values: npt.NDArray[np.floating]
    ) -> npt.NDArray[np.float64]:
        """The vmapped values; the first batch of a tensor carries one probe more.

        The probe moves the component with the largest gradient by 1e-3 (relative)
        and is evaluated one by one too: a batched forward that ignores the swapped
        tensor, or computes something else, shows as a disagreement beyond roundoff,
        and the tensor is then evaluated one by one.
        """
        if tensor in self._probed:
            return self._vmapped(tensor, flat_indices, values)
        self._probed.add(tensor)
        array = self.objective.shadow.arrays[tensor]
        j = self._largest.get(tensor, 0)
        old = float(array.reshape(-1)[j])
        probe_index = np.array([j], dtype=np.intp)
        probe_value = np.array([old + 1e-3 * max(1.0, abs(old))], dtype=array.dtype)
        if not self._activation_bytes:
            with _output_bytes(self.objective) as measured:
                sequential = float(self._one_by_one(tensor, probe_index, probe_value)[0])
            self._activation_bytes = max(measured[0], 1)
        else:
            sequential = float(self._one_by_one(tensor, probe_index, probe_value)[0])
        results = self._vmapped(
            tensor,
            np.concatenate([flat_indices, probe_index]),
            np.concatenate([values, probe_value]),
        )
        batched = float(results[-1])
        roundoff = float(np.finfo(array.dtype).eps) * max(abs(sequential), abs(batched))
        if abs(batched - sequential) > _PROBE_TOLERANCE * roundoff:
            self.disagreeing.append(tensor)
            return self._one_by_one(tensor, flat_indices, values)
        return results[:-1]

    def _vmapped(
        self, tensor: str, flat_indices: npt.NDArray[np.intp], values: npt.NDArray[np.floating]
    ) -> npt.NDArray[np.float64]:
        shadow = self.objective.shadow
        shadow.sync()
        parameter = shadow.params[tensor]
        base = parameter.detach().reshape(-1)
        device = base.device
        chunk = self._chunk_size(base)
        self.largest_chunk = max(self.largest_chunk, min(chunk, len(flat_indices)))
        key = f"model.{tensor}"

        def j_of(perturbed: torch.Tensor) -> torch.Tensor:
            j: torch.Tensor = torch.func.functional_call(self._module, {key: perturbed}, ())
            return j

        evaluate = torch.func.vmap(j_of, randomness="error")
        index = torch.from_numpy(np.asarray(flat_indices, dtype=np.int64)).to(device)
        value = torch.from_numpy(np.asarray(values)).to(device=device, dtype=base.dtype)
        results = []
        with torch.no_grad(), warnings.catch_warnings():
            # vmap warns when an op (CPU flash attention) has no batching rule and runs in
            # a loop: still the sequential numbers, and not the user's concern.
            warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
            for start in range(0, len(index), chunk):
                rows = index[start : start + chunk]
                perturbed = base.expand(len(rows), -1).clone()
                perturbed[torch.arange(len(rows), device=device), rows] = value[
                    start : start + chunk
                ]
                results.append(evaluate(perturbed.view(len(rows), *parameter.shape)))
        return torch.cat(results).to(torch.float64).cpu().numpy()

    def _chunk_size(self, base: torch.Tensor) -> int:
        by_copies = PERTURBATION_BUDGET // max(base.numel() * base.element_size(), 1)
        by_outputs = ACTIVATION_BUDGET // max(self._activation_bytes, 1)
        return max(1, min(MAX_CHUNK, by_copies, by_outputs))


def _batched_unavailable(objective: _Objective) -> str | None:
    """Why J cannot be vmapped with the sequential numbers, or None."""
    modules = [(name or type(m).__name__, m) for name, m in objective.shadow.module.named_modules()]
    stochastic = [name for name, m in modules if m.training and _draws_in_train_mode(m)]
    if stochastic:
        return (
            f"stochastic modules in train mode ({', '.join(stochastic)}): vmap cannot "
            "replay their draws"
        )
    norms = [
        name
        for name, m in modules
        if m.training and isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]
    if norms:
        return (
            f"BatchNorm in train mode ({', '.join(norms)}): its running-stat updates "
            "cannot be vmapped"
        )
    if objective.replay:
        return f"J draws from the {', '.join(sorted(objective.replay))} RNG"
    return None


def _draws_in_train_mode(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    return isinstance(module, nn.RReLU)


def _nbytes(value: Any) -> int:
    """Bytes of the tensors in a nested output."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, Mapping):
        return sum(_nbytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(item) for item in value)
    return 0


def _vmap_failure(error: Exception) -> str:
    """Why vmap could not run J, in a sentence (no URL cut in the middle)."""
    text = str(error)
    if "setup_context" in text:
        return (
            "an autograd.Function in the classic style (forward(ctx, ...)) cannot run under "
            "torch.func.vmap; give it a setup_context staticmethod and "
            "generate_vmap_rule = True for the fast path"
        )
    first_line = (text.strip().splitlines() or [""])[0]
    first_line = re.sub(r"\s*(For more details, )?[Pp]lease see https?://\S+", "", first_line)
    first_line = re.sub(r"https?://\S+", "", first_line).strip()
    if len(first_line) > 200:
        first_line = first_line[:200].rsplit(" ", 1)[0] + " ..."
    return f"vmap raised {type(error).__name__}: {first_line}"


@contextmanager
def _output_bytes(objective: _Objective) -> Iterator[list[int]]:
    """Sum the bytes of every module output (and of the batch) while inside."""
    measured = [_nbytes(objective._batch)]

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        measured[0] += _nbytes(output)

    handles = [m.register_forward_hook(hook) for m in objective.shadow.module.modules()]
    try:
        yield measured
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- the check


def weight_decay_notes(optimizer: Any) -> list[str]:
    """What the optimizer's weight decay means for the check, one note per kind found.

    Coupled decay (``SGD``/``Adam``/... ``weight_decay``) adds λθ inside
    ``optimizer.step()``: it is not in ``.grad`` and not in J. Decoupled decay
    (``AdamW``) shrinks θ in the update and is not part of any gradient. Wrappers
    (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``) are
    looked through.
    """
    inner = optimizer
    for _ in range(4):
        wrapped = getattr(inner, "optimizer", None)
        if wrapped is None or wrapped is inner:
            break
        inner = wrapped
    groups = getattr(inner, "param_groups", None)
    if not groups:
        return []
    decays = sorted({float(g.get("weight_decay", 0.0) or 0.0) for g in groups} - {0.0})
    kind = type(inner).__name__
    if not decays:
        return [f"optimizer {kind}: no weight decay"]
    values = ", ".join(f"{d:g}" for d in decays)
    if isinstance(inner, torch.optim.AdamW) or any(g.get("decoupled_weight_decay") for g in groups):
        return [
            f"optimizer {kind}: decoupled weight decay ({values}) is applied in the update, "
            "not part of the gradient; it is not in J"
        ]
    return [
        f"optimizer {kind}: coupled weight decay ({values}) is added to the gradient inside "
        "optimizer.step(), not in .grad; it is not in J (pass a regularization penalty to "
        "check it)"
    ]


def check_module(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    regularization: Penalties = (),
    optimizer: Any = None,
    precision: Precision = "float64",
    analytic: Analytic = "recompute",
    batched: bool = True,
    notes: Sequence[str] = (),
    **check_options: Any,
) -> CheckResult:
    """Check the gradient of ``loss_fn(model, batch)`` + penalties for ``model``'s parameters.

    Args:
        model: the module; never modified (parameters, ``.grad``, buffers, modes).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the data part of J.
        batch: whatever ``loss_fn`` takes; floating tensors in it are cast to the
            shadow's dtype.
        regularization: penalties ``(model) -> scalar tensor`` (a sequence, or a
            mapping name -> penalty), part of J on both sides: in the autograd pass
            and in every numeric evaluation. Recorded in the result by name and value.
        optimizer: when given, the notes say whether its weight decay is coupled or
            decoupled (neither is in J).
        precision: ``"float64"`` (default) runs on a float64 copy; ``"native"`` keeps
            the model's dtype (float32/float16): the core picks the step from the
            dtype and multiplies ``warn`` and ``threshold`` by
            ``gradwatch.check.TOLERANCE_SCALE[dtype]``, and the notes say so.
        analytic: ``"recompute"`` (default) compares the numeric gradient with autograd
            on the shadow; ``"live"`` compares it with the model's own ``.grad`` as it
            is now (finds missing ``zero_grad``, wrong accumulation scaling; a
            parameter whose ``.grad`` is None is compared as zeros and noted).
        batched: evaluate the perturbations of each tensor in chunks with
            ``torch.func.vmap`` (the same numbers, several times faster on small
            models). Where J cannot be vmapped (dropout or BatchNorm in train mode,
            randomness in J, vmap raising) the check runs one by one and the notes
            say why. False always runs one by one.
        notes: extra lines for the result's notes (e.g. from a framework callback).
        **check_options: passed to `gradwatch.check` (``eps``, ``sample``, ``seed``,
            ``top_k``, ``warn``, ``threshold``, ``diagnose``).

    Returns:
        The `CheckResult`; its ``regularization`` holds the penalties' values and its
        ``notes`` the precision, missing gradients, weight decay and ``notes``.

    Example:
        >>> import torch
        >>> from gradwatch.integrations.torch import check_module
        >>> net = torch.nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> result = check_module(net, lambda m, x: m(x).square().mean(), x)
        >>> result.status, result.size
        ('ok', 8)
    """
    if not isinstance(model, nn.Module):
        raise OptionError(f"model: expected a torch.nn.Module, received {type(model).__name__}")
    if not callable(loss_fn):
        raise OptionError(
            f"loss_fn: expected a callable (model, batch) -> scalar tensor, "
            f"received {type(loss_fn).__name__}"
        )
    if precision not in ("float64", "native"):
        raise OptionError(f"precision: expected 'float64' or 'native', received {precision!r}")
    if analytic not in ("recompute", "live"):
        raise OptionError(f"analytic: expected 'recompute' or 'live', received {analytic!r}")
    if not isinstance(batched, bool):
        raise OptionError(f"batched: expected True or False, received {batched!r}")
    penalties = _penalty_items(regularization)
    if not trainable_parameters(model):
        raise ParameterError(
            f"model: expected at least one parameter with requires_grad=True, "
            f"received {type(model).__name__} with none"
        )
    options = dict(check_options)
    with _untouched_globals(model) as rng:
        run = _ShadowCheck(model, loss_fn, batch, penalties, rng, analytic, batched, options)
        try:
            result = run.check(precision)
            fallback = run.coarse_reason() if precision == "float64" else None
        except Exception as error:
            if isinstance(error, GradwatchError) or not run.can_fall_back(precision):
                raise  # misuse (no loss, a bad shape) is the same in any precision
            fallback = f"J on the float64 copy raised {type(error).__name__}: {_first_line(error)}"
        if fallback is not None:
            rng.restore()
            try:
                result = run.check("native")
            except Exception as error:
                error.add_note(f"gradwatch checked on a float64 copy first: {fallback}")
                raise
            run.notes.insert(
                0,
                f"{fallback}; checked in the model's own {_dtype_name(run.shadow.dtype)} "
                "instead, with that dtype's step and thresholds",
            )
    if optimizer is not None:
        run.notes.extend(weight_decay_notes(optimizer))
    penalty_values = run.penalty_values
    if penalties:
        run.notes.append("penalties in J (both sides): " + ", ".join(penalty_values))
    else:
        run.notes.append("penalties in J: none")
    return result.model_copy(
        update={
            "regularization": {**result.regularization, **penalty_values},
            "notes": [*result.notes, *notes, *run.notes],
        }
    )


class _ShadowCheck:
    """One check of J on a shadow of ``model`` in a given precision, and what it found.

    After a float64 check, `coarse_reason` says whether J really came out in float64:
    where an op the `ShadowMode` could not answer turned float64 into float32, or J's
    value is exact in float32, the float64 check judged the gradient on a J rounded
    to float32, and ``check_module`` checks again in the model's own precision.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        penalties: list[tuple[str, Penalty]],
        rng: RngState,
        analytic: Analytic,
        batched: bool,
        options: dict[str, Any],
    ) -> None:
        self.model, self.loss_fn, self.batch, self.penalties = model, loss_fn, batch, penalties
        self.rng, self.analytic, self.batched, self.options = rng, analytic, batched, options
        self.notes: list[str] = []
        self.penalty_values: dict[str, float] = {}

    def can_fall_back(self, precision: Precision) -> bool:
        """True when a float64 check of a float32/float16 model could run natively instead."""
        native = _floating_dtype(self.model)
        return precision == "float64" and native != torch.float64 and native in NATIVE_DTYPES

    def check(self, precision: Precision) -> CheckResult:
        self.shadow = shadow = _Shadow(self.model, precision)
        self.mode = ShadowMode(shadow.dtype, shadow.held_padding_rows())
        objective = _Objective(shadow, self.loss_fn, self.batch, self.penalties, self.rng)
        notes: list[str] = []
        grads: _ShadowGradients | dict[str, npt.NDArray[np.floating]]
        if self.analytic == "recompute":
            grads = _ShadowGradients(objective)
            largest: Mapping[str, int] = grads.largest
        else:
            grads, grad_notes = module_gradients(self.model, shadow.arrays_dtype())
            largest = {name: _largest_entry(g) for name, g in grads.items()}
            notes.append(
                "live: analytic gradient is the model's .grad (after accumulation and any "
                "clipping done before this point), numeric gradient is of J on this batch"
            )
            notes.extend(grad_notes)
        notes.extend(_precision_notes(shadow))
        loss = _BatchedObjective(objective, largest) if self.batched else objective
        options = self.options
        with self.mode, torch.inference_mode():
            try:
                result = gradwatch.check(loss, shadow.arrays, grads, **options)
            except _AccumulatedInParts as parts:
                assert isinstance(grads, _ShadowGradients)
                grads = _ShadowGradients(objective, hold=True, largest=grads.largest)
                result = gradwatch.check(loss, shadow.arrays, grads, **options)
                notes.append(
                    f"the gradient of {parts} arrived in parts (reentrant checkpointing?): "
                    "checked again holding the whole gradient until each backward pass ends"
                )
            stray = objective.stray_draws()
            if stray:  # drawn at some evaluations only: replay everything, one by one
                objective.replay = frozenset(GENERATORS)
                result = gradwatch.check(objective, shadow.arrays, grads, **options)
                notes.append(
                    f"J drew from the {', '.join(sorted(stray))} RNG at some evaluations "
                    "only; checked again replaying every generator at every evaluation"
                )
            elif isinstance(loss, _BatchedObjective):
                notes.extend(loss.notes())
            self.penalty_values = objective.penalty_values()
        notes.extend(_mode_notes(self.mode, shadow))
        if isinstance(grads, _ShadowGradients):
            notes.extend(grads.notes)
            kept = (
                "the whole gradient held until each pass ends"
                if grads.hold
                else "each tensor's gradient read as it arrives and dropped (never held whole)"
            )
            notes.append(
                f"analytic gradient: autograd on the shadow, {grads.visits} backward pass(es), "
                f"{kept}"
            )
        self.notes = notes
        self.loss = result.loss
        return result

    def coarse_reason(self) -> str | None:
        """Why J of the last check was coarser than its shadow, or None."""
        native = _floating_dtype(self.model)
        if not self.can_fall_back("float64") or self.shadow.dtype != torch.float64:
            return None
        if self.mode.coarse_ops:
            return (
                "J came out coarser than float64 (float32 made by "
                + ", ".join(self.mode.coarse_ops)
                + ": a cast gradwatch cannot answer, or a kernel without float64), so a "
                "float64 check would read its rounding as a bug"
            )
        if _rounded_to(self.loss, native):
            name = _dtype_name(native)
            return (
                f"J came out rounded to {name} (its value is exact in {name}: computed "
                "outside torch, or by a kernel gradwatch cannot see into), so a float64 check "
                "would read its rounding as a bug"
            )
        return None


def _rounded_to(value: float, dtype: torch.dtype) -> bool:
    """True when a float64 J is exactly a ``dtype`` number: by chance about once in 2^29
    for float32, so J was rounded to ``dtype`` on its way out."""
    if value == 0.0 or not math.isfinite(value):
        return False
    return float(torch.tensor(value, dtype=torch.float64).to(dtype).double()) == value


def _mode_notes(mode: ShadowMode, shadow: _Shadow) -> list[str]:
    notes = []
    if shadow.held_ranges:
        notes.append(
            "padding_idx rows held constant inside the embedding lookup only (torch gives the "
            "lookup no gradient there; a tied head still trains them): "
            + ", ".join(
                f"{name}[{start // (stop - start)}]"
                for name, (start, stop) in shadow.held_ranges.items()
            )
        )
    if mode.replaced_ops:
        notes.append(
            f"no {_dtype_name(shadow.dtype)} kernel for {', '.join(mode.replaced_ops)}: "
            f"ran as gradwatch's reference implementation in {_dtype_name(shadow.dtype)}"
        )
    if mode.fallback_ops:
        notes.append(
            f"no {_dtype_name(shadow.dtype)} kernel for {', '.join(mode.fallback_ops)}: "
            "ran in float32"
        )
    if mode.coarse_ops:
        notes.append(
            f"J is partly coarser than {_dtype_name(shadow.dtype)} (made by "
            f"{', '.join(mode.coarse_ops)}): its roundoff limits the resolution of the check"
        )
    return notes


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _precision_notes(shadow: _Shadow) -> list[str]:
    """Say which precision J was evaluated in (the core scales warn/threshold by dtype)."""
    if shadow.dtype == torch.float64:
        if shadow.native_dtype != torch.float64:
            return [f"float64 shadow of a {_dtype_name(shadow.native_dtype)} model"]
        return []
    return [f"native precision {_dtype_name(shadow.dtype)}: step and thresholds from the dtype"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- training loops


class BatchCapture:
    """Holds the last inputs of ``model.forward``, seen by a forward pre-hook.

    Trainer callbacks never receive the batch; this hook does (``with_kwargs=True``,
    so ``model(**inputs)`` is captured too). It keeps references only, and only
    while ``armed`` (the framework arms it for due steps), and ignores eval-mode
    forwards and the check's own shadow.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.armed = False
        self.args: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] | None = None
        self.loss_inputs: Any = None
        """What the trainer's loss function received, when a framework captures it too."""
        self.forwards: list[tuple[tuple[Any, ...], dict[str, Any], RngState]] = []
        """Every training forward of the armed step: its inputs and the RNG state it began
        from (so the step check can replay each micro-batch's dropout draws)."""
        self.autocast: torch.dtype | None = None
        """The autocast dtype a training forward of the armed step ran under, if any."""
        self.squared_norms: dict[str, float] = {}
        """Each parameter's ||.grad||^2 after its last accumulation: before any clipping."""
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._make_hook(), with_kwargs=True)
        ]
        for name, parameter in trainable_parameters(model).items():
            self._handles.append(
                parameter.register_post_accumulate_grad_hook(self._make_norm_hook(name))  # type: ignore[no-untyped-call]
            )

    def _make_hook(
        self,
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        # A closure, not a bound method: copy.deepcopy of the model (the shadow)
        # copies the hook table, and must not copy this object along with it.
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.armed and module.training and module is self.model:
                self.args, self.kwargs = args, dict(kwargs)
                self.forwards.append((args, dict(kwargs), RngState.capture()))
                self.autocast = self.autocast or _autocast_dtype(module)

        return hook

    def _make_norm_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(parameter: torch.Tensor) -> None:
            if self.armed and parameter.grad is not None:
                self.squared_norms[name] = float(parameter.grad.detach().double().square().sum())

        return hook

    @property
    def captured(self) -> bool:
        return self.kwargs is not None

    def clip_factor(self, max_norm: float) -> float:
        """The factor a norm clip to ``max_norm`` applied to ``.grad`` since backward.

        1 when the gradient's norm is below ``max_norm`` (no clip), else the ratio of
        the norm now to the norm the hooks saw right after backward.
        """
        now = math.sqrt(
            sum(
                float(p.grad.detach().double().square().sum())
                for p in trainable_parameters(self.model).values()
                if p.grad is not None
            )
        )
        before = math.sqrt(sum(self.squared_norms.values()))
        if max_norm <= 0 or before <= 0 or now < max_norm * (1 - 1e-4):
            return 1.0
        return now / before

    def clear(self) -> None:
        self.args = self.kwargs = self.loss_inputs = None
        self.autocast = None
        self.forwards = []
        self.squared_norms = {}

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


def _autocast_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype autocast runs ``module``'s device in right now, or None when it is off."""
    parameter = next(module.parameters(), None)
    device = "cpu" if parameter is None else parameter.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def check_due(
    watch: GradWatch,
    step: int,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    optimizer: Any = None,
    regularization: Penalties = (),
    precision: Precision = "float64",
    analytic: Analytic = "recompute",
    notes: Sequence[str] = (),
    step_batches: Sequence[MicroBatch] | None = None,
    step_loss_fn: LossFn | None = None,
    clip_factor: float = 1.0,
) -> CheckResult:
    """Run `check_module` with the watch's options and record it (report, logs, alert).

    With ``step_batches`` the check also compares the model's ``.grad`` (divided by
    ``clip_factor``) with the float64 gradient of J = sum_i w_i step_loss_fn(model, b_i)
    over those micro-batches (`gradwatch.integrations._step.compare_step`): the result's
    ``step_link``, whose failure fails the check.

    An exception inside the check is recorded as a check with status ``error`` and
    training goes on (``GradWatch(on_error="raise")`` raises it after recording).

    Raises:
        GradientCheckError: the check failed and the watch has ``on_alert="raise"``.
    """

    def compute() -> CheckResult:
        result = check_module(
            model,
            loss_fn,
            batch,
            regularization=regularization,
            optimizer=optimizer,
            precision=precision,
            analytic=analytic,
            notes=notes,
            **watch.check_options(),
        )
        if step_batches:
            from gradwatch.integrations._step import compare_step, with_step_link

            link = compare_step(
                model, step_loss_fn or loss_fn, step_batches, clip_factor=clip_factor
            )
            result = with_step_link(result, link)
        return result

    return watch.run_check(
        step,
        compute,
        source="gradwatch.integrations.torch.check_module (J on gradwatch's copy of the model)",
    )


def after_backward(
    watch: GradWatch,
    step: int,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    optimizer: Any = None,
    regularization: Penalties = (),
    precision: Precision = "float64",
    analytic: Analytic = "recompute",
    step_check: bool = False,
    rng: RngState | None = None,
    clip_factor: float = 1.0,
) -> CheckResult | None:
    """The plain-loop hook for torch: call after ``loss.backward()``, before ``optimizer.step()``.

    The torch counterpart of ``GradWatch.after_backward``: when ``watch.due(step)``
    (``step`` = updates completed before this one), checks ``model`` on ``batch``
    with `check_module` and records the result; otherwise returns None at once.
    Training is not changed either way.

    ``step_check=True`` also compares the model's ``.grad`` (what the optimizer will
    use; divided by ``clip_factor`` if you clipped) with the float64 gradient of
    ``loss_fn(model, batch)``: a missing ``zero_grad``, a gradient hook, a loss scaled
    twice fail that link (``result.step_link``). When the forward draws random numbers
    (dropout), pass ``rng=RngState.capture()`` taken just before the training forward,
    so the same masks are replayed.
    """
    if not watch.due(step):
        return None
    step_batches = None
    if step_check:
        from gradwatch.integrations._step import MicroBatch

        step_batches = [MicroBatch(batch, 1.0, rng)]
    return check_due(
        watch,
        step,
        model,
        loss_fn,
        batch,
        optimizer=optimizer,
        regularization=regularization,
        precision=precision,
        analytic=analytic,
        step_batches=step_batches,
        clip_factor=clip_factor,
    )


STATUS_CODES: dict[str, int] = {
    "ok": 0,
    "warn": 1,
    "fail": 2,
    "nondeterministic": 3,
    "error": 4,
}
"""``gradwatch/status`` as a number, for metric loggers that only take scalars."""


def result_metrics(result: CheckResult) -> dict[str, float]:
    """The scalars a trainer logs after a check (TensorBoard, W&B, CSV...)."""
    return {
        "gradwatch/ratio": float(result.ratio),
        "gradwatch/status": float(STATUS_CODES[result.status]),
        "gradwatch/alert": float(result.failed),
        "gradwatch/checked": float(result.checked),
        "gradwatch/seconds": float(result.seconds),
    }


def check_step_notes(accumulation_steps: int) -> list[str]:
    """Notes every framework check carries about which batch J is on."""
    if accumulation_steps > 1:
        return [
            f"gradient accumulation over {accumulation_steps} micro-batches: the finite-"
            "difference check covers the step's last micro-batch, the step link all of them"
        ]
    return []


class TrainingWatch:
    """The base of the framework callbacks (Trainer and Lightning): their options and torch side.

    Holds the core `GradWatch` (``watch``: schedule, report, alerts) and what J is
    (``loss_fn``, ``regularization``, ``precision``); a framework callback subclasses
    it and only says when (`start`, `due`, `check`, `finish`) and on which batch.
    """

    def __init__(
        self,
        every: int = 500,
        *,
        loss_fn: LossFn | None = None,
        regularization: Penalties = (),
        precision: Precision = "float64",
        report_dir: str | os.PathLike[str] | None = None,
        sample: Sample = "auto",
        eps: float | None = None,
        threshold: float = 1e-3,
        warn: float = 1e-5,
        top_k: int = 10,
        seed: int = 0,
        on_alert: OnAlert = "log",
        on_error: OnError = "record",
        budget: float | None = None,
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise OptionError(
                f"loss_fn: expected None or a callable (model, batch) -> scalar tensor, "
                f"received {type(loss_fn).__name__}"
            )
        if precision not in ("float64", "native"):
            raise OptionError(f"precision: expected 'float64' or 'native', received {precision!r}")
        _penalty_items(regularization)
        self.loss_fn = loss_fn
        self.regularization = regularization
        self.precision: Precision = precision
        self.report_dir = None if report_dir is None else Path(report_dir)
        self._options: dict[str, Any] = {
            "every": every,
            "sample": sample,
            "eps": eps,
            "threshold": threshold,
            "warn": warn,
            "top_k": top_k,
            "seed": seed,
            "on_alert": on_alert,
            "on_error": on_error,
            "budget": budget,
        }
        self.watch = self._new_watch()  # validates the options now, not at train begin
        self.notes: list[str] = []
        self._finished = False

    @property
    def results(self) -> list[CheckResult]:
        """The checks recorded in the current (or last) run."""
        return self.watch.results

    def __repr__(self) -> str:
        framework = type(self).__module__.rsplit(".", 1)[-1]
        return f"{framework}.{self.watch!r}"

    def _new_watch(self) -> GradWatch:
        from gradwatch.callback import GradWatch

        options = dict(self._options)
        return GradWatch(options.pop("every"), report_dir=None, **options)

    def start(
        self,
        default_dir: str | os.PathLike[str],
        *,
        writer: bool,
        context: Mapping[str, Any],
        notes: Sequence[str],
    ) -> None:
        """Open the report (``report_dir`` or ``default_dir``); a second fit starts a new watch."""
        if self._finished:
            self.watch = self._new_watch()
            self._finished = False
        directory = self.report_dir if self.report_dir is not None else Path(default_dir)
        self.watch.open(directory, write=writer)
        self.watch.set_context(precision=self.precision, **context)
        self.notes = list(notes)
        for note in self.notes:
            self.watch.note(note)

    def due(self, step: int) -> bool:
        return self.watch.due(step)

    def check(
        self,
        step: int,
        model: nn.Module,
        default_loss_fn: LossFn,
        batch: Any,
        *,
        optimizer: Any = None,
        step_batches: Sequence[MicroBatch] | None = None,
        step_loss_fn: LossFn | None = None,
        clip_factor: float = 1.0,
    ) -> CheckResult:
        """Check and record (raises `GradientCheckError` with ``on_alert="raise"``).

        ``step_batches``: the step's micro-batches for the step link, J on each being
        ``step_loss_fn`` (default: ``default_loss_fn``; see `check_due`).
        """
        return check_due(
            self.watch,
            step,
            model,
            self.loss_fn if self.loss_fn is not None else default_loss_fn,
            batch,
            optimizer=optimizer,
            regularization=self.regularization,
            precision=self.precision,
            notes=self.notes,
            step_batches=step_batches,
            step_loss_fn=step_loss_fn or default_loss_fn,
            clip_factor=clip_factor,
        )

    def finish(self) -> None:
        """Close the report."""
        if not self._finished:
            self.watch.close()
            self._finished = True
