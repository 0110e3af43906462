"""The module-local mode's one pass over the real model, and the step link it gives.

`capture_blocks` runs J's forward and backward once in the model's own precision, the
step's random draws replayed, on detached views of the parameters and copies of the
buffers (``torch.func``'s reparametrization): no ``.grad`` is written, no hook of a
parameter runs, no running statistic moves. It keeps each chosen block's call (inputs
copied, RNG state) with the gradient that arrived at its outputs, and J's gradient for
the blocks' parameters, which `block_link` compares with the optimizer's ``.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from gradwatch.integrations._local.capture import ModuleCall, fresh_arguments, tensor_leaves
from gradwatch.integrations._shadow.loss import LossFn, scalar_of
from gradwatch.integrations._shadow.model import RngState, trainable_parameters, untouched_globals
from gradwatch.integrations._step import STEP_TOLERANCES, LinkSums, MicroBatch, judged_link
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from gradwatch.result import StepLink

__all__ = ["CALLS_PER_BLOCK", "LINK_LARGEST", "Captured", "block_link", "capture_blocks"]

CALLS_PER_BLOCK = 2
"""Calls of one block (a module called several times) kept at most per check."""

LINK_LARGEST = 4_000_000
"""The step link of a module-local check leaves out a tensor larger than this and than
1/`LINK_SHARE` of the parameters (a GPT-2's 38.6M-entry embedding), noted."""

LINK_SHARE = 8

CHUNK = 1 << 20
"""Entries of a gradient converted to float64 at a time (the step link's sums)."""


@dataclass
class Captured:
    """What the capture pass kept: the chosen blocks' calls, J's gradient for their
    parameters (by name), J's value, and the parameters the link leaves out."""

    calls: dict[str, list[ModuleCall]]
    gradients: dict[str, torch.Tensor | None] = field(default_factory=dict)
    loss: float = math.nan
    left_out: list[str] = field(default_factory=list)
    """Parameters of the chosen blocks the step link leaves out (vocabulary-sized)."""


class _Recorder:
    """Forward hooks on the chosen blocks: each call's inputs and RNG state before it
    runs, its output tensors after (whose gradients become its cotangents)."""

    def __init__(self, modules: dict[int, str]) -> None:
        self.paths = modules
        self.calls: dict[str, list[ModuleCall]] = {path: [] for path in modules.values()}
        self.outputs: list[tuple[ModuleCall, int, torch.Tensor]] = []
        self.recording = False

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        path = self.paths.get(id(module))
        if path is None or not self.recording or len(self.calls[path]) >= CALLS_PER_BLOCK:
            return
        found = tensor_leaves((args, kwargs))
        self.calls[path].append(
            ModuleCall(
                path=path,
                module=module,
                number=len(self.calls[path]),
                args=fresh_arguments(args),
                kwargs=fresh_arguments(kwargs),
                differentiable=frozenset(
                    i for i, t in enumerate(found) if t.is_floating_point() and t.requires_grad
                ),
                rng=RngState.capture(),
            )
        )

    def after(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        path = self.paths.get(id(module))
        calls = self.calls.get(path or "", [])
        if path is None or not self.recording or not calls or calls[-1].outputs:
            return
        found = tensor_leaves(output)
        calls[-1].outputs = len(found)
        for position, tensor in enumerate(found):
            if tensor.is_floating_point() and tensor.requires_grad:
                self.outputs.append((calls[-1], position, tensor))


def _linked(model: nn.Module, blocks: Sequence[str]) -> tuple[list[str], list[str]]:
    """The trainable parameters of ``blocks`` the step link compares, and those it leaves
    out: a vocabulary-sized tensor's gradient (a tied embedding sums two dense ones)
    would be the pass's largest allocation, held while every activation is alive."""
    sizes = trainable_parameters(model)
    large = max(sum(p.numel() for p in sizes.values()) / LINK_SHARE, LINK_LARGEST)
    inside = [n for n in sizes if any(_inside(n, path) for path in blocks)]
    return [n for n in inside if sizes[n].numel() <= large], [
        n for n in inside if sizes[n].numel() > large
    ]


def capture_blocks(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Sequence[MicroBatch],
    blocks: Sequence[str],
) -> Captured:
    """One forward+backward of J = sum_i w_i loss_fn(model, b_i) in the model's precision,
    keeping the chosen blocks' calls of the last micro-batch (inputs copied, RNG state,
    output cotangents) and J's gradient for their parameters.

    The model's parameters are replaced for the pass by detached views (no ``.grad``
    written, no hook of theirs run) and its buffers by copies (running statistics
    untouched); every RNG, mode and torch setting is put back.
    """
    modules = dict(model.named_modules())
    recorder = _Recorder({id(modules[path]): path for path in blocks})
    leaves = {n: p.detach().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    linked, left_out = _linked(model, blocks)
    handles = []
    for path in blocks:
        handles.append(modules[path].register_forward_pre_hook(recorder.before, with_kwargs=True))
        handles.append(modules[path].register_forward_hook(recorder.after, with_kwargs=True))
    device = next(iter(leaves.values())).device.type
    total: torch.Tensor | None = None
    try:
        with (
            untouched_globals(model),
            _reparametrize_module(model, {**leaves, **buffers}, tie_weights=True),
            torch.enable_grad(),
        ):
            for index, micro in enumerate(micro_batches):
                if micro.rng is not None:
                    micro.rng.restore()
                recorder.recording = index == len(micro_batches) - 1
                with torch.autocast(device, dtype=micro.autocast, enabled=bool(micro.autocast)):
                    loss = scalar_of(loss_fn(model, micro.batch), "loss_fn(model, batch)")
                term = micro.weight * loss.float()
                total = term if total is None else total + term
            assert total is not None
            wrt = [tensor for _, _, tensor in recorder.outputs] + [leaves[n] for n in linked]
            grads: Sequence[torch.Tensor | None] = [None] * len(wrt)
            if total.requires_grad and wrt:
                grads = torch.autograd.grad(total, wrt, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    for (call, position, _), grad in zip(recorder.outputs, grads, strict=False):
        if grad is not None:
            call.cotangents[position] = grad.detach()
    for path_calls in recorder.calls.values():
        for call in path_calls:
            call.calls = len(path_calls)
    gradients = dict(zip(linked, grads[len(recorder.outputs) :], strict=True))
    return Captured(recorder.calls, gradients, float(total.detach()), left_out)


def _inside(name: str, path: str) -> bool:
    return path == "" or name == path or name.startswith(path + ".")


def block_link(
    model: nn.Module,
    captured: Captured,
    micro: Sequence[MicroBatch],
    clip_factor: float | None,
) -> StepLink:
    """The chosen blocks' ``.grad`` against the capture pass's gradient of J (the same
    precision and draws as training: tolerances of the training dtype)."""
    sources = trainable_parameters(model)
    dtypes = [next(iter(sources.values())).dtype]
    dtypes += [m.autocast for m in micro if m.autocast is not None]
    warn, threshold = max(STEP_TOLERANCES.get(d, STEP_TOLERANCES[torch.float32]) for d in dtypes)
    names = [n for n in captured.gradients if n in sources]
    if clip_factor is None:
        ours = sum(_dot(captured.gradients[n], captured.gradients[n]) for n in names)
        theirs = sum(_dot(sources[n].grad, sources[n].grad) for n in names)
        clip_factor = math.sqrt(theirs / ours) if ours > 0 else 1.0
    sums = LinkSums({}, {}, {}, {})
    for name in names:
        got, want = sources[name].grad, captured.gradients[name]
        if got is not None and got.layout != torch.strided:
            got = got.to_dense()
        gg, ww, gw = _dot(got, got), _dot(want, want), _dot(got, want)
        gg, gw = gg / clip_factor**2, gw / clip_factor
        sums.optimizer[name], sums.objective[name], sums.dot[name] = gg, ww, gw
        sums.difference[name] = _distance(got, want, clip_factor)
    return judged_link(sums, warn, threshold, len(micro), clip_factor)


def _dot(first: torch.Tensor | None, second: torch.Tensor | None) -> float:
    """<first, second> in float64, a chunk at a time (never a float64 copy of a whole
    vocabulary-sized gradient); 0 when either is missing."""
    if first is None or second is None:
        return 0.0
    a, b = first.detach().reshape(-1), second.detach().reshape(-1)
    return sum(
        float((a[i : i + CHUNK].double() * b[i : i + CHUNK].double()).sum())
        for i in range(0, a.numel(), CHUNK)
    )


def _distance(got: torch.Tensor | None, want: torch.Tensor | None, clip: float) -> float:
    """||got / clip - want||^2 in float64, a chunk at a time (a missing one is zeros)."""
    if got is None or want is None:
        present = got if got is not None else want
        scale = clip if got is not None else 1.0
        return _dot(present, present) / scale**2 if present is not None else 0.0
    a, b = got.detach().reshape(-1), want.detach().reshape(-1)
    return sum(
        float((a[i : i + CHUNK].double() / clip - b[i : i + CHUNK].double()).square().sum())
        for i in range(0, a.numel(), CHUNK)
    )
