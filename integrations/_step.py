"""The training step's link: the gradient the optimizer gets against the gradient of J.

The finite-difference check verifies backprop on a float64 copy; it never looks at
the ``.grad`` the optimizer is about to use. Between the two live real bugs: a loss
normalized per micro-batch instead of per token under gradient accumulation, a
missing ``zero_grad``, a hook that scales ``.grad``, a loss divided twice. The step
link compares, tensor by tensor, the trainer's ``.grad`` (clipping undone) with the
float64 autograd gradient of the step's objective J = sum_i w_i loss(micro-batch i),
each micro-batch's random draws (dropout) replayed from the state its training
forward started from. It is a gradient-to-gradient comparison (one float64 backward
pass, no finite differences), judged with tolerances of the training precision.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from gradwatch.integrations._parallel.ranks import Ranks, unwrap_data_parallel
from gradwatch.integrations._shadow.loss import LossFn, scalar_of, untouched_model
from gradwatch.integrations._shadow.mode import ShadowMode, without_checkpointing
from gradwatch.integrations._shadow.model import (
    RngState,
    Shadow,
    map_tensors,
    trainable_parameters,
    untouched_globals,
)
from torch import nn

from gradwatch.engine.comparison import status_for
from gradwatch.errors import OptionError
from gradwatch.result import StepLink

__all__ = ["STEP_TOLERANCES", "MicroBatch", "compare_step"]

STEP_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-8, 1e-5),
    torch.float32: (1e-4, 1e-2),
    torch.float16: (1e-2, 1e-1),
    torch.bfloat16: (5e-2, 2.5e-1),
}
"""(warn, threshold) of the step link by training dtype (the parameters', or autocast's).
A float32 backward differs from the float64 one by roundoff accumulated over the layers
(measured about 1e-7..1e-6 on the architecture sweep's models); the real bugs it is for
differ by whole percents (a hook x1.1 on one tensor: 5e-2; accumulation over
micro-batches of unequal length: 1e-2 and more). bfloat16 keeps 8 bits (float16: 11): its
step measured up to 1.9e-2 on a small Lightning classifier under ``bf16-mixed`` (2e-3 on
tiny Llama and BERT under the Trainer's ``bf16``), so its link is judged 5x looser, still
catching a factor 2 on the gradient (ratio 1/3)."""


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of the step: what ``loss_fn`` takes, its weight in J, its draws.

    Attributes:
        batch: the micro-batch as ``loss_fn(model, batch)`` takes it.
        weight: its factor in J = sum_i weight_i * loss_fn(model, batch_i).
        rng: the random generators' state when its training forward began (replayed so
            dropout draws the same masks); None: the current state (fine without
            randomness in the forward).
        autocast: the autocast dtype of its training forward, or None.
    """

    batch: Any
    weight: float = 1.0
    rng: RngState | None = None
    autocast: torch.dtype | None = None
    """The autocast dtype its training forward ran under (bf16/fp16), if any: the
    tolerances then follow it."""


def compare_step(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Sequence[MicroBatch],
    *,
    clip_factor: float | None = 1.0,
) -> StepLink:
    """Compare ``model``'s ``.grad`` / ``clip_factor`` with the float64 gradient of J.

    ``clip_factor`` None: the trainer clipped by a factor nobody measured (under DDP the
    gradient-norm hooks see a rank's own gradient, not the mean); it is then taken as
    ||.grad|| / ||g_J||, and the link judges the direction, not the norm.

    In a distributed job J is the mean over the ranks of each rank's J (DDP averages the
    gradients), so the reference is the mean of the ranks' float64 gradients.
    Nothing of the model is written to; every global RNG is restored.
    """
    if not micro_batches:
        raise OptionError("micro_batches: expected at least one, received none")
    model = unwrap_data_parallel(model)
    ranks = Ranks.current()
    with contextlib.nullcontext() if ranks is None else ranks.together():
        return _compare_step(model, loss_fn, micro_batches, clip_factor, ranks)


def _compare_step(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Sequence[MicroBatch],
    clip_factor: float | None,
    ranks: Ranks | None,
) -> StepLink:
    sources = trainable_parameters(model)
    dtypes = [next(iter(sources.values())).dtype]
    dtypes += [micro.autocast for micro in micro_batches if micro.autocast is not None]
    warn, threshold = max(STEP_TOLERANCES.get(d, STEP_TOLERANCES[torch.float32]) for d in dtypes)
    with untouched_globals(model):
        shadow = Shadow(model, "float64")
        without_checkpointing(shadow.module)
        mode = ShadowMode(torch.float64, training_dtype=shadow.native_dtype)
        with untouched_model(model), mode, torch.enable_grad():
            total: torch.Tensor | None = None
            for micro in micro_batches:
                if micro.rng is not None:
                    micro.rng.restore()
                batch = map_tensors(
                    micro.batch, lambda t: t.double() if t.is_floating_point() else t
                )
                term = micro.weight * scalar_of(
                    loss_fn(shadow.module, batch), "loss_fn(model, batch)"
                )
                total = term if total is None else total + term
            assert total is not None
            if total.requires_grad:
                total.backward()  # type: ignore[no-untyped-call]
        if ranks is not None:
            for parameter in shadow.params.values():
                local = (
                    parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
                )
                parameter.grad = ranks.mean_tensor(local).to(parameter.device)
        if clip_factor is None:
            clip_factor = _measured_clip(sources, shadow.params)
        sums = _compare(sources, shadow.params, clip_factor)
    return judged_link(
        sums, warn, threshold, len(micro_batches), clip_factor, mode.draws.unreplayed
    )


def _measured_clip(sources: dict[str, nn.Parameter], shadow: dict[str, nn.Parameter]) -> float:
    """||.grad|| / ||g_J||: the factor a clip applied, if the step is right otherwise."""

    def norm(params: dict[str, nn.Parameter]) -> float:
        return math.sqrt(
            sum(
                float(p.grad.double().square().sum()) for p in params.values() if p.grad is not None
            )
        )

    reference = norm(shadow)
    return norm(sources) / reference if reference > 0 else 1.0


@dataclass
class LinkSums:
    """Per tensor: ||g_opt - g_J||^2, ||g_opt||^2, ||g_J||^2 and g_opt . g_J."""

    difference: dict[str, float]
    optimizer: dict[str, float]
    objective: dict[str, float]
    dot: dict[str, float]


def _compare(
    sources: dict[str, nn.Parameter], shadow: dict[str, nn.Parameter], clip_factor: float
) -> LinkSums:
    sums = LinkSums({}, {}, {}, {})
    with torch.no_grad():
        for name, parameter in sources.items():
            reference = shadow[name]
            want = (
                reference.grad.to(torch.float64)
                if reference.grad is not None
                else torch.zeros(reference.shape, dtype=torch.float64)
            )
            reference.grad = None  # freed as we go
            got = (
                parameter.grad.detach().to(torch.float64) / clip_factor
                if parameter.grad is not None
                else torch.zeros_like(want)
            )
            if got.layout != torch.strided:
                got = got.to_dense()
            sums.difference[name] = float((got - want).square().sum())
            sums.optimizer[name] = float(got.square().sum())
            sums.objective[name] = float(want.square().sum())
            sums.dot[name] = float((got * want).sum())
    return sums


def _ratio(difference: float, first: float, second: float, floor: float = 0.0) -> float:
    denominator = max(math.sqrt(first) + math.sqrt(second), floor)
    return math.sqrt(difference) / denominator if denominator > 0 else 0.0


def judged_link(
    sums: LinkSums,
    warn: float,
    threshold: float,
    count: int,
    clip: float,
    unreplayed: Sequence[str] = (),
) -> StepLink:
    total_opt, total_j = sum(sums.optimizer.values()), sum(sums.objective.values())
    ratio = _ratio(sum(sums.difference.values()), total_opt, total_j)
    scale = sum(sums.dot.values()) / total_j if total_j > 0 else math.nan
    # A tensor whose gradient is about 0 is judged against the whole gradient (1e-3 of
    # it), never noise over noise (docs/design.md#near-zero).
    floor = 1e-3 * (math.sqrt(total_opt) + math.sqrt(total_j))
    tensors = {
        name: _ratio(sums.difference[name], sums.optimizer[name], sums.objective[name], floor)
        for name in sums.difference
    }
    worst = max(tensors, key=tensors.__getitem__) if tensors else None
    status = status_for(max(ratio, tensors[worst] if worst else 0.0), warn, threshold)
    explanation = "" if status == "ok" else _explain(sums, tensors, scale, threshold)
    if unreplayed:
        # Other draws than the training's: a difference would be the draws', not the step's.
        status = "nondeterministic"
        explanation = (
            "not judged: the replay could not draw its random numbers as the training did "
            f"({', '.join(unreplayed)})"
        )
    return StepLink(
        ratio=ratio,
        status=status,
        warn=warn,
        threshold=threshold,
        scale=scale,
        tensors=tensors,
        worst_tensor=worst,
        micro_batches=count,
        clip_factor=clip,
        explanation=explanation,
    )


def _explain(sums: LinkSums, tensors: dict[str, float], scale: float, threshold: float) -> str:
    """What the disagreement looks like: a factor on everything, a few tensors, or a mix."""
    total_opt = sum(sums.optimizer.values())
    residual = total_opt - 2 * scale * sum(sums.dot.values())
    residual += scale * scale * sum(sums.objective.values())
    off_direction = math.sqrt(max(residual, 0.0)) / max(math.sqrt(total_opt), 1e-300)
    # A factor is named only where it is one: a scale within the threshold of 1 is the
    # precision's noise (bf16 routing ties, say), not a loss divided twice.
    if off_direction < threshold and math.isfinite(scale) and abs(scale - 1) >= threshold:
        power = math.log2(abs(scale)) if scale != 0 else 0.0
        if scale >= 16 and abs(power - round(power)) < 1e-3:
            hint = "an AMP loss scale left in .grad (GradScaler.unscale_ missing before this?)"
        elif scale < 1:
            hint = "the loss divided once too often (by the accumulation steps twice?)"
        else:
            hint = "a loss summed instead of averaged, or gradients kept from an earlier step "
            hint += "(a missing zero_grad?)"
        return (
            f"the optimizer's gradient is {scale:.3g}x the gradient of the step's loss, in "
            f"the same direction: {hint}"
        )
    failing = sorted((n for n, r in tensors.items() if r >= threshold), key=tensors.__getitem__)
    if failing and len(failing) <= max(2, len(tensors) // 10):
        return (
            f"the optimizer's gradient differs in {', '.join(reversed(failing))} only "
            "(a gradient hook, or code that changes .grad after backward?)"
        )
    return (
        "it differs across tensors, not by one factor: the micro-batches weighted otherwise "
        "than in the step's loss (accumulation normalized per micro-batch, not per token?), "
        "or gradients kept from an earlier step (a missing zero_grad?)"
    )
