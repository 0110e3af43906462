"""Batched evaluation of J: many perturbations of one tensor per ``torch.func.vmap`` call."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from gradwatch.integrations._shadow.loss import ShadowLoss
from torch import nn

__all__ = ["ACTIVATION_BUDGET", "MAX_CHUNK", "MIN_BATCH", "PERTURBATION_BUDGET"]


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

    def __init__(self, objective: ShadowLoss) -> None:
        super().__init__()
        self.model = objective.shadow.module
        self.objective = objective

    def forward(self) -> torch.Tensor:
        return self.objective.total(self.model)


class VmappedLoss:
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

    def __init__(self, objective: ShadowLoss, largest: Mapping[str, int]) -> None:
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


def _batched_unavailable(objective: ShadowLoss) -> str | None:
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
def _output_bytes(objective: ShadowLoss) -> Iterator[list[int]]:
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
