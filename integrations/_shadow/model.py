"""The float64 shadow of a model and the restore of every global a check touches.

A check never touches the model: `Shadow` deep-copies it (float64 by default) with
trainable parameters that are views of numpy arrays, so the core's in-place
perturbation of one component is what the shadow's next forward sees, and a moved
tensor is restored exactly from the model's own values. `RngState` forks every
global random generator and puts it back; `untouched_globals` also restores torch's
process-wide settings (`_SETTINGS`: default dtype, grad mode, threads, deterministic
algorithms, anomaly detection, matmul precision, backend flags) and the modules'
train/eval modes, also when an interrupt ends the check.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from gradwatch.integrations._shadow.mode import HeldRow, ShadowMode
from torch import nn

from gradwatch.engine.uninterrupted import restored_after
from gradwatch.errors import OptionError, ParameterError

__all__ = [
    "GENERATORS",
    "NATIVE_DTYPES",
    "Generator",
    "Precision",
    "RngState",
    "check_precision",
    "is_shadow",
    "module_gradients",
    "trainable_parameters",
]

Precision = Literal["float64", "native"]
Generator = Literal["python", "numpy", "torch", "cuda"]
GENERATORS: tuple[Generator, ...] = ("python", "numpy", "torch", "cuda")

NATIVE_DTYPES = (torch.float64, torch.float32, torch.float16)
"""Dtypes ``precision="native"`` can check: numpy must hold the parameters. The core
scales ``warn`` and ``threshold`` for float32 / float16 (``gradwatch.check.TOLERANCE_SCALE``)."""

# --------------------------------------------------------------------------- parameters


def check_precision(precision: object) -> Precision:
    """``precision`` as given, once it is one of the two a check runs in."""
    if precision == "float64" or precision == "native":
        return precision
    raise OptionError(f"precision: expected 'float64' or 'native', received {precision!r}")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a check covers: ``model.named_parameters()`` with ``requires_grad``.

    Frozen parameters (``requires_grad=False``) are left out; a parameter shared by
    two modules (tied weights) appears once, under its first name.
    """
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def module_gradients(
    model: nn.Module, dtype: npt.DTypeLike = np.float64
) -> tuple[dict[str, npt.NDArray[np.floating]], list[str]]:
    """The ``.grad`` of each trainable parameter as a numpy array, plus notes.

    A parameter whose ``.grad`` is None (unused in the forward, or a path cut by
    ``.detach()``) gets zeros and a note naming it, instead of an error: if the
    true gradient is not zero the check then fails on that tensor.
    """
    grads: dict[str, npt.NDArray[np.floating]] = {}
    missing: list[str] = []
    for name, p in trainable_parameters(model).items():
        if p.grad is None:
            missing.append(name)
            grads[name] = np.zeros(tuple(p.shape), dtype=dtype)
        else:
            grads[name] = to_numpy(p.grad).astype(dtype)
    return grads, [missing_gradients_note(missing)] if missing else []


def missing_gradients_note(names: Sequence[str]) -> str:
    """The note naming parameters that got no gradient (compared as zeros)."""
    return "no gradient (.grad is None after backward), compared as zeros: " + ", ".join(names)


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


_SETTINGS: tuple[tuple[str, Callable[[], Any], Callable[[Any], object]], ...] = (
    ("default dtype", torch.get_default_dtype, torch.set_default_dtype),
    ("grad mode", torch.is_grad_enabled, torch.set_grad_enabled),
    ("threads", torch.get_num_threads, torch.set_num_threads),
    (
        "deterministic algorithms",
        lambda: (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        lambda value: torch.use_deterministic_algorithms(value[0], warn_only=value[1]),
    ),
    (
        "anomaly detection",
        lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        lambda value: torch.autograd.set_detect_anomaly(value[0], check_nan=value[1]),
    ),
    (
        "float32 matmul precision",
        torch.get_float32_matmul_precision,
        torch.set_float32_matmul_precision,
    ),
    *(
        (
            f"torch.backends.{backend.__name__.rsplit('.', 1)[-1]}.{flag}",
            lambda backend=backend, flag=flag: getattr(backend, flag),
            lambda value, backend=backend, flag=flag: setattr(backend, flag, value),
        )
        for backend, flags in (
            (torch.backends.cudnn, ("enabled", "benchmark", "deterministic")),
            (torch.backends.mkldnn, ("enabled",)),
        )
        for flag in flags
    ),
)
"""Process-wide torch settings a loss may change (on purpose or not) and a check puts back:
each a name, a getter and a setter of what the getter returned."""


_Captured = list[tuple[Callable[[], Any], Callable[[Any], object], Any]]


def _capture_settings() -> _Captured:
    """Each setting's getter, setter and value now (one torch cannot read is left alone)."""
    captured = []
    for _, get, put in _SETTINGS:
        try:
            captured.append((get, put, get()))
        except Exception:  # e.g. a matmul precision set through mixed APIs
            continue
    return captured


def _restore_settings(captured: _Captured) -> None:
    """Put back the settings that changed; only those (a setter may have side effects)."""
    for get, put, value in captured:
        try:
            changed = get() != value
        except Exception:
            changed = True
        if changed:
            put(value)


@contextmanager
def untouched_globals(model: nn.Module) -> Iterator[RngState]:
    """Fork the RNGs; on exit put back every generator, every torch setting of `_SETTINGS`,
    the modules' train modes and the function-mode stack.

    The body is interruptible as usual; a signal whose handler raises (Ctrl-C, a SIGTERM
    handled as SystemExit) finds everything put back first, and no signal splits the
    restore itself (`gradwatch.engine.uninterrupted`).
    """
    rng = RngState.capture()
    settings = _capture_settings()
    modes = [(module, module.training) for module in model.modules()]
    function_modes = torch._C._len_torch_function_stack()

    def restore() -> None:
        rng.restore()
        _restore_settings(settings)
        for module, training in modes:
            module.training = training

    def finish() -> None:
        # A mode whose exit an interrupt skipped (the shadow's) must not outlive the check;
        # on exit only: after an interrupt, the unwinding still pops it.
        while torch._C._len_torch_function_stack() > function_modes and isinstance(
            torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1),
            ShadowMode,
        ):
            torch._C._pop_torch_function_stack()

    with restored_after(restore, finish):
        yield rng


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


class Shadow:
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
        self.native_dtype = floating_dtype(model)
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
        self.arrays[name][...] = to_numpy(self._sources[name]) if source is None else source

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


def floating_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def to_numpy(tensor: torch.Tensor) -> npt.NDArray[Any]:
    if tensor.layout != torch.strided:  # a sparse gradient (nn.Embedding(sparse=True))
        tensor = tensor.to_dense()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a nested batch; containers are rebuilt (never mutated)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        items = {key: map_tensors(item, fn) for key, item in value.items()}
        try:
            return type(value)(items)  # type: ignore[call-arg]
        except Exception:
            return items
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(map_tensors(item, fn) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(item, fn) for item in value)
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
